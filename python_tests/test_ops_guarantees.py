"""The README's "Install" and "Ops" promises that no other test file guards.

Each test names the promise it holds the code to: build_info()'s keys and the torch-version guard
on import; the backend order of ``backend="auto"`` for CUDA tensors, and ``SGFUSED_BACKEND`` reaching
every op; one-line errors (the same under torch.compile, and what ``fullgraph=True`` does with them);
the documented bounds of the scalar options; NaN / inf named in image embeddings and by the raw
operators; ids as lists for the embedding entry point; padding garbage under the learned
cross-attention epilogues; the loss dtype (float32 whatever the input, no fp16 overflow);
non-contiguous input and deterministic gradients on every backend; the drop-in loss module's
options; the memory promises (O(N) for the embedding loss, no (Nx, Ny, d) / (Nx, Ny, Ly, Lx) table,
no stored attention); torch.compile of the embedding entry point. Triton shapes stay tiny (the
interpreter runs them on the CPU).
"""

from __future__ import annotations

import pytest
import torch
from conftest import backend_device, bench_module

import sgfused
from sgfused import _backend, _build, reference
from sgfused.nn import CrossAttentionSimilarity, HardestNegativeLoss, MaxSim, VectorSimilarity
from sgfused.ops import (cross_attention, hardest_negative_loss, hardest_negative_loss_from_embeddings, max_sim,
                         pairwise_similarity)

cpu_peak_bytes = bench_module("harness").cpu_peak_bytes  # what the benches report as peak memory
BACKENDS = ("cpu", "triton", "reference")
ALL = ("reference", "cpu", "cuda", "triton")


def _device(backend: str) -> torch.device:
    return torch.device("cpu") if backend == "reference" else backend_device(backend)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------- Install
def test_build_info_has_the_documented_keys():
    """README Install: build_info() returns backends, cuda_arch_list, torch_version, openmp and triton."""
    info = sgfused.build_info()
    assert set(info) == {"backends", "cuda_arch_list", "torch_version", "openmp", "triton"}
    assert isinstance(info["backends"], list) and all(isinstance(b, str) for b in info["backends"])
    assert isinstance(info["cuda_arch_list"], str) and isinstance(info["torch_version"], str)
    assert isinstance(info["openmp"], bool) and isinstance(info["triton"], bool)


def test_import_refuses_another_torch_and_names_the_rebuild(monkeypatch):
    """README Install: if the installed torch changes, `import sgfused` says so, with the rebuild command."""
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    with pytest.raises(ImportError) as info:
        _build.load()  # what `import sgfused` runs
    message = str(info.value)
    assert f"compiled against torch {sgfused.build_info()['torch_version']} but torch 0.0.1 is installed" in message
    assert "pip install --no-build-isolation --force-reinstall --no-deps ." in message


def test_setup_compiles_the_cpu_kernels_with_the_documented_flags(monkeypatch):
    """README Install: the C++ CPU kernels get -fopenmp when torch has OpenMP and -march=native, which
    SGFUSED_CPU_MARCH replaces (empty: a portable binary); the extension records the torch it was built for."""
    import pathlib
    import runpy

    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)  # setup.py's last line: build nothing
    setup_py = pathlib.Path(__file__).resolve().parents[1] / "setup.py"
    namespace = runpy.run_path(str(setup_py))
    monkeypatch.delenv("FORCE_CUDA", raising=False)
    if namespace["want_cuda"]():
        pytest.skip("a CUDA build: the CUDA extension needs nvcc's paths")

    def cxx_flags() -> list[str]:
        ext = namespace["extension"]()
        assert dict(ext.define_macros)["SGFUSED_TORCH_VERSION"] == f'"{torch.__version__}"'
        return ext.extra_compile_args["cxx"]

    monkeypatch.delenv("SGFUSED_CPU_MARCH", raising=False)
    flags = cxx_flags()
    assert "-march=native" in flags
    assert ("-fopenmp" in flags) == torch.backends.openmp.is_available()
    monkeypatch.setenv("SGFUSED_CPU_MARCH", "x86-64-v3")
    assert "-march=x86-64-v3" in cxx_flags() and "-march=native" not in cxx_flags()
    monkeypatch.setenv("SGFUSED_CPU_MARCH", "")
    assert not [flag for flag in cxx_flags() if flag.startswith("-march")]


