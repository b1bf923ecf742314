"""The standard image-text retrieval evaluation: similarity matrix, recalls, 5-fold 1K, ensembles.

Every paper this package implements reports the same protocol (SCAN / VSE++):

- image -> text: for each image, the rank of the best-ranked of its own
  captions among all captions; text -> image: for each caption, the rank of its
  image among all images. Caption ``k`` belongs to image ``k // c`` where
  ``c = n_captions // n_images`` (5 for Flickr30K and MS-COCO);
- R@1, R@5, R@10 (percent of queries whose rank is at most K), the median rank
  (``floor`` of the median of the 1-based ranks, as SCAN computes it) and the
  mean rank, for both directions, and rSum, the sum of the six recalls;
- MS-COCO also reports "5-fold 1K": the 5000 test images are cut into five folds
  of 1000 images with their captions (the diagonal blocks of the full matrix),
  each fold is scored alone and the metrics are averaged;
- SGRAF and MPSM report an ensemble: the average of the similarity matrices of
  two models trained separately (SGR and SAF), hence :func:`save_similarity`,
  :func:`load_similarity` and :func:`ensemble`.

Ties are broken *against* the ground truth: a candidate that scores exactly as
high as the ground truth counts as ranked above it (for image -> text, above
the best of the image's own captions; the other own captions never count).
The SCAN / VSE++ code ranks with ``argsort``, which leaves ties to the sort
order, so a degenerate model (say, a constant similarity matrix) can get credit
there; here it gets the worst rank possible, and a reported recall is never
flattered by ties.

The metrics are vectorised over row chunks of the matrix (a few million
elements at a time), so the COCO 5K matrix (5000 x 25000) is never copied, nor
widened to float64. :func:`similarity_matrix` encodes every image and every
caption once and fills a preallocated float32 matrix block by block.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ._files import atomic_write
from .data.batch import CaptionBatch, ImageBatch
from .data.precomp import PrecompSplit, caption_loader, image_loader
from .distributed import World, current_world, gather_rows, image_rows

if TYPE_CHECKING:  # only the interface is used; the models package imports every model
    from .models.base import RetrievalModel

Matrix = Union[np.ndarray, Tensor]
Encoding = Union[Tensor, tuple[Tensor, ...]]

RECALL_KS = (1, 5, 10)
DIRECTIONS = ("i2t", "t2i")
METRIC_KEYS = tuple(
    f"{d}_{m}" for d in DIRECTIONS for m in [f"r{k}" for k in RECALL_KS] + ["medr", "meanr"]
) + ("rsum",)
FOLDS = 5
_CHUNK_ELEMENTS = 1 << 22  # matrix elements compared at once: bounds the temporary memory


# ----------------------------------------------------------------------------- metrics


def _check_matrix(sims: Any, name: str = "sims") -> None:
    if not isinstance(sims, (np.ndarray, Tensor)):
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(sims).__name__}")
    if sims.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_images, n_captions), got shape {tuple(sims.shape)}")
    floating = sims.is_floating_point() if isinstance(sims, Tensor) else np.issubdtype(sims.dtype, np.floating)
    if not floating:
        raise TypeError(f"{name} must hold floating-point scores, got dtype {sims.dtype}")
    if sims.shape[0] == 0 or sims.shape[1] == 0:
        raise ValueError(f"{name} must have at least one image and one caption, got shape {tuple(sims.shape)}")


def _captions_per_image(shape: tuple[int, ...], captions_per_image: int | None) -> int:
    n_images, n_captions = shape
    if captions_per_image is None:
        if n_captions % n_images:
            raise ValueError(
                f"n_captions ({n_captions}) must be a multiple of n_images ({n_images}): "
                f"caption k belongs to image k // (n_captions // n_images)"
            )
        return n_captions // n_images
    if captions_per_image < 1 or n_captions != n_images * captions_per_image:
        raise ValueError(
            f"captions_per_image={captions_per_image} does not fit sims of shape {tuple(shape)}: "
            f"expected n_captions = n_images * captions_per_image = {n_images * max(captions_per_image, 0)}"
        )
    return captions_per_image


def _rows(sims: Matrix, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` as a tensor (a bounded copy for numpy input, a view for a tensor)."""
    if isinstance(sims, np.ndarray):
        return torch.from_numpy(np.array(sims[start:stop]))
    return sims[start:stop].detach()


