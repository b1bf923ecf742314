"""pairwise_similarity: every backend against the reference, gradients, numerics, opcheck, compile, bad input.

Tolerances are relative to the largest reference magnitude: fp32 1e-5 (values) and
1e-4 (gradients, sums over many pairs), fp16 5e-3, bf16 3e-2 (one or two ulps of
the output dtype, in which the kernels' saved output is rounded). With m = 1 the
output is z / (|z| + eps), a step at z = 0: where the learned sum z cancels to near
zero, fp32 rounding of z moves the value, and the true gradient g eps / (|z| + eps)^2
is the difference of two nearly equal terms in any precision. For m = 1 the values
are compared in the input dtype only when it is fp64, and the gradients in fp64.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (KERNEL_BACKENDS, SCALED_TOL, TF32_TOL, assert_scaled_close, assert_tf32_reached_the_kernels,
                      backend_device, tf32_rounded)

from sgfused import reference
from sgfused.nn import VectorSimilarity
from sgfused.ops import pairwise_similarity

# (Nx, Ny, d, m): every size of the issue appears: N in {1, 3, 64, 257}, d in {1, 17, 1024}, m in {1, 256}
SHAPES = [(1, 1, 1, 1), (3, 64, 17, 256), (64, 3, 1024, 1), (257, 3, 17, 256), (3, 257, 1024, 1), (64, 64, 17, 1)]


def make_inputs(nx, ny, d, m, bias, device, dtype):
    x = torch.randn(nx, d, device=device).to(dtype)
    y = torch.randn(ny, d, device=device).to(dtype)
    weight = (torch.randn(m, d, device=device) / d**0.5).to(dtype)
    b = (torch.randn(m, device=device) * 0.1).to(dtype) if bias else None
    return x, y, weight, b


def values_and_grads(fn, inputs, upstream):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    out = fn(*leaves)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad((out.float() * upstream).sum(), present)
    return out, grads


def check_against_reference(backend, shape, mode, bias, aligned, dtype):
    device = backend_device(backend)
    nx, ny, d, m = shape
    if backend == "triton" and device.type == "cpu" and nx * (nx if aligned else ny) * d > 200_000:
        pytest.skip("too slow for the Triton interpreter (runs on a GPU); d = 1024 is covered by a smaller shape")
    if aligned:
        ny = nx
    inputs = make_inputs(nx, ny, d, m, bias, device, dtype)
    upstream = torch.randn((nx, m) if aligned else (nx, ny, m), device=device)

    def ours(x, y, w, b):
        return pairwise_similarity(x, y, w, b, mode, aligned=aligned, backend=backend)

    def ref(x, y, w, b):
        return reference.pairwise_similarity(x, y, w, b, mode, 1e-8, aligned)

    got, got_grads = values_and_grads(ours, inputs, upstream)
    want, want_grads = values_and_grads(ref, inputs, upstream)
    value_tol, grad_tol = SCALED_TOL[dtype]
    assert got.dtype == dtype
    if m == 1:
        wide = [t.double() if t is not None else None for t in inputs]
        got, got_grads = values_and_grads(ours, wide, upstream)
        want, want_grads = values_and_grads(ref, wide, upstream)
        value_tol, grad_tol = SCALED_TOL[torch.float64]
    assert_scaled_close(got, want, value_tol)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == (torch.float64 if m == 1 else dtype)
        assert_scaled_close(g, w, grad_tol)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["distance", "direction"])
@pytest.mark.parametrize("bias", [True, False])
def test_all_pairs_fp32(backend, shape, mode, bias):
    check_against_reference(backend, shape, mode, bias, False, torch.float32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", ["distance", "direction"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 64, 17, 256), (64, 3, 1024, 256)], ids=["3x64x17x256", "64x3x1024x256"])
def test_low_precision(backend, mode, dtype, shape):
    check_against_reference(backend, shape, mode, True, False, dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", ["distance", "direction"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_aligned_pairs(backend, mode, dtype):
    check_against_reference(backend, (33, 33, 17, 256), mode, True, True, dtype)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("mode", ["distance", "direction"])
def test_tf32_when_allowed(backend, mode, tf32_launches):
    """Under torch.set_float32_matmul_precision("high") the GPU backends may take TF32 products, as
    torch.matmul does: values and gradients stay within TF32's error of the fp64 reference."""
    device = backend_device(backend)
    inputs = [tf32_rounded(t).to(device) for t in make_inputs(3, 64, 17, 256, True, "cpu", torch.float32)]
    upstream = tf32_rounded(torch.randn(3, 64, 256)).to(device)
    got, got_grads = values_and_grads(lambda *t: pairwise_similarity(*t, mode, backend=backend), inputs, upstream)
    want, want_grads = values_and_grads(lambda *t: reference.pairwise_similarity(*t, mode, 1e-8, False),
                                        [t.double() for t in inputs], upstream.double())
    assert_tf32_reached_the_kernels(backend, tf32_launches)
    assert got.dtype == torch.float32
    assert_scaled_close(got, want, TF32_TOL)
    for g, w in zip(got_grads, want_grads):
        assert_scaled_close(g, w, TF32_TOL)


