"""Loss modules."""

from __future__ import annotations

from torch import Tensor, nn

from ..ops import hardest_negative_loss, hardest_negative_loss_from_embeddings


class HardestNegativeLoss(nn.Module):
    """Drop-in for the VSE++ / SCAN / SGRAF ``ContrastiveLoss`` (hinge on the hardest negatives).

    ``forward(im, s)`` takes image and caption embeddings as VSE++ does (scores
    ``im @ s^T`` are computed tile by tile and never stored); ``forward(scores)``
    takes a ready ``(Ni, Nc)`` score matrix as SCAN and SGRAF do. ``img_ids`` /
    ``cap_img_ids`` mark positives beyond the diagonal (see
    :func:`sgfused.ops.hardest_negative_loss`).
    """

    def __init__(
        self, margin: float = 0.2, max_violation: bool = True, reduction: str = "sum", backend: str = "auto"
    ) -> None:
        super().__init__()
        self.margin = margin
        self.max_violation = max_violation
        self.reduction = reduction
        self.backend = backend

    def forward(
        self,
        scores_or_im: Tensor,
        s: Tensor | None = None,
        *,
        img_ids: Tensor | None = None,
        cap_img_ids: Tensor | None = None,
    ) -> Tensor:
        options = dict(
            img_ids=img_ids,
            cap_img_ids=cap_img_ids,
            max_violation=self.max_violation,
            reduction=self.reduction,
            backend=self.backend,
        )
        if s is None:
            return hardest_negative_loss(scores_or_im, self.margin, **options)
        return hardest_negative_loss_from_embeddings(scores_or_im, s, self.margin, **options)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, max_violation={self.max_violation}, reduction={self.reduction!r}"