def _ground_truth_scores(sims: Matrix, captions_per_image: int) -> Tensor:
    """``sims[k // captions_per_image, k]`` for every caption ``k``."""
    captions = np.arange(sims.shape[1])
    images = captions // captions_per_image
    if isinstance(sims, np.ndarray):
        return torch.from_numpy(np.array(sims[images, captions]))
    device = sims.device
    return sims.detach()[torch.from_numpy(images).to(device), torch.from_numpy(captions).to(device)]


def retrieval_ranks(sims: Matrix, captions_per_image: int | None = None) -> tuple[Tensor, Tensor]:
    """1-based ranks ``(i2t (n_images,), t2i (n_captions,))``, ties counted against the ground truth.

    ``i2t[i]`` is 1 + the number of other images' captions scoring at least as
    high as image ``i``'s best caption; ``t2i[k]`` is 1 + the number of other
    images scoring at least as high for caption ``k`` as its own image.
    Raises ``ValueError`` on NaN scores (a NaN has no rank).
    """
    _check_matrix(sims)
    n_images, n_captions = sims.shape
    per_image = _captions_per_image(tuple(sims.shape), captions_per_image)
    truth = _ground_truth_scores(sims, per_image)
    device = truth.device
    i2t = torch.empty(n_images, dtype=torch.int64, device=device)
    t2i = torch.zeros(n_captions, dtype=torch.int64, device=device)
    step = max(1, _CHUNK_ELEMENTS // n_captions)
    for start in range(0, n_images, step):
        block = _rows(sims, start, min(start + step, n_images))
        if torch.isnan(block).any():
            row = start + int(torch.isnan(block).any(dim=1).nonzero()[0])
            raise ValueError(f"sims contains NaN (first in row {row}); a NaN score has no rank")
        rows = torch.arange(block.shape[0], device=device)
        own = block.reshape(block.shape[0], n_images, per_image)[rows, start + rows]  # (rows, per_image)
        best = own.max(dim=1, keepdim=True).values
        # candidates >= the best own caption, minus the own captions among them
        i2t[start : start + block.shape[0]] = 1 + (block >= best).sum(dim=1) - (own >= best).sum(dim=1)
        # every image scoring >= the caption's own image; the own image itself makes the rank 1-based
        t2i += (block >= truth).sum(dim=0)
    return i2t.cpu(), t2i.cpu()


def _summary(ranks: Tensor, direction: str) -> dict[str, float]:
    ranks_np = ranks.numpy()
    out = {f"{direction}_r{k}": 100.0 * float(np.mean(ranks_np <= k)) for k in RECALL_KS}
    out[f"{direction}_medr"] = float(np.floor(np.median(ranks_np)))
    out[f"{direction}_meanr"] = float(np.mean(ranks_np))
    return out


def retrieval_metrics(sims: Matrix, captions_per_image: int | None = None) -> dict[str, float]:
    """R@1/5/10, median and mean rank in both directions, and rSum, for one similarity matrix.

    ``sims`` is ``(n_images, n_captions)`` (numpy or torch, any float dtype,
    never copied whole); ``captions_per_image`` defaults to
    ``n_captions // n_images``, which must divide exactly. Recalls are in
    percent; the keys are :data:`METRIC_KEYS`. Ties count against the ground
    truth (see the module docstring).
    """
    i2t, t2i = retrieval_ranks(sims, captions_per_image)
    out = _summary(i2t, "i2t") | _summary(t2i, "t2i")
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in DIRECTIONS for k in RECALL_KS)
    return out


