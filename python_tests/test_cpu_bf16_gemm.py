"""bf16 inputs on the CPU: GEMMs in bf16 only where the CPU has bf16 dot instructions.

``cross_attention``, ``pairwise_similarity`` and ``max_sim`` run their forward GEMMs in bf16 on a
CPU with avx512_bf16 or AMX, and convert to fp32 elsewhere (PyTorch's bf16 GEMM without those
instructions is a scalar loop about 100x slower than fp32). ``SGFUSED_CPU_BF16_GEMM=0 / 1`` forces
either path, so both are tested on any machine: each matches the reference, the two differ (the
switch is honoured), and unset picks the path the CPU's capabilities call for. ``max_sim``'s argmax
stays that of the exact dots on the bf16 path: ties of the rounded dots are re-decided exactly.
"""

from __future__ import annotations

import pytest
import torch
from conftest import SCALED_TOL, assert_scaled_close

from sgfused import reference
from sgfused._backend import cpu_bf16_dot
from sgfused.ops import cross_attention, max_sim, pairwise_similarity

VARIABLE = "SGFUSED_CPU_BF16_GEMM"
OPS = ("cross_attention", "pairwise_similarity", "max_sim")
LENS = {"cross_attention": ([6, 3, 1], [5, 2, 4, 1]), "max_sim": ([7, 2, 5], [4, 1, 3, 6])}


def _inputs(op: str) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(7)
    if op == "cross_attention":
        queries = torch.randn(3, 6, 32, generator=generator)
        contexts = torch.randn(4, 5, 32, generator=generator)
        weight = torch.randn(8, 32, generator=generator) / 32**0.5
        return tuple(t.bfloat16() for t in (queries, contexts, weight))
    if op == "max_sim":
        x, y = torch.randn(3, 7, 48, generator=generator), torch.randn(4, 6, 48, generator=generator)
        return x.bfloat16(), y.bfloat16(), None
    x, y = torch.randn(5, 64, generator=generator), torch.randn(4, 64, generator=generator)
    weight = torch.randn(16, 64, generator=generator) / 8
    return tuple(t.bfloat16() for t in (x, y, weight))


def _ours(op: str, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    a, b, weight = inputs
    if op == "max_sim":
        return max_sim(a, b, *LENS[op], backend="cpu")
    if op == "cross_attention":
        lens_a, lens_b = (torch.tensor(lens) for lens in LENS[op])
        return cross_attention(a, b, query_lens=lens_a, context_lens=lens_b, epilogue="distance", weight=weight,
                               backend="cpu")
    return pairwise_similarity(a, b, weight, None, mode="distance", backend="cpu")


def _reference(op: str, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    a, b, weight = (None if t is None else t.float() for t in inputs)
    if op == "max_sim":
        return reference.max_sim(a, b, *(torch.tensor(lens) for lens in LENS[op]), False)[0]
    if op == "cross_attention":
        lens_a, lens_b = (torch.tensor(lens) for lens in LENS[op])
        return reference.cross_attention(a, b, lens_a, lens_b, 9.0, 0.1, "clipped_l2", "distance", weight, None, 1e-8)
    return reference.pairwise_similarity(a, b, weight, None, "distance")


def _run(op: str, setting: str | None, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    if setting is None:
        monkeypatch.delenv(VARIABLE, raising=False)
    else:
        monkeypatch.setenv(VARIABLE, setting)
    return _ours(op, _inputs(op))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("setting", ["0", "1"])
def test_both_gemm_paths_match_the_reference(op, setting, monkeypatch):
    got = _run(op, setting, monkeypatch)
    assert got.dtype == (torch.float32 if op == "max_sim" else torch.bfloat16)
    assert_scaled_close(got, _reference(op, _inputs(op)), SCALED_TOL[torch.bfloat16][0])


@pytest.mark.parametrize("op", OPS)
def test_the_switch_is_honoured_and_unset_follows_the_cpu(op, monkeypatch):
    in_fp32, in_bf16 = _run(op, "0", monkeypatch), _run(op, "1", monkeypatch)
    assert not torch.equal(in_fp32, in_bf16)  # bf16 GEMMs round the intermediates: the paths differ
    assert torch.equal(_run(op, None, monkeypatch), in_bf16 if cpu_bf16_dot() else in_fp32)


def test_a_bad_setting_is_refused(monkeypatch):
    monkeypatch.setenv(VARIABLE, "yes")
    with pytest.raises(RuntimeError, match="SGFUSED_CPU_BF16_GEMM must be 0 or 1 \\(or unset\\), got 'yes'"):
        _ours("pairwise_similarity", _inputs("pairwise_similarity"))


@pytest.mark.parametrize("setting", ["0", "1"])
def test_max_sim_indices_and_gradients_are_those_of_the_exact_dots(setting, monkeypatch):
    """Both paths: the argmax of every caption node equals the fp32 reference's, so the gradients do."""
    monkeypatch.setenv(VARIABLE, setting)
    x, y, _ = _inputs("max_sim")
    x_lens, y_lens = (torch.tensor(lens) for lens in LENS["max_sim"])
    upstream = torch.rand(3, 4, generator=torch.Generator().manual_seed(1)) + 0.5
    results = []
    for backend in ("cpu", "reference"):
        leaves = [t.float().requires_grad_() if backend == "reference" else t.clone().requires_grad_() for t in (x, y)]
        scores, indices = max_sim(*leaves, x_lens, y_lens, return_indices=True, backend=backend)
        results.append((indices, *torch.autograd.grad((scores * upstream).sum(), leaves)))
    (got_indices, *got_grads), (want_indices, *want_grads) = results
    assert torch.equal(got_indices, want_indices)
    for got, want in zip(got_grads, want_grads):
        assert_scaled_close(got, want, SCALED_TOL[torch.bfloat16][1])


@pytest.mark.parametrize("setting", ["0", "1"])
@pytest.mark.parametrize("order", ["larger first", "larger second"])
def test_max_sim_ties_of_the_rounded_dots_go_to_the_exact_max(setting, order, monkeypatch):
    """<y, x_0> = 256 and <y, x_1> = 256 + 2^-6 round to the same bf16 value (its step at 256 is 2):
    the index is the node with the larger exact dot, wherever it stands."""
    monkeypatch.setenv(VARIABLE, setting)
    nodes = [[256.0, 0.0], [256.0, 2.0**-6], [-256.0, 0.0]]
    if order == "larger first":
        nodes[0], nodes[1] = nodes[1], nodes[0]
    x = torch.tensor([nodes], dtype=torch.bfloat16)
    y = torch.tensor([[[1.0, 1.0]]], dtype=torch.bfloat16)
    scores, indices = max_sim(x, y, [3], [1], return_indices=True, backend="cpu")
    assert indices.item() == (0 if order == "larger first" else 1)
    assert abs(scores.item() - 256.0) <= 2.0**-6


def test_the_detection_agrees_with_torchs_cpuinfo():
    """The extension's answer (what the kernels go by) is what torch's cpuinfo reports."""
    capabilities = torch._C._cpu._get_cpu_capability()
    assert cpu_bf16_dot() == next((name for name in ("amx_bf16", "avx512_bf16") if capabilities.get(name)), None)
