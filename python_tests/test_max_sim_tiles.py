"""max_sim GPU kernels (Triton, CUDA) at their tile boundaries, against the reference.

Both kernels take image nodes 64 at a time (a running max / argmax across node tiles) and
caption nodes in blocks of whole captions (64 rows, more for a caption longer than 64): these
shapes cross every boundary, and a tie between two node tiles must still go to the lowest node.
test_max_sim.py covers everything else for every backend.
"""

from __future__ import annotations

import pytest
import torch
from conftest import SCALED_TOL, assert_scaled_close, backend_device

from sgfused import reference
from sgfused.ops import max_sim

GPU_BACKENDS = ("triton", "cuda")
# (Nx, Lx, Ny, Ly, d): two node tiles; a caption longer than a row block; many caption blocks
SHAPES = [(3, 70, 4, 5, 20), (2, 9, 3, 100, 18), (2, 3, 40, 7, 16)]


def lengths(n: int, padded: int) -> torch.Tensor:
    lens = torch.randint(1, padded + 1, (n,))
    lens[0] = padded
    return lens


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_tile_boundaries_match_the_reference(backend, shape):
    device = backend_device(backend)
    nx, lx, ny, ly, d = shape
    x, y = torch.randn(nx, lx, d, device=device), torch.randn(ny, ly, d, device=device)
    x_lens, y_lens = lengths(nx, lx).to(device), lengths(ny, ly).to(device)
    upstream = torch.rand(nx, ny, device=device) + 0.5
    results = []
    for name in (backend, "reference"):
        xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        scores, indices = max_sim(xr, yr, x_lens, y_lens, return_indices=True, backend=name)
        results.append((scores, indices, *torch.autograd.grad((scores * upstream).sum(), (xr, yr))))
    got, want = results
    value_tol, grad_tol = SCALED_TOL[torch.float32]
    assert_scaled_close(got[0], want[0], value_tol)
    assert torch.equal(got[1], want[1])
    assert_scaled_close(got[2], want[2], grad_tol)
    assert_scaled_close(got[3], want[3], grad_tol)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_a_tie_across_node_tiles_goes_to_the_lowest_node(backend):
    device = backend_device(backend)
    x = torch.randn(1, 70, 8) * 0.1
    x[0, 67] = x[0, 3] = torch.ones(8)  # the best node, in the first and in the second tile
    y = torch.ones(1, 2, 8)
    xr, yr = x.to(device).requires_grad_(True), y.to(device).requires_grad_(True)
    scores, indices = max_sim(xr, yr, return_indices=True, backend=backend)
    assert indices.tolist() == [[[3, 3]]]
    scores.sum().backward()
    assert (xr.grad[0, 67] == 0).all()
    torch.testing.assert_close(xr.grad[0, 3].cpu(), torch.ones(8))
    assert reference.max_sim(x, y, torch.tensor([70]), torch.tensor([2]), True)[1].tolist() == [[[3, 3]]]