def fold5_metrics(sims: Matrix, captions_per_image: int | None = None) -> dict[str, dict[str, float]]:
    """MS-COCO 5-fold 1K protocol, plus the metrics on the whole matrix.

    Fold ``f`` is the diagonal block of images ``f*m : (f+1)*m`` (``m =
    n_images / 5``) against their own captions. Returns table rows
    ``"fold1"`` .. ``"fold5"``, ``"fold5 mean"`` (each metric averaged over the
    folds, as SCAN does, so its rsum is the sum of the mean recalls) and
    ``"full"`` (the usual metrics on all images and captions).
    """
    _check_matrix(sims)
    n_images = sims.shape[0]
    per_image = _captions_per_image(tuple(sims.shape), captions_per_image)
    if n_images % FOLDS:
        raise ValueError(f"5-fold evaluation needs n_images divisible by {FOLDS}, got n_images={n_images}")
    size = n_images // FOLDS
    results: dict[str, dict[str, float]] = {}
    for fold in range(FOLDS):
        images = slice(fold * size, (fold + 1) * size)
        captions = slice(fold * size * per_image, (fold + 1) * size * per_image)
        results[f"fold{fold + 1}"] = retrieval_metrics(sims[images, captions], per_image)
    folds = list(results.values())
    results["fold5 mean"] = {key: float(np.mean([fold[key] for fold in folds])) for key in METRIC_KEYS}
    results["full"] = retrieval_metrics(sims, per_image)
    return results


def evaluate_similarity(
    sims: Matrix, captions_per_image: int | None = None, *, fold5: bool = False
) -> dict[str, dict[str, float]]:
    """Table rows for one similarity matrix: ``{"full": metrics}``, or :func:`fold5_metrics` with ``fold5``.

    Every entry point (:func:`evaluate_model`, the ensemble command)
    reports in this shape, so ``results["full"]`` is always the metrics on the
    whole split and the rows go straight to :func:`format_table` and
    :func:`write_json`.
    """
    if fold5:
        return fold5_metrics(sims, captions_per_image)
    return {"full": retrieval_metrics(sims, captions_per_image)}


# ----------------------------------------------------------------------------- similarity matrix


