"""cross_attention: every backend against the reference, padding, gradients, opcheck, compile, bad input.

Tolerances are relative to the largest reference magnitude (see test_pairwise_similarity):
fp32 1e-5 values / 1e-4 gradients, fp16 5e-3, bf16 3e-2.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (KERNEL_BACKENDS, SCALED_TOL, TF32_TOL, assert_scaled_close, assert_tf32_reached_the_kernels,
                      backend_device, tf32_rounded)

from sgfused import reference
from sgfused.nn import CrossAttentionSimilarity
from sgfused.ops import cross_attention

EPILOGUES = ("context", "cosine", "distance", "direction")
# (Nq, Lq, Nc, Lc, d, m); Lq != Lc, odd d
SHAPES = [(1, 1, 1, 1, 3, 1), (3, 5, 2, 7, 17, 8), (4, 12, 3, 9, 32, 16)]


def make(nq, lq, nc, lc, d, m, epilogue, lengths, device, dtype, bias=True):
    queries = torch.randn(nq, lq, d, device=device).to(dtype)
    contexts = torch.randn(nc, lc, d, device=device).to(dtype)
    if lengths == "full":
        q_lens, c_lens = torch.full((nq,), lq), torch.full((nc,), lc)
    elif lengths == "one":
        q_lens, c_lens = torch.ones(nq, dtype=torch.long), torch.ones(nc, dtype=torch.long)
    else:
        q_lens, c_lens = torch.randint(1, lq + 1, (nq,)), torch.randint(1, lc + 1, (nc,))
        q_lens[0], c_lens[0] = lq, lc
    weight = b = None
    if epilogue in ("distance", "direction"):
        weight = (torch.randn(m, d, device=device) / d**0.5).to(dtype)
        b = (0.1 * torch.randn(m, device=device)).to(dtype) if bias else None
    return queries, contexts, q_lens.to(device), c_lens.to(device), weight, b


def run(fn, tensors, upstream):
    queries, contexts, q_lens, c_lens, weight, bias = tensors
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (queries, contexts, weight, bias)]
    out = fn(leaves[0], leaves[1], q_lens, c_lens, leaves[2], leaves[3])
    present = [t for t in leaves if t is not None]
    return out, torch.autograd.grad((out.float() * upstream).sum(), present)


def ours(backend, norm, epilogue):
    return lambda q, c, ql, cl, w, b: cross_attention(
        q, c, query_lens=ql, context_lens=cl, norm=norm, epilogue=epilogue, weight=w, bias=b, backend=backend
    )


def ref(norm, epilogue):
    return lambda q, c, ql, cl, w, b: reference.cross_attention(q, c, ql, cl, 9.0, 0.1, norm, epilogue, w, b, 1e-8)


def check(backend, shape, norm, epilogue, lengths, dtype, bias=True):
    device = backend_device(backend)
    tensors = make(*shape, epilogue, lengths, device, dtype, bias)
    with torch.no_grad():
        upstream = torch.randn(ref(norm, epilogue)(*tensors).shape, device=device)
    got, got_grads = run(ours(backend, norm, epilogue), tensors, upstream)
    want, want_grads = run(ref(norm, epilogue), tensors, upstream)
    value_tol, grad_tol = SCALED_TOL[dtype]
    m = shape[-1]
    if m == 1 and epilogue in ("distance", "direction"):  # a step at z = 0: see test_pairwise_similarity
        wide = tuple(t.double() if t is not None and t.is_floating_point() else t for t in tensors)
        got, got_grads = run(ours(backend, norm, epilogue), wide, upstream)
        want, want_grads = run(ref(norm, epilogue), wide, upstream)
        value_tol, grad_tol = SCALED_TOL[torch.float64]
    assert got.dtype == want.dtype
    assert_scaled_close(got, want, value_tol)
    for g, w in zip(got_grads, want_grads):
        assert_scaled_close(g, w, grad_tol)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("norm", ["clipped_l2", "none"])
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("lengths", ["full", "one", "mixed"])
def test_matches_reference_fp32(backend, shape, norm, epilogue, lengths):
    check(backend, shape, norm, epilogue, lengths, torch.float32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(backend, epilogue, dtype):
    check(backend, (3, 6, 2, 5, 16, 8), "clipped_l2", epilogue, "mixed", dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_backward_kernels_return_what_their_fake_kernels_say(backend, dtype):
    """The empty grad_weight / grad_bias of an epilogue without W come in the inputs' dtype from every kernel, as
    the fake kernel (what torch.compile plans with) says; the C++ kernel once returned them in fp32."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    device = backend_device(backend)
    variant = {"triton": "_triton"}.get(backend, "")
    forward = getattr(torch.ops.sgfused, f"cross_attention_forward{variant}")
    backward = getattr(torch.ops.sgfused, f"cross_attention_backward{variant}")
    queries, contexts, q_lens, c_lens, _, _ = make(2, 4, 3, 5, 8, 4, "cosine", "mixed", device, dtype)
    args = (queries, contexts, q_lens, c_lens, 9.0, 0.1, "clipped_l2", "cosine", None, None, 1e-8)
    out, stats = forward(*args)
    real = backward(torch.randn_like(out), *args, out, stats)
    with FakeTensorMode() as mode:
        fake = backward(*[mode.from_tensor(t) if torch.is_tensor(t) else t for t in (out, *args, out, stats)])
    assert [(t.dtype, t.shape) for t in real] == [(t.dtype, t.shape) for t in fake]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fp16_distance_beyond_fp16s_range_of_squares(backend):
    """The distance feature (ctx - q)^2 passes fp16's largest value (65504) from |ctx - q| = 256: with query
    features of a few hundred the fp16 kernels keep it out of fp16 and match the reference in values and
    gradients, where rounding it to fp16 gave inf and then NaN. The contexts' gradient comes from d_ctx, which
    grows with ctx - q (about 400 here) and is rounded to fp16 for the tensor cores before the l2norm
    backward projects most of it away, so it keeps bf16's tolerance (2.3e-2 of its scale measured here)."""
    device = backend_device(backend)
    queries, contexts, q_lens, c_lens, weight, bias = make(3, 5, 2, 6, 24, 8, "distance", "mixed", device,
                                                            torch.float16)
    queries = (queries.float() * 400).half()
    assert queries.abs().max() > 257
    tensors = (queries, contexts, q_lens, c_lens, weight, bias)
    with torch.no_grad():
        upstream = torch.randn(ref("clipped_l2", "distance")(*tensors).shape, device=device)
    got, got_grads = run(ours(backend, "clipped_l2", "distance"), tensors, upstream)
    want, want_grads = run(ref("clipped_l2", "distance"), tensors, upstream)
    assert torch.isfinite(got).all() and all(torch.isfinite(g).all() for g in got_grads)
    value_tol, grad_tol = SCALED_TOL[torch.float16]
    assert_scaled_close(got, want, value_tol)
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert_scaled_close(g, w, SCALED_TOL[torch.bfloat16][1] if i == 1 else grad_tol)