@pytest.mark.parametrize("shape", [(70, 5, 9, 24), (5, 70, 9, 24)], ids=["x-rows", "y-rows"])
@pytest.mark.parametrize("mode", ["distance", "direction"])
def test_triton_backward_partials_over_many_splits(monkeypatch, shape, mode):
    """Every partner in its own split and two row blocks (the larger side is the rows either way):
    the Triton backward's partial sums of both ends' gradients and of grad_weight add up."""
    from sgfused.triton import pairwise_similarity as kernels
    monkeypatch.setattr(kernels, "TARGET_PROGRAMS_CPU", 10_000)
    assert kernels._split_count(5, 2, torch.device("cpu")) == 5
    check_against_reference("triton", shape, mode, True, False, torch.float32)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_aligned_equals_diagonal_of_all_pairs(backend):
    device = backend_device(backend)
    x, y, w, b = make_inputs(9, 9, 17, 8, True, device, torch.float32)
    full = pairwise_similarity(x, y, w, b, backend=backend)
    aligned = pairwise_similarity(x, y, w, b, aligned=True, backend=backend)
    torch.testing.assert_close(aligned, full.diagonal(dim1=0, dim2=1).t(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_near_equal_inputs_keep_precision(backend):
    """x = y + 1e-4 noise: the expanded form W x^2 + W y^2 - 2 W xy would lose most digits in fp32."""
    device = backend_device(backend)
    y = torch.randn(16, 256, device=device)
    x = y + 1e-4 * torch.randn_like(y)
    w = torch.rand(32, 256, device=device)  # positive weights: z = W (x - y)^2 is tiny and positive
    got = pairwise_similarity(x, y, w, None, "distance", eps=0.0, aligned=True, backend=backend)
    want = reference.pairwise_similarity(x.double(), y.double(), w.double(), None, "distance", 0.0, True)
    assert_scaled_close(got, want, 1e-4)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", ["distance", "direction"])
def test_zero_vectors_give_zeros_not_nan(backend, mode):
    device = backend_device(backend)
    x = torch.zeros(3, 5, device=device, requires_grad=True)
    y = torch.zeros(2, 5, device=device, requires_grad=True)
    w = torch.randn(4, 5, device=device, requires_grad=True)
    out = pairwise_similarity(x, y, w, None, mode, backend=backend)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    for t in (x, y, w):
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("mode", ["distance", "direction"])
@pytest.mark.parametrize("aligned", [False, True])
def test_gradcheck_float64(backend, mode, aligned):
    device = backend_device(backend)
    x, y, w, b = (t.requires_grad_(True) for t in make_inputs(3, 3, 5, 4, True, device, torch.float64))

    def fn(x, y, w, b):
        return pairwise_similarity(x, y, w, b, mode, aligned=aligned, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, y, w, b), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("aligned", [False, True])
def test_opcheck(backend, bias, aligned):
    device = backend_device(backend)
    suffix = "_triton" if backend == "triton" else ""
    x, y, w, b = make_inputs(4, 4 if aligned else 5, 7, 3, bias, device, torch.float32)
    args = [x.requires_grad_(True), y.requires_grad_(True), w.requires_grad_(True)]
    args.append(b.requires_grad_(True) if b is not None else None)
    forward = getattr(torch.ops.sgfused, f"pairwise_similarity_forward{suffix}")
    for mode in ("distance", "direction"):
        torch.library.opcheck(forward, (*args, mode, 1e-8, aligned))
        out, norm = forward(*(t.detach() if t is not None else None for t in args), mode, 1e-8, aligned)
        backward = getattr(torch.ops.sgfused, f"pairwise_similarity_backward{suffix}")
        detached = [t.detach() if t is not None else None for t in args]
        torch.library.opcheck(backward, (torch.randn_like(out), *detached, out, norm, mode, 1e-8, aligned))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_runs_under_torch_compile(backend):
    device = backend_device(backend)
    layer = VectorSimilarity(16, 8, backend=backend).to(device)
    x, y = torch.randn(5, 16, device=device), torch.randn(6, 16, device=device)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, y), layer(x, y))
    compiled(x, y).sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_vector_similarity_module():
    layer = VectorSimilarity(1024, 256, mode="direction")
    bound = (6.0 / (1024 + 256)) ** 0.5
    assert layer.weight.abs().max() <= bound and torch.equal(layer.bias, torch.zeros(256))
    x, y = torch.randn(4, 1024), torch.randn(4, 1024)
    assert layer(x, y).shape == (4, 4, 256)
    torch.testing.assert_close(layer(x, y, all_pairs=False), layer(x, y).diagonal(dim1=0, dim2=1).t())
    assert VectorSimilarity(8, 2, bias=False).bias is None
    assert "mode='direction'" in repr(layer)


