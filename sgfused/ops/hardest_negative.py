"""In-batch hardest-negative mining (VSE++ max violation), docs/hardest_negative_contract.md.

Two entry points share one loss:

* :func:`hardest_negative_loss` takes an image x caption score matrix;
* :func:`hardest_negative_loss_from_embeddings` takes image and caption embeddings
  and never stores the score matrix (the kernels compute it tile by tile), so
  memory stays O(N) for any batch.

Both are thin: check the input, pick a backend (``sgfused._backend``), call the
registered operator. The compiled operators are declared in ``csrc/ops.cpp``;
this module adds their fake kernels and autograd formulas, and wraps the Triton
launchers as ``torch.library.custom_op`` so every path runs under
``torch.compile`` and passes ``torch.library.opcheck``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .._backend import choose_backend
from ._checks import (
    as_index_tensor,
    check_nonempty,
    check_option,
    check_same_device,
    check_size,
    check_tensor,
    checked_finite,
)
from ._registration import register_forward_backward

REDUCTIONS = ("sum", "mean", "none")


# ---------------------------------------------------------------- Triton as custom ops
def _checked_triton_ids(img_ids: Tensor, cap_img_ids: Tensor, n_img: int, n_cap: int) -> tuple[Tensor, Tensor]:
    """The raw Triton operators check ids exactly as the compiled ones (one C++ check for both)."""
    return (
        torch.ops.sgfused.checked_ids(img_ids, n_img, "img_ids"),
        torch.ops.sgfused.checked_ids(cap_img_ids, n_cap, "cap_img_ids"),
    )


@torch.library.custom_op("sgfused::hardest_negative_forward_triton", mutates_args=())
def _triton_forward(
    scores: Tensor, img_ids: Tensor, cap_img_ids: Tensor, margin: float, max_violation: bool
) -> tuple[Tensor, Tensor, Tensor]:
    from ..triton import hardest_negative as kernels

    img_ids, cap_img_ids = _checked_triton_ids(img_ids, cap_img_ids, scores.shape[0], scores.shape[1])
    torch.ops.sgfused.check_finite(scores, "scores", img_ids)
    return kernels.forward(scores, img_ids, cap_img_ids, margin, max_violation)


@torch.library.custom_op("sgfused::hardest_negative_backward_triton", mutates_args=())
def _triton_backward(
    grad_per_caption: Tensor,
    scores: Tensor,
    img_ids: Tensor,
    cap_img_ids: Tensor,
    hard_cap: Tensor,
    hard_img: Tensor,
    margin: float,
    max_violation: bool,
) -> Tensor:
    from ..triton import hardest_negative as kernels

    img_ids, cap_img_ids = _checked_triton_ids(img_ids, cap_img_ids, scores.shape[0], scores.shape[1])
    return kernels.backward(grad_per_caption, scores, img_ids, cap_img_ids, hard_cap, hard_img, margin, max_violation)


@torch.library.custom_op("sgfused::hardest_negative_embed_forward_triton", mutates_args=())
def _triton_embed_forward(
    img: Tensor, cap: Tensor, img_ids: Tensor, cap_img_ids: Tensor, margin: float, max_violation: bool
) -> tuple[Tensor, Tensor, Tensor]:
    from ..triton import hardest_negative as kernels

    img_ids, cap_img_ids = _checked_triton_ids(img_ids, cap_img_ids, img.shape[0], cap.shape[0])
    torch.ops.sgfused.check_finite(img, "img", img_ids)
    torch.ops.sgfused.check_finite(cap, "cap", img_ids)
    return kernels.embed_forward(img, cap, img_ids, cap_img_ids, margin, max_violation)


@torch.library.custom_op("sgfused::hardest_negative_embed_backward_triton", mutates_args=())
def _triton_embed_backward(
    grad_per_caption: Tensor,
    img: Tensor,
    cap: Tensor,
    img_ids: Tensor,
    cap_img_ids: Tensor,
    hard_cap: Tensor,
    hard_img: Tensor,
    margin: float,
    max_violation: bool,
) -> tuple[Tensor, Tensor]:
    from ..triton import hardest_negative as kernels

    img_ids, cap_img_ids = _checked_triton_ids(img_ids, cap_img_ids, img.shape[0], cap.shape[0])
    return kernels.embed_backward(
        grad_per_caption, img, cap, img_ids, cap_img_ids, hard_cap, hard_img, margin, max_violation
    )


# ---------------------------------------------------------------- fake kernels
def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 (so gradcheck sees full precision)."""
    return torch.promote_types(dtype, torch.float32)


