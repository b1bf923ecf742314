"""Bad input on the ops (issue 16): padding garbage never leaks, checks hold under torch.compile,
non-finite options are refused, lengths / ids as lists, the README's loss snippet runs as written.

Every backend that runs here is tested (cpu, triton in interpreter mode, reference). Compiled
graphs use the "aot_eager" backend: it removes an operator whose output is unused, as Inductor
does (a check op called for its side effect alone does not raise there), without compiling C++.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftest import backend_device
from sgfused import reference
from sgfused.ops import cross_attention, hardest_negative_loss, hardest_negative_loss_from_embeddings
from sgfused.ops import pairwise_similarity

BACKENDS = ("cpu", "triton", "reference")
GARBAGE = (float("nan"), float("inf"), float("-inf"), 1e30)
README = Path(__file__).resolve().parents[1] / "README.md"


def _device(backend: str) -> torch.device:
    return torch.device("cpu") if backend == "reference" else backend_device(backend)


def _attention_grads(backend, queries, contexts, q_lens, c_lens, epilogue, upstream):
    q = queries.clone().requires_grad_()
    c = contexts.clone().requires_grad_()
    out = cross_attention(q, c, query_lens=q_lens, context_lens=c_lens, epilogue=epilogue, backend=backend)
    (out * upstream).sum().backward()
    return out.detach(), q.grad, c.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("epilogue", ["context", "cosine"])
def test_padding_garbage_never_reaches_results_or_gradients(backend, epilogue):
    """NaN, +-inf and 1e30 at padded context and query positions: results and gradients as with zeros there."""
    device = _device(backend)
    generator = torch.Generator().manual_seed(3)
    clean_q = torch.randn(2, 3, 8, generator=generator).to(device)
    clean_c = torch.randn(2, 4, 8, generator=generator).to(device)
    q_lens, c_lens = torch.tensor([3, 1], device=device), torch.tensor([3, 2], device=device)
    clean_q[1, 1:] = 0.0
    clean_c[0, 3:] = 0.0
    clean_c[1, 2:] = 0.0
    queries, contexts = clean_q.clone(), clean_c.clone()
    queries[1, 1], queries[1, 2] = 1e30, float("nan")
    contexts[0, 3], contexts[1, 2], contexts[1, 3, :4], contexts[1, 3, 4:] = GARBAGE[0], GARBAGE[1], GARBAGE[2], 1e30
    upstream_shape = (2, 2, 3) if epilogue == "cosine" else (2, 2, 3, 8)
    upstream = torch.randn(upstream_shape, generator=generator).to(device)
    got = _attention_grads(backend, queries, contexts, q_lens, c_lens, epilogue, upstream)
    want = _attention_grads(backend, clean_q, clean_c, q_lens, c_lens, epilogue, upstream)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    assert (got[1][1, 1:] == 0).all() and (got[2][0, 3:] == 0).all() and (got[2][1, 2:] == 0).all()


def _nan_scores() -> torch.Tensor:
    scores = torch.randn(3, 3)
    scores[1, 2] = float("nan")
    return scores


def _scores_loss(backend: str, scores: torch.Tensor) -> torch.Tensor:
    return hardest_negative_loss(scores, backend=backend)


def _embed_loss(backend: str, img: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    return hardest_negative_loss_from_embeddings(img, cap, backend=backend)


def _attention_with_lens(backend: str, queries: torch.Tensor, contexts: torch.Tensor, lens: torch.Tensor):
    return cross_attention(queries, contexts, query_lens=lens, backend=backend)


def _bad_call(case: str, device: torch.device):
    """(function, its tensor arguments, words of the error)."""
    if case == "nan scores":
        return _scores_loss, (_nan_scores().to(device),), "scores contains NaN (first at index (1, 2))"
    if case == "inf scores":
        infinite = torch.full((2, 2), float("inf"), device=device)
        return _scores_loss, (infinite,), "scores contains inf (first at index (0, 0))"
    if case == "nan embeddings":
        cap = torch.randn(3, 4)
        cap[:, 2] = float("nan")
        return _embed_loss, (torch.randn(3, 4).to(device), cap.to(device)), "cap contains NaN (first at index (0, 2))"
    value = {"zero length": 0, "negative length": -1, "long length": 4}[case]
    low, high = min(value, 2), max(value, 2)
    args = (torch.randn(2, 3, 4).to(device), torch.randn(2, 5, 4).to(device), torch.tensor([2, value], device=device))
    words = f"query_lens must lie in [1, 3] (the padded length), got values in [{low}, {high}]"
    return _attention_with_lens, args, words


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case,compiled",
    [("nan scores", True), ("zero length", True), ("inf scores", False), ("nan embeddings", False),
     ("negative length", False), ("long length", False)],
)
def test_compiled_calls_refuse_what_eager_refuses(backend, case, compiled):
    fn, args, words = _bad_call(case, _device(backend))
    with pytest.raises(ValueError) as eager:
        fn(backend, *args)
    assert words in str(eager.value)
    if compiled:
        torch._dynamo.reset()
        try:
            with pytest.raises(ValueError) as traced:
                torch.compile(fn, fullgraph=True, backend="aot_eager")(backend, *args)
        finally:
            torch._dynamo.reset()
        assert str(traced.value) == str(eager.value)


OPTIONS = [
    (lambda b, d: hardest_negative_loss(torch.randn(3, 3, device=d), margin=float("nan"), backend=b), "margin"),
    (lambda b, d: hardest_negative_loss(torch.randn(3, 3, device=d), margin=float("inf"), backend=b), "margin"),
    (lambda b, d: hardest_negative_loss(torch.randn(3, 3, device=d), margin=1e39, backend=b), "margin"),
    (lambda b, d: hardest_negative_loss_from_embeddings(torch.randn(3, 4, device=d), torch.randn(3, 4, device=d),
                                                        margin=float("nan"), backend=b), "margin"),
    *[
        (lambda b, d, option=option, value=value: cross_attention(
            torch.randn(1, 2, 4, device=d), torch.randn(1, 3, 4, device=d), backend=b, **{option: value}), option)
        for option, values in dict(smooth=[float("nan"), float("inf"), 0.0, -1.0, 1e8, 1e39],
                                   leaky=[float("nan"), -0.1, 2.0],
                                   eps=[float("nan"), 0.0, -1e-8, float("inf")]).items()
        for value in values
    ],
    (lambda b, d: pairwise_similarity(torch.randn(2, 4, device=d), torch.randn(2, 4, device=d),
                                      torch.randn(3, 4, device=d), eps=float("nan"), backend=b), "eps"),
    (lambda b, d: pairwise_similarity(torch.randn(2, 4, device=d), torch.randn(2, 4, device=d),
                                      torch.randn(3, 4, device=d), eps=-1.0, backend=b), "eps"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index", range(len(OPTIONS)))
def test_non_finite_or_out_of_range_options_are_refused(backend, index):
    call, name = OPTIONS[index]
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number in [\[(].*, got "):
        call(backend, _device(backend))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_largest_smooth_keeps_fp32_gradients_exact(backend):
    """At the bound (smooth = 1000) the fp32 kernels' gradients stay close to the fp64 reference."""
    device = _device(backend)
    generator = torch.Generator().manual_seed(5)
    queries, contexts = torch.randn(2, 3, 8, generator=generator), torch.randn(2, 4, 8, generator=generator)
    upstream = torch.randn(2, 2, 3, 8, generator=generator)
    lens = torch.tensor([3, 2])
    q64, c64 = queries.double().requires_grad_(), contexts.double().requires_grad_()
    out64 = cross_attention(q64, c64, query_lens=lens, context_lens=lens + 1, smooth=1000.0, backend="reference")
    (out64 * upstream.double()).sum().backward()
    q32, c32 = queries.clone().to(device).requires_grad_(), contexts.clone().to(device).requires_grad_()
    out32 = cross_attention(q32, c32, query_lens=lens.to(device), context_lens=lens.to(device) + 1, smooth=1000.0,
                            backend=backend)
    (out32 * upstream.to(device)).sum().backward()
    for g, w in ((out32, out64), (q32.grad, q64.grad), (c32.grad, c64.grad)):
        error = (g.double().cpu() - w.detach()).abs().max().item()
        assert error <= 1e-2 * max(w.abs().max().item(), 1.0), error