def test_cpu_backend_is_deterministic():
    x, y, w, b = make_inputs(40, 50, 64, 16, True, torch.device("cpu"), torch.float32)
    runs = [values_and_grads(lambda *a: pairwise_similarity(*a, backend="cpu"), (x, y, w, b), torch.ones(40, 50, 16)) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for g1, g2 in zip(runs[0][1], runs[1][1]):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        (dict(y=torch.randn(3, 5)), ValueError, "y must have size 4 in dim 1"),
        (dict(weight=torch.randn(6, 5)), ValueError, "weight must have size 4 in dim 1"),
        (dict(bias=torch.randn(7)), ValueError, "bias must have size 6"),
        (dict(x=torch.ones(2, 4, dtype=torch.long)), TypeError, "x must be float"),
        (dict(y=torch.randn(3, 4, dtype=torch.float64)), TypeError, "y must have the dtype of x"),
        (dict(weight=torch.randn(6, 4, device="meta")), ValueError, "weight on meta"),
        (dict(mode="angle"), ValueError, "mode must be one of"),
        (dict(aligned=True), ValueError, "aligned pairs need as many x as y rows"),
        (dict(x=torch.randn(4)), ValueError, "x must be 2-D"),
        (dict(x=torch.randn(0, 4)), ValueError, "x must not be empty"),
    ],
)
def test_bad_input_is_named(kwargs, error, words):
    args = dict(x=torch.randn(2, 4), y=torch.randn(3, 4), weight=torch.randn(6, 4), bias=torch.randn(6))
    args.update(kwargs)
    with pytest.raises(error) as info:
        pairwise_similarity(**args)
    assert words in str(info.value)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("aligned", [False, True])
def test_fp16_distance_beyond_fp16s_range_of_squares(backend, aligned):
    """(x - y)^2 passes fp16's largest value (65504) from |x - y| = 256: with features of a few hundred the
    fp16 kernels keep e out of fp16 (TF32 products on fp32 operands) and match the reference in values and
    gradients, where rounding e to fp16 gave inf and then NaN."""
    device = backend_device(backend)
    x, y, weight, bias = make_inputs(6, 6, 24, 16, True, device, torch.float16)
    x, y = (x.float() * 300).half(), (y.float() * 300).half()
    assert ((x[:, None].float() - y[None].float()) ** 2).max() > 65504
    upstream = torch.randn((6, 16) if aligned else (6, 6, 16), device=device)
    got, got_grads = values_and_grads(
        lambda *t: pairwise_similarity(*t, "distance", aligned=aligned, backend=backend), (x, y, weight, bias), upstream)
    want, want_grads = values_and_grads(
        lambda *t: reference.pairwise_similarity(*t, "distance", 1e-8, aligned), (x, y, weight, bias), upstream)
    assert torch.isfinite(got).all() and all(torch.isfinite(g).all() for g in got_grads)
    value_tol, grad_tol = SCALED_TOL[torch.float16]
    assert_scaled_close(got, want, value_tol)
    for g, w in zip(got_grads, want_grads):
        assert_scaled_close(g, w, grad_tol)