def _fake_terms(first: Tensor, n_cap: int, img_ids: Tensor, cap_img_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    per_caption = first.new_empty(n_cap, dtype=_accumulation_dtype(first.dtype))
    return per_caption, img_ids.new_empty(img_ids.shape[0]), cap_img_ids.new_empty(cap_img_ids.shape[0])


def _fake_forward(scores, img_ids, cap_img_ids, margin, max_violation):
    return _fake_terms(scores, scores.shape[1], img_ids, cap_img_ids)


def _fake_embed_forward(img, cap, img_ids, cap_img_ids, margin, max_violation):
    return _fake_terms(img, cap.shape[0], img_ids, cap_img_ids)


def _fake_backward(grad_per_caption, scores, *rest):
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


def _fake_embed_backward(grad_per_caption, img, cap, *rest):
    return (
        torch.empty_like(img, memory_format=torch.contiguous_format),
        torch.empty_like(cap, memory_format=torch.contiguous_format),
    )


# ---------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output) -> None:
    *tensors, margin, max_violation = inputs
    _, hard_cap, hard_img = output
    ctx.save_for_backward(*tensors, hard_cap, hard_img)
    ctx.margin, ctx.max_violation = margin, max_violation


def _scores_backward_via(backward_op):
    def backward(ctx, grad_per_caption, _grad_hard_cap, _grad_hard_img):
        scores, img_ids, cap_img_ids, hard_cap, hard_img = ctx.saved_tensors
        grad = backward_op(
            grad_per_caption.contiguous(), scores, img_ids, cap_img_ids, hard_cap, hard_img, ctx.margin, ctx.max_violation
        )
        return grad, None, None, None, None

    return backward


def _embed_backward_via(backward_op):
    def backward(ctx, grad_per_caption, _grad_hard_cap, _grad_hard_img):
        img, cap, img_ids, cap_img_ids, hard_cap, hard_img = ctx.saved_tensors
        grad_img, grad_cap = backward_op(
            grad_per_caption.contiguous(), img, cap, img_ids, cap_img_ids, hard_cap, hard_img, ctx.margin, ctx.max_violation
        )
        return grad_img, grad_cap, None, None, None, None

    return backward


def register() -> None:
    """Attach fake kernels and autograd to the compiled and Triton operators (called once at import)."""
    register_forward_backward("hardest_negative", _fake_forward, _fake_backward, _scores_backward_via, _setup_context)
    register_forward_backward(
        "hardest_negative_embed", _fake_embed_forward, _fake_embed_backward, _embed_backward_via, _setup_context
    )


# ---------------------------------------------------------------- public API
def _positive_ids(
    n_img: int, n_cap: int, img_ids: Tensor | None, cap_img_ids: Tensor | None, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Checked int64 ids; the diagonal (0..N-1 on both sides) when none are given."""
    if img_ids is None and cap_img_ids is None:
        if n_img != n_cap:
            raise ValueError(
                f"without img_ids / cap_img_ids the positives are the diagonal, which needs as many "
                f"images as captions; got {n_img} images and {n_cap} captions"
            )
        ids = torch.arange(n_img, device=device)
        return ids, ids
    if img_ids is None:
        img_ids = torch.arange(n_img, device=device)
    if cap_img_ids is None:
        raise ValueError("cap_img_ids is required when img_ids is given")
    check_tensor("img_ids", img_ids, 1, floating=False)
    check_tensor("cap_img_ids", cap_img_ids, 1, floating=False)
    check_size("img_ids", img_ids, 0, n_img, "one id per image")
    check_size("cap_img_ids", cap_img_ids, 0, n_cap, "one image id per caption")
    return img_ids.long().contiguous(), cap_img_ids.long().contiguous()


def _count_positives(img_ids: Tensor, cap_img_ids: Tensor) -> Tensor:
    """Number of (image, caption) pairs with equal ids, in O(N log N) without an N x N mask."""
    sorted_ids = img_ids.sort().values
    per_caption = torch.searchsorted(sorted_ids, cap_img_ids, right=True) - torch.searchsorted(sorted_ids, cap_img_ids)
    return per_caption.sum()


def _reduce(per_caption: Tensor, img_ids: Tensor, cap_img_ids: Tensor, reduction: str) -> Tensor:
    if reduction == "sum":
        return per_caption.sum()
    if reduction == "mean":
        return per_caption.sum() / _count_positives(img_ids, cap_img_ids).clamp(min=1)
    return per_caption


def _check_options(margin: float, reduction: str) -> float:
    """The margin as a float (finite, within the float32 range the kernels use); a known reduction."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return check_option("margin", margin)


def _reference_checked(values: dict[str, Tensor], reference_terms):
    """The reference terms behind the ``sgfused::check_finite`` operator the kernels' check uses.

    The fused kernels refuse non-finite input themselves; the reference runs as traced
    Python, so its check is an operator whose output (the ids) it uses, and which
    torch.compile therefore keeps.
    """

    def terms(*args):
        *tensors, img_ids, cap_img_ids, margin, max_violation = args
        for name, value in values.items():
            img_ids = checked_finite(name, value, img_ids)
        return reference_terms(*tensors, img_ids, cap_img_ids, margin, max_violation)

    return terms


_SCORE_TERMS = {
    "reference": reference.hardest_negative_terms,
    "cpu": lambda *args: torch.ops.sgfused.hardest_negative_forward(*args),
    "cuda": lambda *args: torch.ops.sgfused.hardest_negative_forward(*args),
    "triton": lambda *args: torch.ops.sgfused.hardest_negative_forward_triton(*args),
}
_EMBED_TERMS = {
    "reference": reference.hardest_negative_embed_terms,
    "cpu": lambda *args: torch.ops.sgfused.hardest_negative_embed_forward(*args),
    "triton": lambda *args: torch.ops.sgfused.hardest_negative_embed_forward_triton(*args),
}


def hardest_negative_loss(
    scores: Tensor,
    margin: float = 0.2,
    *,
    img_ids: Tensor | None = None,
    cap_img_ids: Tensor | None = None,
    max_violation: bool = True,
    reduction: str = "sum",
    return_indices: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Hinge loss of every positive pair against its hardest in-batch negatives.

    Args:
        scores: ``(Ni, Nc)`` image x caption similarities (fp16, bf16, fp32 or fp64;
            any layout).
        margin: the hinge margin (VSE++ / SGRAF: 0.2).
        img_ids, cap_img_ids: ``(Ni,)`` and ``(Nc,)`` integer ids (tensors or lists of ints); pair ``(i, c)`` is
            positive iff ``img_ids[i] == cap_img_ids[c]`` (e.g. five captions per image:
            ``cap_img_ids = arange(Ni).repeat_interleave(5)``). ``img_ids`` defaults to
            ``arange(Ni)``; with neither given the positives are the diagonal.
        max_violation: hinge against the hardest negative only (VSE++); False sums
            the hinges of all negatives (SCAN).
        reduction: ``"sum"`` (VSE++ / SGRAF), ``"mean"`` (over positive pairs) or
            ``"none"``: a ``(Nc,)`` vector whose entry ``c`` is the loss of caption
            ``c``'s positive pair (the sum over them if several images share its id,
            0 if it has none).
        return_indices: also return ``hard_cap (Ni,)``, the hardest negative caption
            of every image, and ``hard_img (Nc,)``, the hardest negative image of every
            caption (-1 where a row or column has no negative; ties pick the lowest index).
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``.

    Returns:
        The loss, float32 whatever the input dtype (float64 for float64 input):
        it is a sum over the batch, where fp16 could overflow. A positive with no
        negative in its row (column) contributes 0 for that direction.

    Raises ``ValueError`` if ``scores`` contains NaN or +-inf (the first position is named)
    or ``margin`` is not a finite float32 number, in eager mode and under torch.compile alike.
    """
    check_tensor("scores", scores, 2)
    check_nonempty("scores", scores)
    img_ids = as_index_tensor("img_ids", img_ids, scores.device)
    cap_img_ids = as_index_tensor("cap_img_ids", cap_img_ids, scores.device)
    check_same_device(scores=scores, img_ids=img_ids, cap_img_ids=cap_img_ids)
    margin = _check_options(margin, reduction)
    img_ids, cap_img_ids = _positive_ids(scores.shape[0], scores.shape[1], img_ids, cap_img_ids, scores.device)
    args = (scores.contiguous(), img_ids, cap_img_ids, margin, bool(max_violation))
    chosen = choose_backend("hardest_negative_loss", backend, scores.device, _SCORE_TERMS, args)
    terms = _SCORE_TERMS[chosen]
    if chosen == "reference":
        terms = _reference_checked({"scores": scores}, terms)
    per_caption, hard_cap, hard_img = terms(*args)
    loss = _reduce(per_caption, img_ids, cap_img_ids, reduction)
    return (loss, hard_cap, hard_img) if return_indices else loss


def hardest_negative_loss_from_embeddings(
    img: Tensor,
    cap: Tensor,
    margin: float = 0.2,
    *,
    img_ids: Tensor | None = None,
    cap_img_ids: Tensor | None = None,
    max_violation: bool = True,
    reduction: str = "sum",
    return_indices: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """:func:`hardest_negative_loss` of ``scores = img @ cap^T`` without storing ``scores``.

    ``img`` is ``(Ni, d)``, ``cap`` is ``(Nc, d)`` (normalise them first for cosine
    scores, as VSE++ does). The fused backends compute the scores tile by tile
    in fp32, so extra memory is O((Ni + Nc) * d) whatever the batch; gradients flow
    to both embeddings. Backends: reference, cpu, triton (CUDA tensors use Triton).
    Other arguments and the result are as in :func:`hardest_negative_loss`.
    """
    check_tensor("img", img, 2)
    check_tensor("cap", cap, 2)
    check_nonempty("img", img)
    check_nonempty("cap", cap)
    check_size("cap", cap, 1, img.shape[1], "the embedding size of img")
    if cap.dtype != img.dtype:
        raise TypeError(f"img and cap must share a dtype, got img {img.dtype} and cap {cap.dtype}")
    img_ids = as_index_tensor("img_ids", img_ids, img.device)
    cap_img_ids = as_index_tensor("cap_img_ids", cap_img_ids, img.device)
    check_same_device(img=img, cap=cap, img_ids=img_ids, cap_img_ids=cap_img_ids)
    margin = _check_options(margin, reduction)
    img_ids, cap_img_ids = _positive_ids(img.shape[0], cap.shape[0], img_ids, cap_img_ids, img.device)
    chosen = choose_backend("hardest_negative_loss_from_embeddings", backend, img.device, _EMBED_TERMS)
    terms = _EMBED_TERMS[chosen]
    if chosen == "reference":
        terms = _reference_checked({"img": img, "cap": cap}, terms)
    per_caption, hard_cap, hard_img = terms(img.contiguous(), cap.contiguous(), img_ids, cap_img_ids, margin,
                                            bool(max_violation))
    loss = _reduce(per_caption, img_ids, cap_img_ids, reduction)
    return (loss, hard_cap, hard_img) if return_indices else loss
