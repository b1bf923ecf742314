"""max_sim: every backend against the reference (values, indices, gradients), padding, ties, opcheck, compile, bad input.

The reference is checked against a plain double loop over pairs; every other
backend against the reference. Low precision: the fp32 reference on the same
rounded inputs, tolerances relative to its largest magnitude (conftest.SCALED_TOL).
"""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import SCALED_TOL, TF32_TOL, assert_scaled_close, assert_tf32_reached_the_kernels, backend_device, tf32_rounded

from sgfused import reference
from sgfused.nn import MaxSim
from sgfused.ops import max_sim
from sgfused.reference.max_sim import valid_mask

OP = sys.modules["sgfused.ops.max_sim"]
BACKENDS = ("reference", "cpu", "triton", "cuda")
# (Nx, Lx, Ny, Ly, d) and lengths: a single node, length 1 in padded sets, odd sizes, Lx != Ly,
# d not a power of two
CASES = [
    ((1, 1, 1, 1, 1), "full"),
    ((3, 5, 4, 6, 17), "one"),
    ((3, 5, 4, 6, 17), "mixed"),
    ((5, 9, 7, 4, 33), "full"),
    ((5, 9, 7, 4, 33), "mixed"),
]


def device_for(backend: str) -> torch.device:
    """The device a backend's tests run on; skips where the backend cannot run or is not written."""
    device = backend_device(backend)
    if backend not in OP._IMPLEMENTATIONS:
        pytest.skip(f"max_sim has no {backend} implementation in this installation")
    return device


def make(nx, lx, ny, ly, d, lengths, device, dtype=torch.float32):
    x = torch.randn(nx, lx, d).to(device, dtype)
    y = torch.randn(ny, ly, d).to(device, dtype)
    if lengths == "full":
        x_lens, y_lens = torch.full((nx,), lx), torch.full((ny,), ly)
    elif lengths == "one":
        x_lens, y_lens = torch.ones(nx, dtype=torch.long), torch.ones(ny, dtype=torch.long)
    else:
        x_lens, y_lens = torch.randint(1, lx + 1, (nx,)), torch.randint(1, ly + 1, (ny,))
        x_lens[0], y_lens[0] = lx, ly
    return x, y, x_lens.to(device), y_lens.to(device)


