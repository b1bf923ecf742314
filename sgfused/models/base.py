"""What the trainer and the evaluator need from a model, and the loss every paper uses.

A retrieval model encodes images and captions separately (so evaluation encodes
each once) and scores every image against every caption in one call. The
encodings are tensors, or tuples of tensors, whose first dimension is the batch:
the evaluator concatenates and slices them along it.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from ..data.batch import CaptionBatch, ImageBatch, PairBatch
from ..distributed import global_batch_loss
from ..ops import hardest_negative_loss
from .state_versions import check_state_version


class RetrievalModel(nn.Module):
    """Base class of every model in :mod:`sgfused.models`.

    Subclasses implement :meth:`encode_images`, :meth:`encode_captions` and
    :meth:`similarity`; the default :meth:`loss` is the in-batch
    hardest-negative triplet loss (VSE++ max violation) on the pair batch's
    image x caption score matrix, with the pairs of one image as the positives
    (another caption of the same image is never a negative).
    ``margin`` and ``max_violation`` are attributes a subclass sets.
    """

    margin: float = 0.2
    max_violation: bool = True
    # True (set by the trainer under torchrun): loss() is this rank's share of the global batch's loss,
    # with the hardest negatives taken over every rank's pairs (sgfused.distributed.global_batch_loss)
    global_negatives: bool = False
    # True: encode_images normalises over the batch's images in training (BatchNorm), so under torchrun
    # each rank encodes the whole global batch's images rather than gathering encodings of its shard
    image_batch_statistics: bool = False
    reference: bool = False  # True: every sgfused.ops call runs on the reference backend
    registry_name: str = ""
    # Optional dataset parts the model reads: any of "boxes", "image_graphs", "caption_graphs".
    data_requirements: tuple[str, ...] = ()
    # option: (state-dict version that changed its default, the default before); checkpoints of older
    # versions that left the option out are rebuilt with the old default (sgfused.models.state_versions)
    former_defaults: dict[str, tuple[int, Any]] = {}
    # state dicts older than this version are refused on loading, ``incompatible_change`` saying why
    oldest_state_version: int | None = None
    incompatible_change: str = ""

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, *args: Any) -> None:
        if self.oldest_state_version is not None:
            check_state_version(type(self).__name__, local_metadata, self.oldest_state_version, self.incompatible_change)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    @classmethod
    def config_keys(cls) -> list[str]:
        """The keyword options of the constructor (everything but ``vocab_size``)."""
        params = inspect.signature(cls.__init__).parameters
        kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        return [n for n, p in params.items() if n not in ("self", "vocab_size") and p.kind in kinds]

    def set_vocabulary(self, vocab: Any) -> None:
        """Tell the model the words behind its token ids (SGFN embeds scene-graph labels with them); default: unused."""

    def encode_images(self, images: ImageBatch) -> Any:
        raise NotImplementedError

    def encode_captions(self, captions: CaptionBatch) -> Any:
        raise NotImplementedError

    def similarity(self, images: Any, captions: Any) -> Tensor:
        """Scores ``(n_images, n_captions)`` for every pair of the given encodings."""
        raise NotImplementedError

    @property
    def backend(self) -> str:
        """The backend of every op call: ``"reference"`` when the model was built with ``reference=True``."""
        return "reference" if self.reference else "auto"

    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups at base learning rate ``lr``; a model with a pre-trained part overrides it."""
        return [{"params": list(self.parameters()), "lr": lr}]

    def loss(self, batch: PairBatch) -> Tensor:
        """The summed triplet loss of the batch's pairs; positives are told apart by image id, not position.

        Pair ``(row i, caption c)`` is positive iff ``images.index[i] == captions.image_index[c]``, so a
        second caption of the same image in the batch is neither a negative (under max violation it
        would be the hardest one and cancel the caption's gradient) nor a positive counted twice: an
        image held by k rows gives each of its captions k positive rows, whose hinges are averaged.
        Without repeated images this is the VSE++ loss with the diagonal as the positives.
        With ``global_negatives`` the batch is this rank's shard and the loss its share of the global
        batch's loss (:func:`sgfused.distributed.global_batch_loss`).
        """
        img_ids, cap_img_ids = batch.images.index, batch.captions.image_index
        if img_ids.shape != cap_img_ids.shape or not torch.equal(img_ids, cap_img_ids):
            raise ValueError(_pair_mismatch(img_ids, cap_img_ids))
        if self.global_negatives:
            return global_batch_loss(self, batch)
        scores = self.similarity(self.encode_images(batch.images), self.encode_captions(batch.captions))
        return self.caption_losses(scores, img_ids, cap_img_ids).sum()

    def caption_losses(self, scores: Tensor, img_ids: Tensor, cap_img_ids: Tensor) -> Tensor:
        """Each caption's term of :meth:`loss` on the score matrix ``scores (n_images, n_captions)``: ``(n_captions,)``."""
        per_caption = hardest_negative_loss(
            scores,
            margin=self.margin,
            img_ids=img_ids,
            cap_img_ids=cap_img_ids,
            max_violation=self.max_violation,
            reduction="none",
            backend=self.backend,
        )
        rows_of_image = (img_ids[None, :] == cap_img_ids[:, None]).sum(1)  # >= 1: caption c's own row
        return per_caption / rows_of_image


def _pair_mismatch(img_ids: Tensor, cap_img_ids: Tensor) -> str:
    """The one-line error for a PairBatch whose row b is not the image of caption b."""
    expected = "images.index must equal captions.image_index (row b is the image of caption b)"
    if img_ids.shape != cap_img_ids.shape:
        return f"PairBatch: {expected}; got {img_ids.numel()} images and {cap_img_ids.numel()} captions"
    b = int((img_ids != cap_img_ids).nonzero()[0, 0])
    return f"PairBatch: {expected}; row {b} holds image {int(img_ids[b])}, caption {b} is of image {int(cap_img_ids[b])}"