@pytest.mark.parametrize("backend", BACKENDS)
def test_lengths_and_ids_as_lists_equal_tensors(backend):
    device = _device(backend)
    generator = torch.Generator().manual_seed(1)
    queries, contexts = torch.randn(2, 3, 4, generator=generator), torch.randn(3, 5, 4, generator=generator)
    queries, contexts = queries.to(device), contexts.to(device)
    as_list = cross_attention(queries, contexts, query_lens=[3, 1], context_lens=(5, 2, 4), backend=backend)
    as_tensor = cross_attention(queries, contexts, query_lens=torch.tensor([3, 1], device=device),
                                context_lens=torch.tensor([5, 2, 4], device=device), backend=backend)
    torch.testing.assert_close(as_list, as_tensor, rtol=0, atol=0)
    scores = torch.randn(2, 4, generator=generator).to(device)
    listed = hardest_negative_loss(scores, img_ids=[0, 1], cap_img_ids=[0, 0, 1, 1], backend=backend)
    tensors = hardest_negative_loss(scores, img_ids=torch.tensor([0, 1], device=device),
                                    cap_img_ids=torch.tensor([0, 0, 1, 1], device=device), backend=backend)
    torch.testing.assert_close(listed, tensors, rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"query_lens must be an integer tensor or a list of ints, got \[1.5\]"):
        cross_attention(queries[:1], contexts, query_lens=[1.5], backend=backend)