def run(backend, x, y, x_lens, y_lens, upstream):
    """Scores, indices and the gradients of sum(upstream * scores) for x and y."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, y)]
    if backend == "reference_op":
        scores, indices = reference.max_sim(leaves[0], leaves[1], x_lens, y_lens, True)
    else:
        scores, indices = max_sim(leaves[0], leaves[1], x_lens, y_lens, return_indices=True, backend=backend)
    grads = torch.autograd.grad((scores * upstream).sum(), leaves)
    return scores, indices, *grads


def check_against_reference(backend, x, y, x_lens, y_lens, tol_dtype=None):
    """``backend`` on (x, y) against the reference on the same values in fp32 (fp64 for fp64)."""
    wide = torch.promote_types(x.dtype, torch.float32)
    upstream = torch.rand(x.shape[0], y.shape[0], device=x.device, dtype=wide) + 0.5
    got = run(backend, x, y, x_lens, y_lens, upstream)
    want = run("reference_op", x.to(wide), y.to(wide), x_lens, y_lens, upstream)
    value_tol, grad_tol = SCALED_TOL[tol_dtype or x.dtype]
    assert got[0].dtype == wide
    assert got[2].dtype == x.dtype and got[3].dtype == y.dtype
    assert_scaled_close(got[0], want[0], value_tol)
    assert torch.equal(got[1], want[1])
    assert_scaled_close(got[2], want[2], grad_tol)
    assert_scaled_close(got[3], want[3], grad_tol)


def test_reference_matches_a_loop_over_pairs():
    x, y, x_lens, y_lens = make(4, 6, 5, 7, 9, "mixed", torch.device("cpu"), torch.float64)
    scores, indices = reference.max_sim(x, y, x_lens, y_lens, True)
    for a in range(4):
        for b in range(5):
            dots = y[b, : y_lens[b]] @ x[a, : x_lens[a]].T  # (t, o)
            torch.testing.assert_close(scores[a, b], dots.max(1).values.mean())
            assert indices[a, b, : y_lens[b]].tolist() == dots.argmax(1).tolist()
            assert (indices[a, b, y_lens[b] :] == -1).all()


def test_reference_chunks_give_the_same_result(monkeypatch):
    x, y, x_lens, y_lens = make(3, 4, 9, 5, 6, "mixed", torch.device("cpu"))
    whole = reference.max_sim(x, y, x_lens, y_lens, True)
    monkeypatch.setattr(sys.modules["sgfused.reference.max_sim"], "CHUNK_ELEMENTS", 3 * 4 * 5 * 2)  # 2 captions
    chunked = reference.max_sim(x, y, x_lens, y_lens, True)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,lengths", CASES, ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else c)
def test_matches_reference_fp32(backend, shape, lengths):
    device = device_for(backend)
    check_against_reference(backend, *make(*shape, lengths, device))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_tf32_when_allowed(backend, tf32_launches):
    """Under torch.set_float32_matmul_precision("high") the Triton kernels take TF32 products, as torch.matmul
    does: on TF32-exact inputs the scores, argmaxes and gradients match the fp64 reference within TF32's error."""
    device = device_for(backend)
    x, y, x_lens, y_lens = make(5, 36, 7, 12, 64, "mixed", torch.device("cpu"))
    x, y = tf32_rounded(x).to(device), tf32_rounded(y).to(device)
    x_lens, y_lens = x_lens.to(device), y_lens.to(device)
    upstream = tf32_rounded(torch.rand(5, 7) + 0.5).to(device)
    got = run(backend, x, y, x_lens, y_lens, upstream)
    want = run("reference_op", x.double(), y.double(), x_lens, y_lens, upstream.double())
    assert_tf32_reached_the_kernels(backend, tf32_launches)
    assert torch.equal(got[1], want[1])
    for g, w in zip(got[:1] + got[2:], want[:1] + want[2:]):
        assert_scaled_close(g, w, TF32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes(backend, dtype):
    device = device_for(backend)
    check_against_reference(backend, *make(5, 9, 7, 4, 33, "mixed", device, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_never_leaks(backend):
    """NaN and inf in padded nodes change no score and no gradient; padded nodes get zero gradient."""
    device = device_for(backend)
    x, y, x_lens, y_lens = make(4, 6, 5, 7, 9, "mixed", device)
    x_lens[1], y_lens[2] = 2, 3
    upstream = torch.rand(4, 5, device=device) + 0.5
    clean = run(backend, x, y, x_lens, y_lens, upstream)
    x_bad, y_bad = x.clone(), y.clone()
    x_valid, y_valid = valid_mask(x_lens, 6), valid_mask(y_lens, 7)
    x_bad[~x_valid] = float("nan")
    y_bad[~y_valid] = float("inf")
    x_bad[1, 5, 0] = float("-inf")
    dirty = run(backend, x_bad, y_bad, x_lens, y_lens, upstream)
    for got, want in zip(dirty, clean):
        assert torch.equal(got, want)
    assert (dirty[2][~x_valid] == 0).all() and (dirty[3][~y_valid] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_pick_the_lowest_index(backend):
    """Image nodes 0 and 2 are equal (and 1 is their negative): the argmax and the whole gradient go to node 0."""
    device = device_for(backend)
    node = torch.tensor([1.0, 2.0, 0.0, -1.0])
    x = torch.stack([node, -node, node, 0.5 * node])[None].to(device)  # (1, 4, 4)
    y = torch.tensor([[[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]], device=device)  # both prefer node 0 == node 2
    xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    scores, indices = max_sim(xr, yr, return_indices=True, backend=backend)
    assert indices.tolist() == [[[0, 0]]]
    torch.testing.assert_close(scores, torch.tensor([[2.5]], device=device))
    scores.sum().backward()
    assert (xr.grad[0, 1:] == 0).all()
    torch.testing.assert_close(xr.grad[0, 0], y[0].sum(0) / 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_indices_only_on_request(backend):
    device = device_for(backend)
    x, y, x_lens, y_lens = make(3, 5, 4, 6, 8, "mixed", device)
    scores = max_sim(x, y, x_lens, y_lens, backend=backend)
    assert isinstance(scores, torch.Tensor) and scores.shape == (3, 4)
    both = max_sim(x, y, x_lens, y_lens, return_indices=True, backend=backend)
    assert torch.equal(both[0], scores)
    assert both[1].dtype == torch.int64 and both[1].shape == (3, 4, 6)
    padded = ~valid_mask(y_lens, 6)
    assert (both[1][:, padded] == -1).all() and (both[1][:, ~padded] >= 0).all()


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_operator_without_indices_returns_an_empty_tensor_and_still_differentiates(backend):
    device = device_for(backend)
    forward = getattr(torch.ops.sgfused, "max_sim_forward_triton" if backend == "triton" else "max_sim_forward")
    x, y, x_lens, y_lens = make(3, 5, 4, 6, 8, "mixed", device)
    scores, indices = forward(x, y, x_lens, y_lens, False)
    assert indices.shape == (0,) and indices.dtype == torch.int64
    xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    forward(xr, yr, x_lens, y_lens, False)[0].sum().backward()  # autograd recovers the argmax itself
    want = run("reference_op", x, y, x_lens, y_lens, torch.ones(3, 4, device=device))
    assert_scaled_close(xr.grad, want[2], SCALED_TOL[torch.float32][1])
    assert_scaled_close(yr.grad, want[3], SCALED_TOL[torch.float32][1])


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_deterministic(backend):
    device = device_for(backend)
    tensors = make(6, 7, 9, 5, 16, "mixed", device)
    upstream = torch.randn(6, 9, device=device)
    first, second = run(backend, *tensors, upstream), run(backend, *tensors, upstream)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_cpu_with_several_work_items_and_threads():
    """More than one block of caption nodes and of image nodes; the same bits on one and on two threads."""
    tensors = make(40, 9, 60, 7, 8, "mixed", torch.device("cpu"))
    upstream = torch.randn(40, 60)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run("cpu", *tensors, upstream)
        torch.set_num_threads(2)
        two = run("cpu", *tensors, upstream)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    check_against_reference("cpu", *tensors)


@pytest.mark.parametrize("backend", ["reference", "cpu"])  # Triton in fp64: test_other_dtypes
def test_gradcheck_float64(backend):
    device = device_for(backend)
    x, y, x_lens, y_lens = make(3, 4, 2, 3, 5, "mixed", device, torch.float64)
    inputs = (x.requires_grad_(True), y.requires_grad_(True))
    assert torch.autograd.gradcheck(lambda a, b: max_sim(a, b, x_lens, y_lens, backend=backend), inputs, eps=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_opcheck(backend):
    device = device_for(backend)
    suffix = "_triton" if backend == "triton" else ""
    x, y, x_lens, y_lens = make(3, 5, 4, 6, 8, "mixed", device)
    forward = getattr(torch.ops.sgfused, f"max_sim_forward{suffix}")
    for with_indices in (True, False):
        torch.library.opcheck(forward, (x.requires_grad_(True), y.requires_grad_(True), x_lens, y_lens, with_indices))
    x, y = x.detach(), y.detach()
    scores, indices = forward(x, y, x_lens, y_lens, True)
    backward = getattr(torch.ops.sgfused, f"max_sim_backward{suffix}")
    torch.library.opcheck(backward, (torch.randn_like(scores), x, y, x_lens, y_lens, indices))


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_under_torch_compile(backend):
    device = device_for(backend)
    layer = MaxSim(backend=backend)
    x, y, x_lens, y_lens = make(3, 5, 4, 6, 8, "mixed", device)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    eager = layer(x, y, x_lens, y_lens)
    torch.testing.assert_close(compiled(x, y, x_lens, y_lens), eager)
    xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    compiled(xr, yr, x_lens, y_lens).sum().backward()
    want = run("reference_op", x, y, x_lens, y_lens, torch.ones(3, 4, device=device))
    assert_scaled_close(xr.grad, want[2], SCALED_TOL[torch.float32][1])
    assert_scaled_close(yr.grad, want[3], SCALED_TOL[torch.float32][1])
    assert repr(layer) == f"MaxSim(backend='{backend}')"


def test_lengths_as_python_lists():
    x, y, x_lens, y_lens = make(3, 5, 4, 6, 8, "mixed", torch.device("cpu"))
    want = max_sim(x, y, x_lens, y_lens)
    assert torch.equal(max_sim(x, y, x_lens.tolist(), tuple(y_lens.tolist())), want)


@pytest.mark.parametrize(
    "change,error,words",
    [
        (dict(x=torch.randn(2, 5)), ValueError, "x must be 3-D, got shape (2, 5)"),
        (dict(y=torch.randn(4, 6, 7)), ValueError, "y must have size 8 in dim 2 (d, the feature size of x)"),
        (dict(y=torch.randn(4, 6, 8, dtype=torch.float64)), TypeError, "y must have the dtype of x (torch.float32)"),
        (dict(x=torch.ones(2, 5, 8, dtype=torch.long)), TypeError, "x must be float16, bfloat16, float32 or float64"),
        (dict(x=torch.randn(0, 5, 8)), ValueError, "x must not be empty"),
        (dict(y=torch.randn(4, 6, 8, device="meta")), ValueError, "y on meta"),
        (dict(x_lens=torch.tensor([0, 2])), ValueError, "x_lens must lie in [1, 5] (the padded length), got values in [0, 2]"),
        (dict(y_lens=torch.tensor([1, 7, 2, 2])), ValueError, "y_lens must lie in [1, 6]"),
        (dict(y_lens=torch.tensor([1, 2])), ValueError, "y_lens must have size 4 in dim 0"),
        (dict(x_lens=torch.tensor([1.0, 2.0])), TypeError, "x_lens must be an integer tensor"),
        (dict(x_lens=[1, 2.5]), TypeError, "x_lens must be an integer tensor or a list of ints"),
        (dict(x_lens=[1, 9]), ValueError, "x_lens must lie in [1, 5]"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input_is_named(change, error, words):
    args = dict(x=torch.randn(2, 5, 8), y=torch.randn(4, 6, 8), x_lens=None, y_lens=None)
    args.update(change)
    with pytest.raises(error) as info:
        max_sim(**args)
    assert words in str(info.value)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("value,what", [(float("nan"), "NaN"), (float("inf"), "inf"), (float("-inf"), "-inf")])
def test_non_finite_valid_node_is_named(backend, value, what):
    device = device_for(backend)
    x, y = torch.randn(2, 5, 8, device=device), torch.randn(4, 6, 8, device=device)
    x[1, 2, 3] = value
    with pytest.raises(ValueError, match=rf"x contains {what} \(first at index \(1, 2\)\)"):
        max_sim(x, y, backend=backend)
    y[3, 4, 0] = value
    with pytest.raises(ValueError, match=rf"y contains {what} \(first at index \(3, 4\)\)"):
        max_sim(torch.randn(2, 5, 8, device=device), y, backend=backend)


def test_cpu_operator_checks_its_inputs():
    """The raw operator (no Python checks in front) refuses bad lengths and indices with a named error."""
    x, y = torch.randn(2, 5, 8), torch.randn(4, 6, 8)
    with pytest.raises(ValueError, match=r"x_lens must lie in \[1, 5\]"):
        torch.ops.sgfused.max_sim_forward(x, y, torch.tensor([0, 5]), torch.full((4,), 6), False)
    bad = torch.full((2, 4, 6), 7, dtype=torch.long)
    with pytest.raises(RuntimeError, match="indices must name a valid image node"):
        torch.ops.sgfused.max_sim_backward(torch.ones(2, 4), x, y, torch.full((2,), 5), torch.full((4,), 6), bad)


def test_registration_covers_the_operator_pairs_that_exist():
    """Compiled and Triton pairs get fakes and autograd; an op with neither (reference only) needs nothing."""
    from sgfused.ops._registration import register_forward_backward

    assert register_forward_backward("no_such_op", None, None, None, None) == ()
    for suffix in ("", "_triton"):
        forward, backward = f"sgfused::max_sim_forward{suffix}", f"sgfused::max_sim_backward{suffix}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(forward, "Autograd"), forward
        assert torch._C._dispatch_has_kernel_for_dispatch_key(forward, "Meta"), forward
        assert torch._C._dispatch_has_kernel_for_dispatch_key(backward, "Meta"), backward


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_checks_hold_under_torch_compile(backend):
    """A compiled call refuses bad lengths and NaN at a valid node exactly as an eager call does."""
    device = device_for(backend)
    x, y = torch.randn(2, 5, 8, device=device), torch.randn(4, 6, 8, device=device)
    x[1, 4] = float("nan")  # a padded node: never an error
    good, too_long = torch.tensor([5, 3], device=device), torch.tensor([5, 6], device=device)
    with_nan = x.clone()
    with_nan[1, 2, 3] = float("nan")
    eager = lambda a, la: max_sim(a, y, la, backend=backend)  # noqa: E731
    compiled = torch.compile(eager, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, good), eager(x, good))
    for fn in (eager, compiled):
        with pytest.raises(ValueError, match=r"x_lens must lie in \[1, 5\]"):
            fn(x, too_long)
        with pytest.raises(ValueError, match=r"x contains NaN \(first at index \(1, 2\)\)"):
            fn(with_nan, good)