def test_an_extension_that_cannot_load_names_the_rebuild(monkeypatch):
    """README Install: a compiled extension that does not fit the installed torch (it cannot even load) is
    refused on import with the rebuild command, not with an obscure symbol error."""
    import sys

    monkeypatch.delattr(sgfused, "_C")
    monkeypatch.setitem(sys.modules, "sgfused._C", None)  # importing it now raises ImportError
    with pytest.raises(ImportError) as info:
        _build._load_extension()
    assert isinstance(info.value, _build.BuildMismatch)
    assert f"cannot be loaded with torch {torch.__version__}" in str(info.value)
    assert "pip install --no-build-isolation --force-reinstall --no-deps ." in str(info.value)


def test_install_extras_and_build_requirements():
    """README Install: pybind11 and ninja are build requirements (with torch); `.[bert]` brings transformers
    and the optional Triton backend has its extra."""
    import pathlib
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    names = lambda specs: {spec.split(">")[0].split("=")[0].split("<")[0].strip() for spec in specs}  # noqa: E731
    assert {"torch", "pybind11", "ninja"} <= names(project["build-system"]["requires"])
    extras = project["project"]["optional-dependencies"]
    assert "transformers" in names(extras["bert"]) and "triton" in names(extras["triton"])


# ---------------------------------------------------------------- backend choice
def test_auto_order_for_cuda_tensors(monkeypatch):
    """README Ops: `auto` picks CUDA C++ -> Triton -> reference for CUDA tensors; the embedding loss
    (no CUDA kernel) takes Triton there."""
    monkeypatch.delenv("SGFUSED_BACKEND", raising=False)
    monkeypatch.setattr(_build, "COMPILED_BACKENDS", frozenset({"cpu", "cuda"}))
    monkeypatch.setattr(_backend, "TRITON_AVAILABLE", True)
    cuda = torch.device("cuda")
    assert _backend.choose_backend("op", "auto", cuda, ALL) == "cuda"
    embed = sys_modules_hn()._EMBED_TERMS
    assert _backend.choose_backend("op", "auto", cuda, embed) == "triton"
    monkeypatch.setattr(_build, "COMPILED_BACKENDS", frozenset({"cpu"}))
    assert _backend.choose_backend("op", "auto", cuda, ALL) == "triton"
    monkeypatch.setattr(_backend, "TRITON_AVAILABLE", False)
    assert _backend.choose_backend("op", "auto", cuda, ALL) == "reference"


def test_auto_skips_a_backend_that_refuses_the_call_and_a_named_one_says_why(monkeypatch):
    """README Ops: CUDA C++ `cross_attention` cannot serve `clipped_l2` over contexts longer than 12288 (fp32) /
    6144 (fp64) positions; `auto` then takes Triton, and `backend="cuda"` raises the reason."""
    import pathlib
    import re
    import sys

    module = sys.modules["sgfused.ops.cross_attention"]
    source = (pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "cross_attention.cu").read_text()
    assert re.search(r"kMaxSharedBytes = int64_t\((\d+)\) << 10", source).group(1) == "48"
    assert module.CUDA_SHARED_BYTES == 48 << 10
    for dtype, most in ((torch.float32, 12288), (torch.bfloat16, 12288), (torch.float64, 6144)):
        assert module.cuda_refusal(torch.empty(1, most, 1, dtype=dtype, device="meta"), "clipped_l2") == {}
        long = torch.empty(1, most + 1, 1, dtype=dtype, device="meta")
        assert module.cuda_refusal(long, "none") == {}
        assert f"at most {most} for {dtype}" in module.cuda_refusal(long, "clipped_l2")["cuda"]
    monkeypatch.delenv("SGFUSED_BACKEND", raising=False)
    monkeypatch.setenv("SGFUSED_AUTO", "order")
    monkeypatch.setattr(_build, "COMPILED_BACKENDS", frozenset({"cpu", "cuda"}))
    monkeypatch.setattr(_backend, "TRITON_AVAILABLE", True)
    cuda, refusal = torch.device("cuda"), {"cuda": "too long"}
    assert _backend.choose_backend("op", "auto", cuda, ALL, refusals=refusal) == "triton"
    assert _backend.choose_backend("op", "auto", cuda, ALL, refusals={}) == "cuda"
    with pytest.raises(sgfused.BackendUnavailable, match="backend 'cuda' cannot serve this call: too long"):
        _backend.choose_backend("op", "cuda", cuda, ALL, refusals=refusal)
    calls = []
    monkeypatch.setattr(module, "choose_backend", lambda *args, **kwargs: calls.append(kwargs) or "reference")
    x = _randn(1, 2, 4)
    cross_attention(x, _randn(1, 12289, 4))
    cross_attention(x, _randn(1, 12289, 4), norm="none")
    assert [call["refusals"] for call in calls] == [module.cuda_refusal(torch.empty(1, 12289, 1), "clipped_l2"), {}]