def encoding_size(encoding: Encoding, name: str = "encoding") -> int:
    """The batch size of an encoding (a tensor, or a tuple of tensors that agree on dim 0)."""
    parts = encoding if isinstance(encoding, tuple) else (encoding,)
    if not parts or not all(isinstance(p, Tensor) and p.ndim >= 1 for p in parts):
        raise TypeError(
            f"{name} must be a tensor or a non-empty tuple of tensors with a batch dimension, "
            f"got {type(encoding).__name__}"
        )
    sizes = {p.shape[0] for p in parts}
    if len(sizes) != 1:
        raise ValueError(f"{name}: the tensors of a tuple encoding disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


def concat_encodings(encodings: Sequence[Encoding]) -> Encoding:
    """Concatenate per-batch encodings along dim 0 (tuple encodings part by part)."""
    if not encodings:
        raise ValueError("concat_encodings needs at least one encoding")
    if not isinstance(encodings[0], tuple):
        return torch.cat(list(encodings))
    if any(not isinstance(e, tuple) or len(e) != len(encodings[0]) for e in encodings):
        raise ValueError(f"tuple encodings must all have {len(encodings[0])} parts")
    return tuple(torch.cat(parts) for parts in zip(*encodings))


def slice_encoding(encoding: Encoding, start: int, stop: int) -> Encoding:
    """Rows ``start:stop`` of an encoding (views, no copy)."""
    if isinstance(encoding, tuple):
        return tuple(part[start:stop] for part in encoding)
    return encoding[start:stop]


def _check_order(kind: str, number: int, index: Tensor, start: int) -> int:
    """Checks that batch ``number`` holds indices ``start, start+1, ...``; returns the next start."""
    expected = torch.arange(start, start + index.numel())
    if index.ndim != 1 or not torch.equal(index.detach().cpu().to(torch.int64), expected):
        shown = index.flatten()[:8].tolist()
        raise ValueError(
            f"{kind} batch {number}: batches must arrive in index order 0..n-1; expected indices "
            f"{start}..{start + index.numel() - 1}, got {shown}{' ...' if index.numel() > 8 else ''}"
        )
    return start + index.numel()


def _encode_all(
    encode: Callable[[Any], Encoding],
    batches: Iterable[ImageBatch] | Iterable[CaptionBatch],
    kind: str,
    device: torch.device,
    first: int = 0,
) -> tuple[list[Encoding], int]:
    """Encodes every batch once (items ``first, first + 1, ...``); returns the encodings (on ``device``) and the item count."""
    encodings: list[Encoding] = []
    count = first
    for number, batch in enumerate(batches):
        start = count
        count = _check_order(kind, number, batch.index, start)
        encoding = encode(batch.to(device))
        size = encoding_size(encoding, f"the encoding of {kind} batch {number}")
        if size != count - start:
            raise ValueError(f"{kind} batch {number} has {count - start} items but its encoding has batch size {size}")
        encodings.append(encoding)
    if count == first:
        raise ValueError(f"{kind}_batches yielded no {kind}s")
    return encodings, count - first


def _caption_pieces(encodings: list[Encoding], shard: int) -> list[tuple[int, Encoding, int]]:
    """``(first column, encoding piece, piece size)``: each batch's encoding cut into at most ``shard`` captions."""
    pieces = []
    offset = 0
    for encoding in encodings:
        size = encoding_size(encoding)
        for start in range(0, size, shard):
            stop = min(start + shard, size)
            pieces.append((offset + start, slice_encoding(encoding, start, stop), stop - start))
        offset += size
    return pieces


def similarity_matrix(
    model: RetrievalModel,
    image_batches: Iterable[ImageBatch],
    caption_batches: Iterable[CaptionBatch],
    *,
    device: torch.device | str = "cpu",
    image_shard: int = 128,
    caption_shard: int = 1024,
    progress: bool = True,
    dtype_autocast: torch.dtype | None = None,
    similarity_dtype: torch.dtype | None = None,
    first_image: int = 0,
) -> Tensor:
    """The ``(n_images, n_captions)`` float32 CPU score matrix of ``model`` on a whole split.

    The model is moved to ``device`` and run in eval mode without gradients
    (its training mode is restored afterwards), under ``torch.autocast`` with
    ``dtype_autocast`` when given. Batches must arrive in index order (their
    ``index`` fields are checked to be 0..n-1). Every image and caption is
    encoded once and the encodings stay on ``device``; the image encodings are
    concatenated and cut into shards of ``image_shard`` images, the caption
    encodings stay per batch (batches may be padded to different lengths) and
    are cut into pieces of at most ``caption_shard`` captions; each
    shard x piece block is scored with ``model.similarity`` and written into the
    preallocated result. ``similarity_dtype`` (e.g. ``torch.bfloat16``) is passed
    to ``model.similarity(..., dtype=)`` for models that take it (SGRAF): the
    dtype of the similarity ops' matrix inputs. ``first_image``: the image batches hold the rows
    ``first_image, first_image + 1, ...`` (one rank's block under sharded evaluation); the result
    then has just those rows.
    """
    for name, value in (("image_shard", image_shard), ("caption_shard", caption_shard)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    similarity_options = {}
    if similarity_dtype is not None:
        if "dtype" not in inspect.signature(model.similarity).parameters:
            raise ValueError(
                f"similarity_dtype: {type(model).__name__}.similarity takes no dtype; "
                f"leave it unset (got {similarity_dtype})"
            )
        similarity_options["dtype"] = similarity_dtype
    device = torch.device(device)
    autocast = (
        torch.autocast(device_type=device.type, dtype=dtype_autocast)
        if dtype_autocast is not None
        else contextlib.nullcontext()
    )
    was_training = model.training
    model.to(device).eval()
    try:
        with torch.no_grad(), autocast:
            image_parts, n_images = _encode_all(model.encode_images, image_batches, "image", device, first_image)
            images = concat_encodings(image_parts)
            del image_parts
            caption_parts, n_captions = _encode_all(model.encode_captions, caption_batches, "caption", device)

            pieces = _caption_pieces(caption_parts, caption_shard)
            shards = range(0, n_images, image_shard)

            sims = torch.empty(n_images, n_captions, dtype=torch.float32)
            bar = tqdm(total=len(pieces) * len(shards), desc="similarity", unit="block", disable=not progress)
            with bar:
                for column, captions, width in pieces:
                    for row in shards:
                        height = min(image_shard, n_images - row)
                        scores = model.similarity(
                            slice_encoding(images, row, row + height), captions, **similarity_options
                        )
                        if tuple(scores.shape) != (height, width):
                            raise ValueError(
                                f"model.similarity returned shape {tuple(scores.shape)} for {height} images "
                                f"x {width} captions; expected ({height}, {width})"
                            )
                        sims[row : row + height, column : column + width].copy_(scores)
                        bar.update()
    finally:
        model.train(was_training)
    return sims


def evaluate_model(
    model: RetrievalModel,
    split_dataset: PrecompSplit,
    *,
    fold5: bool = False,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    progress: bool = True,
    similarity_dtype: torch.dtype | None = None,
    shard_rows: bool = False,
) -> tuple[dict[str, dict[str, float]], Tensor]:
    """Score ``model`` on a dataset split; returns ``(results, sims)``.

    ``results`` are the table rows of :func:`evaluate_similarity` (the whole
    split under ``"full"``, plus the 5-fold rows with ``fold5``); ``sims`` is
    the float32 CPU similarity matrix, ready for :func:`save_similarity`.
    ``similarity_dtype`` as in :func:`similarity_matrix`. ``shard_rows`` (every
    rank of a torch.distributed run calls it so): each rank scores its block of
    image rows and every rank gets the whole gathered matrix (:mod:`sgfused.distributed`).
    """
    world = current_world() if shard_rows else World()
    rows = image_rows(split_dataset.n_images, world)
    sims = similarity_matrix(
        model,
        image_loader(split_dataset, batch_size, images=rows),
        caption_loader(split_dataset, batch_size),
        device=device,
        progress=progress and world.main,
        similarity_dtype=similarity_dtype,
        first_image=rows.start,
    )
    if world.size > 1:
        sims = gather_rows(sims, torch.device(device))
    expected = (split_dataset.n_images, split_dataset.n_captions)
    if tuple(sims.shape) != expected:
        raise ValueError(
            f"the loaders gave a {tuple(sims.shape)} matrix; the split has (n_images, n_captions) = {expected}"
        )
    return evaluate_similarity(sims, split_dataset.captions_per_image, fold5=fold5), sims


# ----------------------------------------------------------------------------- files


def _json_bytes(value: Any, name: str) -> bytes:
    try:
        return (json.dumps(value, indent=2) + "\n").encode()
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be JSON-serialisable: {error}") from None


def _similarity_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(matrix .npy, sidecar .json)`` for ``path`` given with or without the ``.npy`` suffix."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix == ".npy" else path
    return stem.with_name(stem.name + ".npy"), stem.with_name(stem.name + ".json")


def save_similarity(path: str | os.PathLike, sims: Matrix, meta: dict[str, Any]) -> Path:
    """Writes ``sims`` as float32 ``.npy`` plus a ``.json`` sidecar with ``meta``; returns the ``.npy`` path.

    ``meta`` should name the model, split and checkpoint; ``n_images`` and
    ``n_captions`` are added from the matrix (a conflicting value in ``meta``
    is an error). Both files are written atomically.
    """
    _check_matrix(sims)
    array = sims.detach().cpu().numpy() if isinstance(sims, Tensor) else sims
    array = array.astype(np.float32, copy=False)
    shape = {"n_images": int(array.shape[0]), "n_captions": int(array.shape[1])}
    for key, value in shape.items():
        if key in meta and meta[key] != value:
            raise ValueError(f"meta[{key!r}] = {meta[key]!r} but sims has {key} = {value}")
    sidecar = _json_bytes(dict(meta) | shape, "meta")
    npy, info = _similarity_paths(path)
    atomic_write(npy, lambda f: np.save(f, array))
    atomic_write(info, lambda f: f.write(sidecar))
    return npy


def _read_similarity(path: str | os.PathLike, mmap: bool) -> tuple[np.ndarray, dict[str, Any]]:
    npy, info = _similarity_paths(path)
    for file in (npy, info):
        if not file.is_file():
            raise FileNotFoundError(f"similarity file {file} does not exist (written by save_similarity?)")
    array = np.load(npy, mmap_mode="r" if mmap else None)
    meta = json.loads(info.read_text())
    if array.ndim != 2 or array.dtype != np.float32:
        raise ValueError(f"{npy} must hold a 2-D float32 matrix, got shape {array.shape} dtype {array.dtype}")
    recorded = (meta.get("n_images"), meta.get("n_captions"))
    if recorded != array.shape:
        raise ValueError(f"{npy} has shape {array.shape} but {info} records (n_images, n_captions) = {recorded}")
    return array, meta


def load_similarity(path: str | os.PathLike) -> tuple[Tensor, dict[str, Any]]:
    """``(sims, meta)`` as written by :func:`save_similarity` (a float32 CPU tensor and the sidecar dict)."""
    array, meta = _read_similarity(path, mmap=False)
    return torch.from_numpy(array), meta


# sidecar entries that must agree between the matrices of an ensemble (key -> what differs, for the error)
ENSEMBLE_KEYS = {"data": "datasets", "split": "splits", "captions_per_image": "caption counts"}


def ensemble(paths: Sequence[str | os.PathLike]) -> tuple[Tensor, dict[str, Any]]:
    """The average of saved similarity matrices (SGRAF's SGR + SAF ensemble) and the first one's metadata.

    All matrices must have the same shape and, where both sidecars record them,
    the same dataset folder, split and captions per image (:data:`ENSEMBLE_KEYS`):
    an average of scores of different captions would be a number about nothing.
    Memory: the result plus one memory-mapped input at a time.
    """
    if not paths:
        raise ValueError("ensemble needs at least one similarity file")
    first, *others = [_similarity_paths(path)[0] for path in paths]
    total, first_meta = _read_similarity(first, mmap=False)
    for path in others:
        array, meta = _read_similarity(path, mmap=True)
        if array.shape != total.shape:
            raise ValueError(
                f"cannot average similarity matrices of different shapes: {first} has {total.shape}, "
                f"{path} has {array.shape}"
            )
        for key, what in ENSEMBLE_KEYS.items():
            if key in meta and key in first_meta and meta[key] != first_meta[key]:
                raise ValueError(
                    f"cannot average matrices of different {what}: {first} has {key} {first_meta[key]!r}, "
                    f"{path} has {meta[key]!r}"
                )
        np.add(total, array, out=total)
    total /= len(paths)
    return torch.from_numpy(total), first_meta


# ----------------------------------------------------------------------------- reports

_COLUMNS = [(f"R@{k}", f"r{k}") for k in RECALL_KS] + [("medr", "medr"), ("meanr", "meanr")]
_WIDTH = 7


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A fixed-width table: one row per entry of ``results`` (e.g. "test", "fold5 mean", "ensemble").

    Columns: image -> text R@1 R@5 R@10 medr meanr, text -> image the same, rsum.
    """
    label = max((len(name) for name in results), default=0)
    group = len(_COLUMNS) * _WIDTH
    lines = [
        " " * label + f"{'image -> text':^{group}}{'text -> image':^{group}}" + " " * (_WIDTH + 1),
        " " * label + "".join(f"{title:>{_WIDTH}}" for title, _ in _COLUMNS) * 2 + f"{'rsum':>{_WIDTH + 1}}",
    ]
    for name, metrics in results.items():
        missing = [key for key in METRIC_KEYS if key not in metrics]
        if missing:
            raise KeyError(f"results[{name!r}] lacks the metrics {missing}")
        values = "".join(f"{metrics[f'{d}_{key}']:>{_WIDTH}.1f}" for d in DIRECTIONS for _, key in _COLUMNS)
        lines.append(f"{name:<{label}}{values}{metrics['rsum']:>{_WIDTH + 1}.1f}")
    return "\n".join(lines)


def write_json(path: str | os.PathLike, results: dict[str, Any]) -> None:
    """Writes ``results`` as indented JSON, atomically (temporary file + ``os.replace``)."""
    atomic_write(Path(path), lambda f: f.write(_json_bytes(results, "results")))