def _raw_attention(suffix: str, query_lens: torch.Tensor):
    op = getattr(torch.ops.sgfused, f"cross_attention_forward{suffix}")
    return op(torch.randn(1, 3, 4), torch.randn(1, 2, 4), query_lens, torch.tensor([2]), 9.0, 0.1, "clipped_l2",
              "context", None, None, 1e-8)


def _raw_loss(suffix: str, img_ids: torch.Tensor):
    op = getattr(torch.ops.sgfused, f"hardest_negative_forward{suffix}")
    return op(torch.randn(2, 2), img_ids, torch.arange(2), 0.2, True)


@pytest.mark.parametrize(
    "call,arg,error",
    [
        (_raw_attention, torch.tensor([0]), ValueError),
        (_raw_attention, torch.tensor([4]), ValueError),
        (_raw_attention, torch.tensor([1, 2]), ValueError),
        (_raw_attention, torch.tensor([1], dtype=torch.int32), RuntimeError),
        (_raw_loss, torch.arange(2.0), RuntimeError),
        (_raw_loss, torch.arange(3), ValueError),
    ],
)
def test_raw_triton_operators_check_like_the_compiled_ones(call, arg, error):
    backend_device("triton")
    with pytest.raises(error) as compiled:
        call("", arg)
    with pytest.raises(error) as triton:
        call("_triton", arg)
    assert str(triton.value) == str(compiled.value)


def test_readme_hardest_negative_snippet_runs_as_written():
    text = README.read_text()
    section = text[text.index("### `hardest_negative_loss`"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "HardestNegativeLoss" in snippet and "cap_img_ids=cap_ids" in snippet
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    loss, ids, cap_ids = namespace["loss"], namespace["ids"], namespace["cap_ids"]
    assert torch.isfinite(loss)
    want = reference.hardest_negative_terms(namespace["scores"], ids, cap_ids, 0.2, True)[0].sum()
    got = namespace["criterion"](namespace["scores"], img_ids=ids, cap_img_ids=cap_ids)
    torch.testing.assert_close(got, want)