def sys_modules_hn():
    import sys

    return sys.modules["sgfused.ops.hardest_negative"]


def _h100_rows() -> list[dict]:
    import csv
    import pathlib

    rows = []
    results = pathlib.Path(__file__).resolve().parents[1] / "bench" / "results"
    for path in sorted(results.glob("*_nvidia_h100_80gb_hbm3.csv")):
        with open(path, newline="") as handle:
            rows += list(csv.DictReader(handle))
    return rows


def test_readme_gpu_figures_are_the_committed_h100_run():
    """README Ops: the figures of the one GPU run on record (bench/results/*_nvidia_h100_80gb_hbm3.csv): CUDA
    fastest at the training shapes (cross_attention 1.5x, pairwise_similarity 1.2x, hardest_negative_loss up
    to 6x), 1.6x on cross_attention's evaluation, pairwise 1000 x 1000 16.7 ms vs 18.9 ms, Triton never the
    fastest, the embedding loss's Triton kernel 2x the time at 1/33 memory (N = 16384; 3x, 1/21 at 4096), and
    the backend `auto` picks never above the reference's memory."""
    import collections
    import pathlib

    text = " ".join((pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    for words in ("(`cross_attention` 1.5x, `pairwise_similarity` 1.2x, `hardest_negative_loss` up to 6x the "
                  "reference)",
                  "`cross_attention`'s 1000 x 5000 evaluation (1.6x)", "1000 x 1000: 16.7 ms vs 18.9 ms",
                  "Triton was never the fastest", "takes 2x the reference's time there at N = 16384, at 1/33 of "
                  "its memory (3x the time, 1/21 of the memory at N = 4096)"):
        assert words in text, words
    rows = _h100_rows()
    groups = collections.defaultdict(dict)
    for row in rows:
        groups[row["op"], row["case"], row["dtype"], row["shape"]][row["backend"]] = row

    def speedup(op, case, shape, backend="cuda", dtype="float32"):
        return float(groups[op, case, dtype, shape][backend]["speedup_vs_reference"])

    train = "128x128,d=1024,m=256"
    assert round(speedup("cross_attention", "train fwd+bwd fp32", train.replace(",d", ",Lq=32,Lc=36,d")), 1) == 1.5
    assert round(speedup("pairwise_similarity", "train fwd+bwd float32", train), 1) == 1.2
    hn = [float(r["speedup_vs_reference"]) for r in rows
          if r["op"] == "hardest_negative_loss" and r["backend"] == "cuda"]
    assert round(max(hn)) == 6
    assert round(speedup("cross_attention", "eval fwd", "1000img x 5000cap"), 1) == 1.6
    memory = groups["pairwise_similarity", "memory fwd", "float32", "1000x1000,d=1024,m=256"]
    assert (round(float(memory["reference"]["ms"]), 1), round(float(memory["cuda"]["ms"]), 1)) == (16.7, 18.9)
    for key, by_backend in groups.items():
        fastest = min(by_backend.values(), key=lambda r: float(r["ms"]))
        assert fastest["backend"] != "triton", key
        auto = "triton" if key[1].startswith("embeddings") else "cuda"
        if auto in by_backend and "reference" in by_backend:
            assert float(by_backend[auto]["memory_vs_reference"]) <= 1.0, key
    for n, time_ratio, memory_ratio in ((16384, 2, 33), (4096, 3, 21)):
        row = groups["hardest_negative_loss", "embeddings fwd+bwd", "float32", f"N={n},d=1024"]["triton"]
        assert round(1 / float(row["speedup_vs_reference"])) == time_ratio
        assert round(1 / float(row["memory_vs_reference"])) == memory_ratio


def test_every_op_has_the_backends_of_the_ops_table():
    """README Ops table: every op has reference, C++ CPU and Triton; all but the embedding loss have CUDA C++
    (in a CUDA build), so `auto` on CPU tensors reaches the C++ kernel of every op."""
    import sys

    ops = sys.modules
    tables = {
        "hardest_negative_loss": ops["sgfused.ops.hardest_negative"]._SCORE_TERMS,
        "hardest_negative_loss_from_embeddings": ops["sgfused.ops.hardest_negative"]._EMBED_TERMS,
        "pairwise_similarity": ops["sgfused.ops.pairwise_similarity"]._IMPLEMENTATIONS,
        "cross_attention": ops["sgfused.ops.cross_attention"]._IMPLEMENTATIONS,
        "max_sim": ops["sgfused.ops.max_sim"]._IMPLEMENTATIONS,
    }
    for name, table in tables.items():
        assert {"reference", "cpu", "triton"} <= set(table), name
        assert _backend.choose_backend(name, "auto", torch.device("cpu"), table) == "cpu", name
    assert "cuda" not in tables["hardest_negative_loss_from_embeddings"]


def test_environment_variable_reaches_every_op_and_layer(monkeypatch):
    """README Ops: SGFUSED_BACKEND replaces `auto` everywhere (every op and layer left at its default)."""
    monkeypatch.setenv("SGFUSED_BACKEND", "cuda")  # cannot serve CPU tensors: every call must refuse
    x2, y2, w = _randn(3, 4), _randn(3, 4, seed=1), _randn(2, 4, seed=2)
    x3, y3 = _randn(3, 2, 4), _randn(2, 5, 4, seed=1)
    calls = [
        lambda: hardest_negative_loss(x2 @ y2.t()),
        lambda: hardest_negative_loss_from_embeddings(x2, y2),
        lambda: pairwise_similarity(x2, y2, w),
        lambda: cross_attention(x3, y3),
        lambda: max_sim(x3, y3),
        lambda: HardestNegativeLoss()(x2 @ y2.t()),
        lambda: VectorSimilarity(4, 2)(x2, y2),
        lambda: CrossAttentionSimilarity(4, 2)(x3, y3),
        lambda: MaxSim()(x3, y3),
    ]
    for call in calls:
        with pytest.raises(sgfused.BackendUnavailable, match="backend 'cuda' cannot serve this call"):
            call()


# ---------------------------------------------------------------- bad input
def _static_bad_calls():
    """(call, exception type, words): wrong type, rank, shape, dtype, device and options, one per op at least."""
    x3 = _randn(2, 3, 4)
    return [
        (lambda: hardest_negative_loss(_randn(3)), ValueError, "scores must be 2-D, got shape (3,)"),
        (lambda: hardest_negative_loss([[1.0]]), TypeError, "scores must be a torch.Tensor, got list"),
        (lambda: hardest_negative_loss_from_embeddings(_randn(3, 4), _randn(3, 4, dtype=torch.float64)), TypeError,
         "img and cap must share a dtype"),
        (lambda: pairwise_similarity(_randn(2, 4), _randn(3, 5), _randn(6, 4)), ValueError,
         "y must have size 4 in dim 1 (d, the feature size of x), got shape (3, 5)"),
        (lambda: pairwise_similarity(_randn(2, 4), _randn(3, 4), _randn(6, 4, dtype=torch.float64)), TypeError,
         "weight must have the dtype of x"),
        (lambda: cross_attention(x3, x3, smooth=0.0), ValueError,
         "smooth must be a finite number in (0, 1000], got 0.0"),
        (lambda: cross_attention(x3, torch.randn(2, 3, 4, device="meta")), ValueError, "contexts on meta"),
        (lambda: max_sim(x3, _randn(4, 6, 5)), ValueError, "y must have size 4 in dim 2"),
        (lambda: max_sim(x3, x3, [1, 2.5]), TypeError, "x_lens must be an integer tensor or a list of ints"),
    ]


def _value_bad_calls(backend: str, device: torch.device):
    """(call, words): the data-dependent checks (lengths, ids, NaN / inf), which run in C++ operators."""
    x3 = _randn(2, 3, 4).to(device)
    nan_scores = _randn(3, 3).to(device)
    nan_scores[2, 0] = float("nan")
    return [
        (lambda: hardest_negative_loss(nan_scores, backend=backend), "scores contains NaN (first at index (2, 0))"),
        (lambda: cross_attention(x3, x3, context_lens=[3, 0], backend=backend), "context_lens must lie in [1, 3]"),
        (lambda: max_sim(x3, x3, [4, 1], backend=backend), "x_lens must lie in [1, 3]"),
    ]


def test_static_errors_are_one_line_and_named():
    """README Ops, bad input: a wrong type, rank, shape, dtype or device, or a bad option, gives a
    one-line error naming the argument, what was expected and what came."""
    for call, error, words in _static_bad_calls():
        with pytest.raises(error) as info:
            call()
        assert words in str(info.value)
        assert "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_errors_are_one_line_and_the_same_on_every_backend(backend):
    """README Ops, bad input: every backend refuses lengths outside [1, L] and NaN in the scores with the same
    one-line ValueError (the words come from the C++ check operators: a change there fails this test too)."""
    cases = zip(_value_bad_calls(backend, _device(backend)), _value_bad_calls("reference", torch.device("cpu")))
    for (call, words), (reference_call, _) in cases:
        with pytest.raises(ValueError) as info:
            call()
        with pytest.raises(ValueError) as on_reference:
            reference_call()
        assert words in str(info.value) and "\n" not in str(info.value), str(info.value)
        assert str(info.value) == str(on_reference.value)


def test_static_errors_under_torch_compile():
    """README Ops, bad input: torch.compile refuses a wrong shape or option with the eager error; with
    fullgraph=True the trace stops (torch._dynamo.exc.Unsupported) and its message quotes that error."""
    cases = [_static_bad_calls()[i] for i in (0, 5)]
    for call, error, words in cases:
        with pytest.raises(error) as eager:
            call()
        for fullgraph in (False, True):
            torch._dynamo.reset()
            try:
                with pytest.raises(Exception) as traced:
                    torch.compile(call, fullgraph=fullgraph, backend="aot_eager")()
            finally:
                torch._dynamo.reset()
            if fullgraph:
                assert isinstance(traced.value, torch._dynamo.exc.Unsupported)
                assert str(eager.value) in str(traced.value)
            else:
                assert type(traced.value) is error and str(traced.value) == str(eager.value)


def test_option_bounds_are_the_documented_ones():
    """README Ops, bad input: smooth in (0, 1000], leaky in [0, 1], eps in (0, 1] (pairwise_similarity: [0, 1]),
    margin any finite float32 number: the ends are accepted, just beyond them refused."""
    q, c = _randn(1, 2, 4), _randn(1, 3, 4, seed=1)
    for options in (dict(smooth=1000.0), dict(smooth=1e-3), dict(leaky=0.0), dict(leaky=1.0), dict(eps=1.0)):
        assert torch.isfinite(cross_attention(q, c, backend="reference", **options)).all(), options
    for name, value in (("smooth", 1000.5), ("leaky", 1.01), ("eps", 1.5)):
        with pytest.raises(ValueError, match=rf"^{name} must be a finite number in "):
            cross_attention(q, c, backend="reference", **{name: value})
    x, y, w = _randn(2, 4), _randn(3, 4, seed=1), _randn(5, 4, seed=2)
    for eps in (0.0, 1.0):
        assert torch.isfinite(pairwise_similarity(x, y, w, eps=eps, backend="reference")).all()
    with pytest.raises(ValueError, match=r"^eps must be a finite number in \[0, 1\], got 1.5"):
        pairwise_similarity(x, y, w, eps=1.5, backend="reference")
    scores = _randn(3, 3)
    for margin in (-0.5, 0, 1e30):
        assert torch.isfinite(hardest_negative_loss(scores, margin=margin, backend="reference"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_image_embeddings_and_negative_inf_scores_are_named(backend):
    """README hardest_negative_loss: NaN or +-inf in the scores (or embeddings, img as well as cap) raises
    ValueError naming the first position."""
    device = _device(backend)
    img, cap = _randn(3, 4).to(device), _randn(3, 4, seed=1).to(device)
    bad_img = img.clone()
    bad_img[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"img contains NaN \(first at index \(1, 2\)\)"):
        hardest_negative_loss_from_embeddings(bad_img, cap, backend=backend)
    bad_img[1, 2], bad_img[2, 0] = 1.0, float("inf")
    with pytest.raises(ValueError, match=r"img contains inf \(first at index \(2, 0\)\)"):
        hardest_negative_loss_from_embeddings(bad_img, cap, backend=backend)
    scores = img @ cap.t()
    scores[2, 1] = float("-inf")
    with pytest.raises(ValueError, match=r"scores contains -inf \(first at index \(2, 1\)\)"):
        hardest_negative_loss(scores, backend=backend)


def test_raw_operators_refuse_non_finite_input_alike():
    """README Ops, bad input: the value checks run inside registered operators, so the raw
    torch.ops.sgfused.* loss operators (compiled and Triton) refuse NaN with the same error."""
    backend_device("triton")
    ids = torch.arange(3)
    scores = _randn(3, 3)
    scores[0, 2] = float("nan")
    img, cap = _randn(3, 4), _randn(3, 4, seed=1)
    cap[2, 1] = float("inf")
    for forward, args in (("hardest_negative_forward", (scores,)), ("hardest_negative_embed_forward", (img, cap))):
        messages = []
        for suffix in ("", "_triton"):
            with pytest.raises(ValueError) as info:
                getattr(torch.ops.sgfused, forward + suffix)(*args, ids, ids, 0.2, True)
            messages.append(str(info.value))
        assert messages[0] == messages[1] and "contains" in messages[0], messages


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_ids_may_be_lists(backend):
    """README Ops: ids may be tensors or lists of ints (the embedding entry point too)."""
    device = _device(backend)
    img, cap = _randn(2, 4).to(device), _randn(4, 4, seed=1).to(device)
    listed = hardest_negative_loss_from_embeddings(img, cap, img_ids=[0, 1], cap_img_ids=[0, 0, 1, 1], backend=backend)
    tensors = hardest_negative_loss_from_embeddings(img, cap, img_ids=torch.tensor([0, 1], device=device),
                                                    cap_img_ids=torch.tensor([0, 0, 1, 1], device=device),
                                                    backend=backend)
    torch.testing.assert_close(listed, tensors, rtol=0, atol=0)


def _learned_attention(backend, queries, contexts, weight, bias, epilogue, upstream):
    leaves = [t.clone().requires_grad_() for t in (queries, contexts, weight, bias)]
    out = cross_attention(leaves[0], leaves[1], query_lens=[2, 1], context_lens=[3, 2], epilogue=epilogue,
                          weight=leaves[2], bias=leaves[3], backend=backend)
    (out * upstream).sum().backward()
    return out.detach(), *(leaf.grad for leaf in leaves)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("epilogue", ["distance", "direction"])
def test_padding_garbage_never_reaches_learned_epilogues(backend, epilogue):
    """README Ops: padded positions never influence a result or a gradient, whatever they hold (NaN, inf,
    1e30), for the distance / direction epilogues (with W and b) too."""
    device = _device(backend)
    clean_q, clean_c = _randn(2, 3, 4).to(device), _randn(2, 3, 4, seed=1).to(device)
    clean_q[0, 2:] = clean_q[1, 1:] = clean_c[1, 2:] = 0.0
    weight, bias = _randn(3, 4, seed=2).to(device), _randn(3, seed=3).to(device)
    upstream = _randn(2, 2, 3, 3, seed=4).to(device)
    queries, contexts = clean_q.clone(), clean_c.clone()
    queries[0, 2], queries[1, 1], queries[1, 2] = float("nan"), float("inf"), 1e30
    contexts[1, 2, :2], contexts[1, 2, 2:] = float("-inf"), float("nan")
    got = _learned_attention(backend, queries, contexts, weight, bias, epilogue, upstream)
    want = _learned_attention(backend, clean_q, clean_c, weight, bias, epilogue, upstream)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- hardest_negative_loss
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_loss_is_float32_whatever_the_input_dtype(backend, dtype):
    """README hardest_negative_loss: the loss is float32 whatever the input dtype (float64 for float64), for
    both entry points and every reduction."""
    device = _device(backend)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    img, cap = _randn(3, 4, dtype=dtype).to(device), _randn(3, 4, seed=1, dtype=dtype).to(device)
    for reduction in ("sum", "mean", "none"):
        assert hardest_negative_loss(img @ cap.t(), reduction=reduction, backend=backend).dtype == want
        loss = hardest_negative_loss_from_embeddings(img, cap, reduction=reduction, backend=backend)
        assert loss.dtype == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_scores_give_a_loss_beyond_the_fp16_range(backend):
    """README hardest_negative_loss: a sum over the batch, where fp16 could overflow: fp16 scores whose loss
    exceeds 65504 still give the exact finite float32 loss."""
    device = _device(backend)
    n = 170
    scores = torch.full((n, n), 100.0, dtype=torch.float16, device=device)
    scores.diagonal().fill_(-100.0)  # every hinge is margin + 200, in both directions
    loss = hardest_negative_loss(scores, margin=0.25, backend=backend)
    assert loss.dtype == torch.float32 and loss.item() == 2 * n * 200.25


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_on_every_backend(backend):
    """README hardest_negative_loss: non-contiguous inputs are accepted (scores and embeddings, every backend)."""
    device = _device(backend)
    img = _randn(8, 3).to(device).t()  # (3, 8), transposed
    cap = _randn(3, 16, seed=1).to(device)[:, ::2]  # (3, 8), strided
    assert not img.is_contiguous() and not cap.is_contiguous()
    pairs = ((hardest_negative_loss_from_embeddings, (img, cap)), (hardest_negative_loss, ((img @ cap.t()).t(),)))
    for fn, args in pairs:
        views = [a.clone().requires_grad_() for a in args]  # clone keeps the strides
        copies = [a.contiguous().requires_grad_() for a in args]
        got, want = fn(*views, backend=backend), fn(*copies, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        got.backward()
        want.backward()
        for v, c in zip(views, copies):
            torch.testing.assert_close(v.grad, c.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "reference"])  # cpu: test_hardest_negative, test_pairwise_similarity
def test_gradients_are_deterministic_on_every_backend(backend):
    """README hardest_negative_loss: gradients are deterministic on every backend (bit for bit, twice);
    also pairwise_similarity and cross_attention on Triton (max_sim: test_max_sim)."""
    device = _device(backend)
    img, cap = _randn(4, 6).to(device), _randn(8, 6, seed=1).to(device)
    ids, cap_ids = torch.arange(4, device=device), torch.arange(4, device=device).repeat_interleave(2)
    weight, bias = _randn(3, 6, seed=2).to(device), _randn(3, seed=3).to(device)

    def grads():
        leaves = [t.clone().requires_grad_() for t in (img, cap, weight, bias)]
        losses = [
            hardest_negative_loss(leaves[0] @ leaves[1].t(), img_ids=ids, cap_img_ids=cap_ids, max_violation=False,
                                  backend=backend),
            hardest_negative_loss_from_embeddings(leaves[0], leaves[1], img_ids=ids, cap_img_ids=cap_ids,
                                                  backend=backend),
            pairwise_similarity(leaves[0], leaves[1], leaves[2], leaves[3], backend=backend).sum(),
            cross_attention(leaves[0].view(2, 2, 6), leaves[1].view(2, 4, 6), epilogue="distance", weight=leaves[2],
                            bias=leaves[3], backend=backend).sum(),
        ]
        return [g for loss in losses for g in torch.autograd.grad(loss, leaves, allow_unused=True) if g is not None]

    first, second = grads(), grads()
    assert len(first) == len(second) == 12
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_loss_module_passes_its_options_on():
    """README hardest_negative_loss: HardestNegativeLoss is a drop-in for the VSE++ ContrastiveLoss with
    its margin and max_violation (False: SCAN's sum of hinges), in both signatures."""
    img, cap = _randn(6, 5), _randn(6, 5, seed=1)
    scores = img @ cap.t()
    for margin in (0.2, 0.5):
        for max_violation in (True, False):
            criterion = HardestNegativeLoss(margin=margin, max_violation=max_violation)
            want = reference.vsepp_contrastive_loss(scores, margin, max_violation)
            torch.testing.assert_close(criterion(scores), want)
            torch.testing.assert_close(criterion(img, cap), want, rtol=1e-5, atol=1e-5)
    mean = HardestNegativeLoss(reduction="mean")(scores)
    torch.testing.assert_close(mean, reference.vsepp_contrastive_loss(scores) / 6)


# ---------------------------------------------------------------- memory
def test_embedding_loss_memory_grows_linearly_with_the_batch():
    """README hardest_negative_loss: from embeddings, O(N) memory for any batch (forward and backward,
    both max_violation modes): 4x the batch takes under 8x the peak, where the score matrix would take 16x."""

    def peak(n: int, backend: str) -> int:
        img, cap = _randn(n, 8).requires_grad_(), _randn(n, 8, seed=1).requires_grad_()

        def step():
            for max_violation in (True, False):
                hardest_negative_loss_from_embeddings(img, cap, max_violation=max_violation, backend=backend).backward()

        return cpu_peak_bytes(step)

    small, large = peak(512, "cpu"), peak(2048, "cpu")
    assert large < 8 * small, (small, large)
    assert large < 2048 * 2048 * 4 / 2  # well under one fp32 score matrix
    assert peak(2048, "reference") > 2048 * 2048 * 4  # the measurement does see a score matrix


def test_kernels_never_build_the_naive_tables():
    """README pairwise_similarity / max_sim: the C++ kernels never hold the (Nx, Ny, d) tensor or the
    (Nx, Ny, Ly, Lx) table of node dot products (the reference does, which the measurement sees)."""
    # 128 MiB of (x_i - y_j)^2 values: four times the C++ kernel's largest block of pairs (2^23 values)
    x, y, w, b = _randn(64, 1024), _randn(512, 1024, seed=1), _randn(8, 1024, seed=2), _randn(8, seed=3)
    naive = 64 * 512 * 1024 * 4
    assert cpu_peak_bytes(lambda: pairwise_similarity(x, y, w, b, backend="cpu")) < naive / 2
    assert cpu_peak_bytes(lambda: pairwise_similarity(x, y, w, b, backend="reference")) > naive
    regions, words = _randn(32, 36, 16), _randn(64, 12, 16, seed=1)
    table = 32 * 64 * 12 * 36 * 4
    assert cpu_peak_bytes(lambda: max_sim(regions, words, backend="cpu")) < table / 4
    assert cpu_peak_bytes(lambda: max_sim(regions, words, backend="reference")) > table


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_cross_attention_keeps_no_probabilities_or_contexts_for_backward(backend):
    """README cross_attention: backward recomputes the attention; it never stores the (Nq, Nc, Lq, Lc)
    probabilities or the (Nq, Nc, Lq, d) contexts."""
    device = backend_device(backend)
    nq, lq, nc, lc, d, m = 2, 3, 3, 5, 4, 2
    queries = _randn(nq, lq, d).to(device).requires_grad_()
    contexts = _randn(nc, lc, d, seed=1).to(device).requires_grad_()
    weight = _randn(m, d, seed=2).to(device).requires_grad_()
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = cross_attention(queries, contexts, epilogue="distance", weight=weight, backend=backend)
    out.sum().backward()
    assert saved
    forbidden = {(nq, nc, lq, lc), (nq, nc, lc, lq), (nq, nc, lq, d)}
    assert not forbidden & set(saved), saved
    biggest = max(queries.numel(), contexts.numel(), out.numel(), nq * nc * lq * 2)
    assert all(torch.Size(shape).numel() <= biggest for shape in saved), saved


def _memory_case(op: str):
    """(call taking leaves and a backend, inputs) at a training-like shape of each op."""
    if op == "hardest_negative_loss":
        return (lambda s, backend: hardest_negative_loss(s, max_violation=False, backend=backend)), (_randn(512, 512),)
    if op == "hardest_negative_loss_from_embeddings":
        return (lambda i, c, backend: hardest_negative_loss_from_embeddings(i, c, backend=backend)), (
            _randn(512, 64), _randn(512, 64, seed=1))
    if op == "pairwise_similarity":
        return (lambda x, y, w, backend: pairwise_similarity(x, y, w, backend=backend)), (
            _randn(64, 256), _randn(64, 256, seed=1), _randn(256, 256, seed=2))
    if op == "cross_attention":
        return (lambda q, c, w, backend: cross_attention(q, c, epilogue="distance", weight=w, backend=backend)), (
            _randn(16, 12, 64), _randn(16, 36, 64, seed=1), _randn(32, 64, seed=2))
    return (lambda x, y, backend: max_sim(x, y, backend=backend)), (_randn(32, 36, 64), _randn(64, 12, 64, seed=1))


@pytest.mark.parametrize("op", ["hardest_negative_loss", "hardest_negative_loss_from_embeddings",
                                "pairwise_similarity", "cross_attention", "max_sim"])
def test_auto_takes_no_more_memory_than_the_reference(op, monkeypatch):
    """README Ops: the order `auto` keeps never takes more memory than the reference (CPU tensors,
    forward and backward, at a training-like shape of every op)."""
    monkeypatch.delenv("SGFUSED_BACKEND", raising=False)
    fn, inputs = _memory_case(op)

    def step(backend: str):
        leaves = [t.clone().requires_grad_() for t in inputs]
        fn(*leaves, backend=backend).float().sum().backward()

    auto, ref = cpu_peak_bytes(lambda: step("auto")), cpu_peak_bytes(lambda: step("reference"))
    assert auto <= ref, (auto, ref)


# ---------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_embedding_loss_runs_under_torch_compile(backend):
    """README Ops: torch.compile support, for hardest_negative_loss_from_embeddings too (values and gradients)."""
    device = backend_device(backend)
    img, cap = _randn(3, 5).to(device), _randn(6, 5, seed=1).to(device)
    ids, cap_ids = [0, 1, 2], [0, 0, 1, 1, 2, 2]

    def loss(i, c):
        return hardest_negative_loss_from_embeddings(i, c, img_ids=ids, cap_img_ids=cap_ids, reduction="mean",
                                                     backend=backend)

    torch._dynamo.reset()
    try:
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
        eager_leaves = [t.clone().requires_grad_() for t in (img, cap)]
        compiled_leaves = [t.clone().requires_grad_() for t in (img, cap)]
        want, got = loss(*eager_leaves), compiled(*compiled_leaves)
        want.backward()
        got.backward()
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, want)
    for g, w in zip(compiled_leaves, eager_leaves):
        torch.testing.assert_close(g.grad, w.grad)
