"""hardest_negative_loss: every backend against the reference, gradients, opcheck, compile, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import (KERNEL_BACKENDS, TF32_TOL, TOLERANCE, assert_scaled_close, assert_tf32_reached_the_kernels,
                      backend_device, tf32_rounded)

import sgfused
from sgfused import reference
from sgfused.nn import HardestNegativeLoss
from sgfused.ops import hardest_negative_loss, hardest_negative_loss_from_embeddings

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def make_case(kind: str, n: int, device: torch.device, dtype: torch.dtype):
    """(scores, img_ids, cap_img_ids) for a named layout of positives."""
    if kind == "diagonal":
        ids = torch.arange(n)
        scores = torch.randn(n, n)
    elif kind == "five_captions":
        ids, cap_ids = torch.arange(n), torch.arange(n).repeat_interleave(5)
        scores = torch.randn(n, 5 * n)
    elif kind == "nonsquare_ids":  # repeated image ids, captions whose image is not in the batch
        ids = torch.randint(0, max(1, n // 2), (n,))
        cap_ids = torch.randint(0, n, (n + 3,))
        scores = torch.randn(n, n + 3)
    elif kind == "ties":  # integer scores: many exact ties, lowest index must win
        ids = torch.arange(n)
        scores = torch.randint(-2, 3, (n, n)).float() / 4
    elif kind == "no_negatives":  # every pair positive in some rows: one image id shared by all captions
        ids = torch.zeros(n, dtype=torch.long)
        ids[n // 2 :] = 1
        cap_ids = torch.zeros(n + 1, dtype=torch.long)
        scores = torch.randn(n, n + 1)
    else:
        raise ValueError(kind)
    if kind in ("diagonal", "ties"):
        cap_ids = ids
    return scores.to(device, dtype), ids.to(device), cap_ids.to(device)


def run(fn, scores, img_ids, cap_ids, max_violation, upstream, **kw):
    """Per-caption losses, indices and d(upstream . losses)/d(scores)."""
    leaf = scores.detach().clone().requires_grad_(True)
    per_caption, hard_cap, hard_img = fn(leaf, img_ids, cap_ids, max_violation, **kw)
    (grad,) = torch.autograd.grad((per_caption.float() * upstream).sum(), leaf)
    return per_caption, hard_cap, hard_img, grad


def via_op(backend):
    def fn(scores, img_ids, cap_ids, max_violation):
        return hardest_negative_loss(
            scores,
            0.2,
            img_ids=img_ids,
            cap_img_ids=cap_ids,
            max_violation=max_violation,
            reduction="none",
            return_indices=True,
            backend=backend,
        )

    return fn


def via_reference(scores, img_ids, cap_ids, max_violation):
    return reference.hardest_negative_terms(scores, img_ids, cap_ids, 0.2, max_violation)


def assert_matches_reference(backend, scores, img_ids, cap_ids, max_violation):
    upstream = torch.rand(scores.shape[1], device=scores.device) + 0.5
    got = run(via_op(backend), scores, img_ids, cap_ids, max_violation, upstream)
    want = run(via_reference, scores, img_ids, cap_ids, max_violation, upstream)
    tol = TOLERANCE[scores.dtype]
    torch.testing.assert_close(got[0].float(), want[0].float(), **tol)
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(got[2], want[2])
    torch.testing.assert_close(got[3].float(), want[3].float(), **tol)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("n", [1, 2, 3, 127, 1025])
def test_diagonal_sizes(backend, max_violation, n):
    device = backend_device(backend)
    assert_matches_reference(backend, *make_case("diagonal", n, device, torch.float32), max_violation)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("kind", ["five_captions", "nonsquare_ids", "ties", "no_negatives"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layouts_and_dtypes(backend, max_violation, kind, dtype):
    device = backend_device(backend)
    assert_matches_reference(backend, *make_case(kind, 9, device, dtype), max_violation)


def test_ties_pick_lowest_index():
    scores = torch.tensor([[1.0, 0.5, 0.5, 0.5], [0.5, 1.0, 0.5, 0.5], [0.0, 0.0, 1.0, 0.0], [0.3, 0.3, 0.3, 1.0]])
    for backend in ("reference", "cpu"):
        _, hard_cap, hard_img = hardest_negative_loss(scores, return_indices=True, backend=backend)
        assert hard_cap.tolist() == [1, 0, 0, 0]
        assert hard_img.tolist() == [1, 0, 0, 0]


def test_row_without_negatives_contributes_zero():
    scores = torch.tensor([[0.9, 0.8]])  # one image, both captions positive: no negatives anywhere
    for backend in ("reference", "cpu"):
        loss, hard_cap, hard_img = hardest_negative_loss(
            scores, img_ids=torch.tensor([4]), cap_img_ids=torch.tensor([4, 4]), return_indices=True, backend=backend
        )
        assert loss.item() == 0.0
        assert hard_cap.tolist() == [-1] and hard_img.tolist() == [-1, -1]


def test_reference_equals_published_vsepp_loss():
    scores = torch.randn(33, 33)
    for max_violation in (True, False):
        ours = hardest_negative_loss(scores, max_violation=max_violation, backend="reference")
        published = reference.vsepp_contrastive_loss(scores, 0.2, max_violation)
        torch.testing.assert_close(ours, published)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_reductions(reduction):
    scores, ids, cap_ids = make_case("five_captions", 6, torch.device("cpu"), torch.float32)
    per_caption = hardest_negative_loss(scores, img_ids=ids, cap_img_ids=cap_ids, reduction="none")
    got = hardest_negative_loss(scores, img_ids=ids, cap_img_ids=cap_ids, reduction=reduction)
    want = {"sum": per_caption.sum(), "mean": per_caption.sum() / 30, "none": per_caption}[reduction]
    torch.testing.assert_close(got, want)


def test_mean_counts_every_positive_pair():
    ids = torch.tensor([0, 0, 1])  # image 0 twice: captions of id 0 have two positive images
    cap_ids = torch.tensor([0, 1, 1, 2])  # id 2 has no image: no positive
    scores = torch.randn(3, 4)
    total = hardest_negative_loss(scores, img_ids=ids, cap_img_ids=cap_ids, reduction="sum")
    mean = hardest_negative_loss(scores, img_ids=ids, cap_img_ids=cap_ids, reduction="mean")
    torch.testing.assert_close(mean, total / 4)  # positives: (0,0), (1,0), (2,1), (2,2)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("max_violation", [True, False])
def test_gradcheck_float64(backend, max_violation):
    device = backend_device(backend)
    scores, ids, cap_ids = make_case("five_captions", 3, device, torch.float64)
    scores.requires_grad_(True)

    def loss(s):
        return hardest_negative_loss(
            s, img_ids=ids, cap_img_ids=cap_ids, max_violation=max_violation, reduction="none", backend=backend
        )

    assert torch.autograd.gradcheck(loss, (scores,), eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------- embedding entry point
@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("n,d,captions_per_image", [(1, 4, 1), (5, 7, 5), (300, 33, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_embeddings_match_reference(backend, max_violation, n, d, captions_per_image, dtype):
    device = backend_device(backend)
    img = torch.nn.functional.normalize(torch.randn(n, d), dim=1).to(device, dtype)
    cap = torch.nn.functional.normalize(torch.randn(n * captions_per_image, d), dim=1).to(device, dtype)
    ids = torch.arange(n, device=device)
    cap_ids = ids.repeat_interleave(captions_per_image)
    upstream = torch.rand(cap.shape[0], device=device) + 0.5

    def losses(fn):
        leaves = [t.detach().clone().requires_grad_(True) for t in (img, cap)]
        per_caption, hard_cap, hard_img = fn(*leaves)
        grads = torch.autograd.grad((per_caption.float() * upstream).sum(), leaves)
        return per_caption, hard_cap, hard_img, *grads

    got = losses(
        lambda i, c: hardest_negative_loss_from_embeddings(
            i, c, 0.2, img_ids=ids, cap_img_ids=cap_ids, max_violation=max_violation,
            reduction="none", return_indices=True, backend=backend,
        )
    )
    want = losses(lambda i, c: reference.hardest_negative_embed_terms(i, c, ids, cap_ids, 0.2, max_violation))
    tol = TOLERANCE[dtype] if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float() if g.is_floating_point() else g, w.float() if w.is_floating_point() else w, **tol)


@pytest.mark.parametrize("backend", ["cpu", "cuda", "triton"])
@pytest.mark.parametrize("kind", ["ties", "nonsquare_ids", "no_negatives"])
def test_embeddings_hardest_indices_over_many_blocks(backend, kind):
    """Exact ties (integer products), repeated and missing ids, rows without negatives, with more rows and
    columns than one 64-wide block: the hardest image of every caption and caption of every image are the
    reference's (lowest index on ties, -1 where none), though the Triton forward takes a row's maximum
    from partials over column blocks."""
    device = backend_device(backend)
    n_img, n_cap = 150, 203
    img = torch.randint(-1, 2, (n_img, 3)).float()
    cap = torch.randint(-1, 2, (n_cap, 3)).float()
    if kind == "ties":
        ids, cap_ids = torch.arange(n_img), torch.arange(n_cap) % n_img
    elif kind == "nonsquare_ids":
        ids, cap_ids = torch.randint(0, 40, (n_img,)), torch.randint(0, 80, (n_cap,))
    else:  # images 0-99 share id 0 with every caption: they have no negative
        ids = torch.where(torch.arange(n_img) < 100, 0, 1)
        cap_ids = torch.zeros(n_cap, dtype=torch.long)
    img, cap, ids, cap_ids = img.to(device), cap.to(device), ids.to(device), cap_ids.to(device)
    for max_violation in (True, False):
        got = hardest_negative_loss_from_embeddings(img, cap, 0.2, img_ids=ids, cap_img_ids=cap_ids,
                                                    max_violation=max_violation, reduction="none",
                                                    return_indices=True, backend=backend)
        want = reference.hardest_negative_embed_terms(img, cap, ids, cap_ids, 0.2, max_violation)
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
        torch.testing.assert_close(got[0], want[0])
    if kind == "no_negatives":
        assert (got[1][:100] == -1).all() and (got[1][100:] >= 0).all()


@pytest.mark.parametrize("backend", ["triton"])  # in the test id: the sm_90 compile check selects by it
@pytest.mark.parametrize("max_violation", [True, False])
def test_embeddings_tf32_when_allowed(backend, max_violation, tf32_launches):
    """Under torch.set_float32_matmul_precision("high") the Triton kernels take TF32 products, as torch.matmul
    does: on TF32-exact embeddings the losses, hardest negatives and gradients match the fp64 reference."""
    device = backend_device(backend)
    img = tf32_rounded(torch.nn.functional.normalize(torch.randn(64, 48), dim=1)).to(device)
    cap = tf32_rounded(torch.nn.functional.normalize(torch.randn(64, 48), dim=1)).to(device)
    ids = torch.arange(64, device=device)
    upstream = tf32_rounded(torch.rand(64) + 0.5).to(device)

    def losses(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (img, cap)]
        per_caption, hard_cap, hard_img = fn(*leaves)
        return per_caption, hard_cap, hard_img, *torch.autograd.grad((per_caption * upstream.to(dtype)).sum(), leaves)

    got = losses(lambda i, c: hardest_negative_loss_from_embeddings(
        i, c, 0.2, img_ids=ids, cap_img_ids=ids, max_violation=max_violation, reduction="none",
        return_indices=True, backend=backend), torch.float32)
    want = losses(lambda i, c: reference.hardest_negative_embed_terms(i, c, ids, ids, 0.2, max_violation), torch.float64)
    assert_tf32_reached_the_kernels(backend, tf32_launches)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    for g, w in zip(got[:1] + got[3:], want[:1] + want[3:]):
        assert_scaled_close(g, w, TF32_TOL)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_embeddings_gradcheck_float64(backend):
    device = backend_device(backend)
    img = torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True)
    cap = torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True)
    for max_violation in (True, False):
        fn = lambda i, c: hardest_negative_loss_from_embeddings(i, c, max_violation=max_violation, backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (img, cap), eps=1e-6, atol=1e-6)


def test_embedding_entry_equals_scores_entry():
    img, cap = torch.randn(50, 16), torch.randn(50, 16)
    via_scores = hardest_negative_loss(img @ cap.t(), backend="cpu")
    via_embeddings = hardest_negative_loss_from_embeddings(img, cap, backend="cpu")
    torch.testing.assert_close(via_embeddings, via_scores, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- registration
def _opcheck_args(device, dtype=torch.float32):
    scores, ids, cap_ids = make_case("five_captions", 4, device, dtype)
    return scores.requires_grad_(True), ids, cap_ids


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("max_violation", [True, False])
def test_opcheck(backend, max_violation):
    device = backend_device(backend)
    suffix = "_triton" if backend == "triton" else ""
    scores, ids, cap_ids = _opcheck_args(device)
    forward = getattr(torch.ops.sgfused, f"hardest_negative_forward{suffix}")
    torch.library.opcheck(forward, (scores, ids, cap_ids, 0.2, max_violation))
    per_caption, hard_cap, hard_img = forward(scores.detach(), ids, cap_ids, 0.2, max_violation)
    backward = getattr(torch.ops.sgfused, f"hardest_negative_backward{suffix}")
    grad = torch.rand_like(per_caption)
    torch.library.opcheck(backward, (grad, scores.detach(), ids, cap_ids, hard_cap, hard_img, 0.2, max_violation))

    img = torch.randn(4, 8, device=device, requires_grad=True)
    cap = torch.randn(20, 8, device=device, requires_grad=True)
    embed = getattr(torch.ops.sgfused, f"hardest_negative_embed_forward{suffix}")
    torch.library.opcheck(embed, (img, cap, ids, cap_ids, 0.2, max_violation))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_runs_under_torch_compile(backend):
    device = backend_device(backend)
    scores, ids, cap_ids = make_case("five_captions", 6, device, torch.float32)

    def loss(s):
        return hardest_negative_loss(s, img_ids=ids, cap_img_ids=cap_ids, reduction="mean", backend=backend)

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    eager_leaf, compiled_leaf = (scores.clone().requires_grad_(True) for _ in range(2))
    want, got = loss(eager_leaf), compiled(compiled_leaf)
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(compiled_leaf.grad, eager_leaf.grad)


def test_cpu_backend_is_deterministic():
    scores, ids, cap_ids = make_case("five_captions", 200, torch.device("cpu"), torch.float32)
    first = run(via_op("cpu"), scores, ids, cap_ids, False, torch.ones(1000))
    second = run(via_op("cpu"), scores, ids, cap_ids, False, torch.ones(1000))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- module
def test_module_is_a_drop_in_for_both_signatures():
    img, cap = torch.randn(8, 5), torch.randn(8, 5)
    criterion = HardestNegativeLoss(margin=0.2, max_violation=True)
    torch.testing.assert_close(criterion(img @ cap.t()), reference.vsepp_contrastive_loss(img @ cap.t()))
    torch.testing.assert_close(criterion(img, cap), reference.vsepp_contrastive_loss(img @ cap.t()), rtol=1e-5, atol=1e-5)
    assert "margin=0.2" in repr(criterion)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call,error,words",
    [
        (lambda: hardest_negative_loss(torch.randn(3)), ValueError, "scores must be 2-D"),
        (lambda: hardest_negative_loss(torch.randn(3, 4)), ValueError, "diagonal"),
        (lambda: hardest_negative_loss(torch.ones(3, 3, dtype=torch.long)), TypeError, "scores must be float"),
        (lambda: hardest_negative_loss(torch.randn(0, 0)), ValueError, "must not be empty"),
        (
            lambda: hardest_negative_loss(torch.randn(3, 4), img_ids=torch.arange(3), cap_img_ids=torch.arange(5)),
            ValueError,
            "cap_img_ids must have size 4",
        ),
        (
            lambda: hardest_negative_loss(torch.randn(3, 3), img_ids=torch.arange(2), cap_img_ids=torch.arange(3)),
            ValueError,
            "img_ids must have size 3",
        ),
        (
            lambda: hardest_negative_loss(torch.randn(3, 3), img_ids=torch.arange(3.0), cap_img_ids=torch.arange(3)),
            TypeError,
            "img_ids must be an integer tensor",
        ),
        (lambda: hardest_negative_loss(torch.randn(3, 3), img_ids=torch.arange(3)), ValueError, "cap_img_ids is required"),
        (
            lambda: hardest_negative_loss(torch.randn(3, 3), img_ids=torch.arange(3, device="meta"), cap_img_ids=torch.arange(3)),
            ValueError,
            "img_ids on meta",
        ),
        (lambda: hardest_negative_loss(torch.tensor([[1.0, float("nan")], [0.0, 1.0]])), ValueError, "NaN (first at index (0, 1))"),
        (lambda: hardest_negative_loss(torch.randn(3, 3), reduction="avg"), ValueError, "reduction must be one of"),
        (lambda: hardest_negative_loss(torch.randn(3, 3), margin="0.2"), TypeError, "margin must be a number"),
        (lambda: hardest_negative_loss([[1.0]]), TypeError, "scores must be a torch.Tensor"),
        (lambda: hardest_negative_loss_from_embeddings(torch.randn(3, 4), torch.randn(3, 5)), ValueError, "cap must have size 4"),
        (
            lambda: hardest_negative_loss_from_embeddings(torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64)),
            TypeError,
            "must share a dtype",
        ),
    ],
)
def test_bad_input_is_named(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)


def test_non_contiguous_scores_are_accepted():
    scores = torch.randn(6, 6)
    torch.testing.assert_close(
        hardest_negative_loss(scores.t(), backend="cpu"), hardest_negative_loss(scores.t().contiguous(), backend="cpu")
    )


def test_compiled_op_rejects_bad_input_too():
    with pytest.raises(RuntimeError, match="img_ids must be int64"):
        torch.ops.sgfused.hardest_negative_forward(torch.randn(2, 2), torch.arange(2.0), torch.arange(2), 0.2, True)