@pytest.mark.parametrize("epilogue", ["distance", "direction"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backward_in_launches_of_a_few_query_sets_matches_one_launch(epilogue, dtype, monkeypatch):
    """With a W epilogue the Triton dQ backward runs in launches of as many query sets as fit
    WEIGHT_ROWS_BYTES (each writes its pairs' e and dz rows, and grad_weight adds their product): 5 query
    sets in launches of 2, 2 and 1 give the gradients of a single launch and of the reference."""
    from sgfused.triton import cross_attention as kernels

    device = backend_device("triton")
    shape = (5, 4, 3, 6, 24, 8)
    tensors = make(*shape, epilogue, "mixed", device, dtype)
    with torch.no_grad():
        upstream = torch.randn(ref("clipped_l2", epilogue)(*tensors).shape, device=device)
    _, whole = run(ours("triton", "clipped_l2", epilogue), tensors, upstream)
    # Nc x Lq x max(d, m) x the rows' bytes: bf16 where the kernels hand bf16 to tl.dot (the sm_90 compile check),
    # fp32 in the interpreter
    per_a = 3 * 4 * 24 * (dtype.itemsize if kernels.native_dot(dtype, device) else 4)
    monkeypatch.setattr(kernels, "WEIGHT_ROWS_BYTES", 2 * per_a)
    launches = []
    launch = kernels._backward_kernel.__getitem__
    monkeypatch.setattr(kernels, "_backward_kernel", type("Counted", (), {
        "__getitem__": lambda self, grid: launches.append(grid) or launch(grid)})())
    _, split = run(ours("triton", "clipped_l2", epilogue), tensors, upstream)
    assert [grid[0] for grid in launches] == [2, 2, 1, 3]  # three dQ launches, then the dC one
    for got, want in zip(split, whole):
        assert_scaled_close(got, want, 1e-6)
    _, want = run(ref("clipped_l2", epilogue), tensors, upstream)
    for got, w in zip(split, want):
        assert_scaled_close(got, w, SCALED_TOL[dtype][1])


@pytest.mark.parametrize("epilogue, dtype", [("distance", torch.bfloat16), ("direction", torch.float16),
                                             ("direction", torch.bfloat16)])
def test_triton_pairs_sharing_a_program_match_one_pair_per_program(epilogue, dtype, monkeypatch):
    """With a W epilogue and 16-bit inputs a Triton forward program takes several context sets b at once (GROUP_ROWS);
    7 of them in groups of 4 leave a partial group, and every b has its own length. The grouped forward
    (values and the log-sum-exp the backward reads) equals the one-pair-per-program forward, and the
    gradients through it match the reference. (fp16 distance, whose products take fp32 operands, is not
    grouped.)"""
    from sgfused.triton import cross_attention as kernels

    device = backend_device("triton")
    tensors = make(3, 5, 7, 6, 24, 8, epilogue, "mixed", device, dtype)
    queries, contexts, q_lens, c_lens, weight, bias = tensors
    args = (queries, contexts, q_lens, c_lens, 9.0, 0.1, "clipped_l2", epilogue, weight, bias, 1e-8)
    assert kernels._Setup(*args).group == 4
    if epilogue == "direction":  # fp16 distance takes fp32 operands, and is not grouped
        wide = make(3, 5, 7, 6, 24, 8, "distance", "mixed", device, torch.float16)
        assert kernels._Setup(*wide[:4], 9.0, 0.1, "clipped_l2", "distance", *wide[4:], 1e-8).group == 1
    assert kernels._Setup(*(t.float() if torch.is_tensor(t) and t.is_floating_point() else t for t in args)).group == 1
    grouped = kernels.forward(*args)
    monkeypatch.setattr(kernels, "GROUP_ROWS", 16)
    assert kernels._Setup(*args).group == 1
    single = kernels.forward(*args)
    for got, want in zip(grouped, single):
        assert_scaled_close(got, want, 1e-6)
    monkeypatch.undo()
    check("triton", (3, 5, 7, 6, 24, 8), "clipped_l2", epilogue, "mixed", dtype)


def test_cuda_fp16_under_fp16_accumulation(monkeypatch):
    """torch's fp16-accumulation flag makes mm / bmm's out_dtype overloads refuse fp16: the CUDA kernel
    then runs its fp16 GEMMs on fp32 operands and still matches the reference."""
    backend_device("cuda")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_fp16_accumulation", True)
    for epilogue in ("context", "distance"):
        check("cuda", (3, 6, 2, 5, 16, 8), "clipped_l2", epilogue, "mixed", torch.float16)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("epilogue", ["context", "distance"])
def test_tf32_when_allowed(backend, epilogue, tf32_launches):
    """Under torch.set_float32_matmul_precision("high") the GPU backends may take TF32 products, as
    torch.matmul does: values and gradients stay within TF32's error of the fp64 reference."""
    device = backend_device(backend)
    tensors = make(4, 12, 3, 9, 32, 16, epilogue, "mixed", torch.device("cpu"), torch.float32)
    tensors = tuple(None if t is None else (tf32_rounded(t) if t.is_floating_point() else t).to(device) for t in tensors)
    wide = tuple(t.double() if t is not None and t.is_floating_point() else t for t in tensors)
    with torch.no_grad():
        upstream = tf32_rounded(torch.randn(ref("clipped_l2", epilogue)(*wide).shape)).to(device)
    got, got_grads = run(ours(backend, "clipped_l2", epilogue), tensors, upstream)
    want, want_grads = run(ref("clipped_l2", epilogue), wide, upstream.double())
    assert_tf32_reached_the_kernels(backend, tf32_launches)
    assert got.dtype == torch.float32
    assert_scaled_close(got, want, TF32_TOL)
    for g, w in zip(got_grads, want_grads):
        assert_scaled_close(g, w, TF32_TOL)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_without_bias(backend):
    check(backend, (2, 4, 3, 5, 8, 4), "clipped_l2", "distance", "mixed", torch.float32, bias=False)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_image_to_text_role_swap(backend):
    """Regions attend over words: the same op with the roles swapped, and the published per-image loop agrees."""
    device = backend_device(backend)
    regions = torch.randn(2, 6, 8, device=device, dtype=torch.float64)
    words = torch.randn(3, 5, 8, device=device, dtype=torch.float64)
    word_lens = torch.tensor([5, 2, 3], device=device)
    out = cross_attention(regions, words, context_lens=word_lens, epilogue="context", backend=backend)  # (2, 3, 6, 8)
    for b in range(3):  # SCAN i2t: for caption b, every image's regions attend over its n valid words
        n = int(word_lens[b])
        attn = torch.bmm(words[b : b + 1, :n].expand(2, n, 8), regions.transpose(1, 2))  # (2, n, 6)
        attn = torch.nn.functional.leaky_relu(attn, 0.1)
        attn = attn / (attn.norm(dim=2, keepdim=True) + 1e-8)
        attn = torch.softmax(attn.transpose(1, 2) * 9.0, dim=2)  # (2, 6, n)
        ctx = torch.bmm(attn, words[b : b + 1, :n].expand(2, n, 8))
        ctx = ctx / (ctx.norm(dim=2, keepdim=True) + 1e-8)
        torch.testing.assert_close(out[:, b], ctx)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_padding_never_changes_valid_outputs(backend, epilogue):
    device = backend_device(backend)
    queries, contexts, q_lens, c_lens, weight, bias = make(3, 6, 4, 7, 8, 4, epilogue, "mixed", device, torch.float32)
    q_lens[1], c_lens[2] = 2, 3
    kwargs = dict(query_lens=q_lens, context_lens=c_lens, epilogue=epilogue, weight=weight, bias=bias, backend=backend)
    clean = cross_attention(queries, contexts, **kwargs)
    noisy_q, noisy_c = queries.clone(), contexts.clone()
    for a, n in enumerate(q_lens.tolist()):
        noisy_q[a, n:] = 1e3 * torch.randn_like(noisy_q[a, n:])
    for b, n in enumerate(c_lens.tolist()):
        noisy_c[b, n:] = 1e3 * torch.randn_like(noisy_c[b, n:])
    leaves = [noisy_q.requires_grad_(True), noisy_c.requires_grad_(True)]
    noisy = cross_attention(*leaves, **kwargs)
    torch.testing.assert_close(noisy, clean, rtol=1e-5, atol=1e-6)
    for a, n in enumerate(q_lens.tolist()):
        assert torch.equal(noisy[a, :, n:], torch.zeros_like(noisy[a, :, n:]))
    noisy.sum().backward()
    for a, n in enumerate(q_lens.tolist()):
        assert torch.equal(leaves[0].grad[a, n:], torch.zeros_like(leaves[0].grad[a, n:]))
    for b, n in enumerate(c_lens.tolist()):
        assert torch.equal(leaves[1].grad[b, n:], torch.zeros_like(leaves[1].grad[b, n:]))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("norm", ["clipped_l2", "none"])
def test_gradcheck_float64(backend, epilogue, norm):
    device = backend_device(backend)
    queries, contexts, q_lens, c_lens, weight, bias = make(2, 3, 2, 4, 5, 3, epilogue, "mixed", device, torch.float64)
    inputs = [t.requires_grad_(True) for t in (queries, contexts, weight, bias) if t is not None]

    def fn(*args):
        w, b = (args[2], args[3]) if len(args) == 4 else (None, None)
        return cross_attention(args[0], args[1], query_lens=q_lens, context_lens=c_lens, norm=norm,
                               epilogue=epilogue, weight=w, bias=b, backend=backend)

    # The Triton interpreter runs one forward per Jacobian column; fast mode checks a random
    # projection of the Jacobian instead (it still fails on any wrong gradient), the C++ backend
    # keeps the full check.
    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-5, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_opcheck(backend, epilogue):
    device = backend_device(backend)
    suffix = "_triton" if backend == "triton" else ""
    queries, contexts, q_lens, c_lens, weight, bias = make(2, 3, 3, 4, 5, 2, epilogue, "mixed", device, torch.float32)
    args = [queries.requires_grad_(True), contexts.requires_grad_(True), q_lens, c_lens, 9.0, 0.1, "clipped_l2",
            epilogue, weight.requires_grad_(True) if weight is not None else None,
            bias.requires_grad_(True) if bias is not None else None, 1e-8]
    forward = getattr(torch.ops.sgfused, f"cross_attention_forward{suffix}")
    torch.library.opcheck(forward, tuple(args))
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    out, stats = forward(*detached)
    backward = getattr(torch.ops.sgfused, f"cross_attention_backward{suffix}")
    torch.library.opcheck(backward, (torch.randn_like(out), *detached, out, stats))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_module_runs_under_torch_compile(backend):
    device = backend_device(backend)
    layer = CrossAttentionSimilarity(8, 4, backend=backend).to(device)
    words, regions = torch.randn(3, 5, 8, device=device), torch.randn(2, 6, 8, device=device)
    lens = torch.tensor([5, 3, 1], device=device)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    eager = layer(words, regions, lens)
    torch.testing.assert_close(compiled(words, regions, lens), eager)
    assert eager.shape == (3, 2, 5, 4)
    compiled(words, regions, lens).sum().backward()
    assert torch.isfinite(layer.weight.grad).all()


def test_module_rejects_epilogues_without_weights():
    with pytest.raises(ValueError, match="epilogue must be 'distance' or 'direction'"):
        CrossAttentionSimilarity(8, 4, epilogue="cosine")
    assert "epilogue='direction'" in repr(CrossAttentionSimilarity(8, 4, epilogue="direction"))


def test_cpu_backend_is_deterministic():
    tensors = make(4, 7, 5, 6, 16, 8, "distance", "mixed", torch.device("cpu"), torch.float32)
    upstream = torch.randn(4, 5, 7, 8)
    first = run(ours("cpu", "clipped_l2", "distance"), tensors, upstream)
    second = run(ours("cpu", "clipped_l2", "distance"), tensors, upstream)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


@pytest.mark.parametrize(
    "change,error,words",
    [
        (dict(query_lens=torch.tensor([4, 1])), ValueError, "query_lens must lie in [1, 3]"),
        (dict(context_lens=torch.tensor([0, 2, 2])), ValueError, "context_lens must lie in [1, 4]"),
        (dict(query_lens=torch.tensor([1, 2, 3])), ValueError, "query_lens must have size 2"),
        (dict(contexts=torch.randn(3, 4, 6)), ValueError, "contexts must have size 5 in dim 2"),
        (dict(weight=None), ValueError, "needs weight"),
        (dict(epilogue="context"), ValueError, "takes no weight or bias"),
        (dict(epilogue="dot"), ValueError, "epilogue must be one of"),
        (dict(norm="l1"), ValueError, "norm must be one of"),
        (dict(weight=torch.randn(2, 4)), ValueError, "weight must have size 5 in dim 1"),
        (dict(bias=torch.randn(3)), ValueError, "bias must have size 2"),
        (dict(contexts=torch.randn(3, 4, 5, dtype=torch.float64)), TypeError, "contexts must have the dtype"),
        (dict(queries=torch.ones(2, 3, 5, dtype=torch.long)), TypeError, "queries must be float"),
        (dict(query_lens=torch.tensor([1.0, 2.0])), TypeError, "query_lens must be an integer tensor"),
        (dict(contexts=torch.randn(3, 4, 5, device="meta")), ValueError, "contexts on meta"),
        (dict(queries=torch.randn(2, 5)), ValueError, "queries must be 3-D"),
    ],
)
def test_bad_input_is_named(change, error, words):
    args = dict(queries=torch.randn(2, 3, 5), contexts=torch.randn(3, 4, 5), epilogue="distance",
                weight=torch.randn(2, 5), bias=torch.randn(2))
    args.update(change)
    if args["weight"] is None:
        args["bias"] = None
    with pytest.raises(error) as info:
        cross_attention(**args)
    assert words in str(info.value)


@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_cpu_forward_with_several_work_items(epilogue):
    """Enough query sets for several work items (so several threads when there are cores), leaves requiring grad."""
    torch.manual_seed(0)
    tensors = make(41, 6, 5, 7, 16, 8, epilogue, "mixed", torch.device("cpu"), torch.float32)
    with torch.no_grad():
        upstream = torch.randn(ref("clipped_l2", epilogue)(*tensors).shape)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got, got_grads = run(ours("cpu", "clipped_l2", epilogue), tensors, upstream)
    finally:
        torch.set_num_threads(threads)
    want, want_grads = run(ref("clipped_l2", epilogue), tensors, upstream)
    value_tol, grad_tol = SCALED_TOL[torch.float32]
    assert_scaled_close(got, want, value_tol)
    for g, w in zip(got_grads, want_grads):
        assert_scaled_close(g, w, grad_tol)
