"""Hard-distractor evaluation: can a model tell an image from its twin?

The synthetic scenes contain *twins* (``{split}_distractors.json``): image ``a``
has the same objects as image ``b`` of its split, but one relation differs
(another predicate, or subject and object swapped) or one attribute does. A
bag-of-objects model scores twins alike; a model that reads relations and
attributes does not. Two views of that, per kind of difference:

- **retrieval on the twin subset**: the standard metrics on the sub-matrix of
  the images that have a twin of that kind and their captions, so every query
  has its hardest distractor among the candidates (rows ``"relation twins"``
  and ``"attribute twins"`` of the results table);
- **twin accuracy**: for every caption of a twin pair, the share for which the
  caption's own image scores higher than the twin (text->image), and
  for every image, the share for which the best of its own captions scores
  higher than the best of the twin's (image->text). A tie counts half a win:
  a model that cannot tell the two apart (on the hard synthetic setting a
  bag-of-regions model gets identical encodings for a relation twin) scores
  50%, chance, not 0%. Each rate comes with its 95% Wilson interval (:func:`wilson_interval`);
- **score response** (``"response"``): how far the score moves when a caption's
  image is replaced by its twin, ``median |s(a, c) - s(b, c)|`` over the
  text->image comparisons, divided by the median over captions of the standard
  deviation of a caption's scores over all images. 0 means the model cannot see
  the difference at all; a value near 1 means the twin change moves the score as
  much as swapping in an unrelated image does. It separates "blind to the
  difference" (0, accuracy 50%) from "sees it but does not use it" (> 0,
  accuracy still near 50%).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ._files import read_json
from .evaluate import retrieval_metrics

KINDS = {"relation twins": ("predicate", "direction"), "attribute twins": ("attribute",)}


def load_distractors(data_path: str | os.PathLike[str], split: str) -> list[dict[str, Any]] | None:
    """The twin records of a split, or None when the dataset has none (real datasets)."""
    path = Path(data_path) / f"{split}_distractors.json"
    if not path.exists():
        return None
    records = read_json(path, "distractor")
    if not isinstance(records, list) or not all({"image", "twin_of", "differs"} <= set(r) for r in records):
        raise ValueError(f"distractor file {str(path)!r}: expected a list of {{'image', 'twin_of', 'differs'}} records")
    return records


def _pairs(records: Sequence[dict[str, Any]], kinds: tuple[str, ...], n_images: int) -> Tensor:
    pairs = [(r["image"], r["twin_of"]) for r in records if r["differs"] in kinds]
    for a, b in pairs:
        if not (0 <= a < n_images and 0 <= b < n_images):
            raise ValueError(f"distractor pair ({a}, {b}) is outside the split's {n_images} images")
    return torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)


def twin_accuracy(sims: Tensor, pairs: Tensor, captions_per_image: int) -> dict[str, float]:
    """Percent of twin comparisons won, both directions (see the module docstring)."""
    both = torch.cat([pairs, pairs.flip(1)])  # every image of a pair against its twin
    own, twin = both[:, 0], both[:, 1]
    own_caps = own[:, None] * captions_per_image + torch.arange(captions_per_image)  # (P, c)
    t2i = _wins(sims[own[:, None], own_caps], sims[twin[:, None], own_caps])
    twin_caps = twin[:, None] * captions_per_image + torch.arange(captions_per_image)
    i2t = _wins(sims[own[:, None], own_caps].amax(1), sims[own[:, None], twin_caps].amax(1))
    gap = (sims[own[:, None], own_caps] - sims[twin[:, None], own_caps]).abs().double().median()
    spread = sims.double().std(0).median()
    response = (gap / spread).item() if spread > 0 else 0.0
    rates = {"i2t": 100.0 * i2t.mean().item(), "t2i": 100.0 * t2i.mean().item()}
    return {**rates, "pairs": len(pairs), "i2t_trials": i2t.numel(), "t2i_trials": t2i.numel(),
            "i2t_ci95": wilson_interval(rates["i2t"], i2t.numel()), "t2i_ci95": wilson_interval(rates["t2i"], t2i.numel()),
            "response": response}


def _wins(own: Tensor, other: Tensor) -> Tensor:
    """1 where ``own`` scores higher, 0.5 on a tie, 0 where lower (float64)."""
    return (own > other).double() + 0.5 * (own == other).double()


def wilson_interval(percent: float, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a rate of ``percent``% over ``trials`` trials, in percent."""
    if trials < 1:
        raise ValueError(f"wilson_interval: trials must be >= 1, got {trials}")
    p, n = percent / 100.0, trials
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100.0 * max(centre - half, 0.0), 100.0 * min(centre + half, 1.0)


def twin_results(
    sims: Tensor, records: Sequence[dict[str, Any]], captions_per_image: int
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Table rows (metrics on each twin subset) and twin accuracies, per kind present in ``records``."""
    sims = torch.as_tensor(sims)
    rows, accuracy = {}, {}
    for name, kinds in KINDS.items():
        pairs = _pairs(records, kinds, sims.shape[0])
        if len(pairs) == 0:
            continue
        images = pairs.flatten().unique()
        captions = (images[:, None] * captions_per_image + torch.arange(captions_per_image)).flatten()
        rows[name] = retrieval_metrics(sims[images][:, captions], captions_per_image)
        accuracy[name] = twin_accuracy(sims, pairs, captions_per_image)
    return rows, accuracy


def format_twin_accuracy(accuracy: dict[str, dict[str, Any]]) -> str:
    """One line per kind: ``relation twins: image->text 81.2% [75.0, 86.2], text->image ... (40 pairs; ...)``.

    The brackets are the 95% Wilson intervals of the rates (``i2t_ci95``, ``t2i_ci95``).
    """

    def rate(a: dict[str, Any], way: str) -> str:
        low, high = a[f"{way}_ci95"]
        return f"{a[way]:.1f}% [{low:.1f}, {high:.1f}]"

    return "\n".join(
        f"{name}: image->text {rate(a, 'i2t')}, text->image {rate(a, 't2i')} ({a['pairs']} pairs; chance 50%; "
        f"95% Wilson intervals), score response {a['response']:.3f}"
        for name, a in accuracy.items()
    )
