"""A gallery index: one split's image and caption encodings, stored once, memory-mapped on use.

``build_index`` runs a checkpoint's model over a split exactly as evaluation does
(:func:`sgfused.evaluate.similarity_matrix` encodes each item once; so does this) and
writes, in folder ``OUT``:

* ``image_J.npy`` / ``caption_J.npy``: part ``J`` of the model's image / caption
  encodings (a model's encoding is a tensor or a tuple of tensors), all items in
  split order; parts with a node dimension (3-D) are zero-padded to the split's widest
  batch along it (their lengths, stored in a part of their own, keep padding out of
  every score);
* ``image_global.npy`` / ``caption_global.npy``: the unit global vectors of
  :mod:`sgfused.retrieval.pooled` (the shortlist's key): the model's own pooled
  vectors, or, with ``shortlist_checkpoint``, those of a second, trained checkpoint
  (a dual encoder such as VSE++, whose score *is* this cosine: the usual first stage
  of a retrieve-then-re-rank pipeline, since a cross-attention model's pooled vectors
  are not trained to retrieve on their own);
* ``captions.json`` (the caption texts), and, when the split has them, ``boxes.npy``
  (region boxes as fractions of the image size), ``sizes.npy`` (image width, height)
  and ``region_labels.json`` (the visual graph's object label of each region);
* ``manifest.json``: the format, model name, the checkpoint's path and fingerprint
  (a hash of its model name, config, vocabulary and weights), the shortlist key's
  checkpoint likewise (``shortlist``, null for the model's own vectors), the data
  folder, split and a fingerprint of the split's files, and the shapes.

:meth:`GalleryIndex.open` memory-maps the arrays (a node part served only up to its items'
largest node count, :func:`_trimmed`); :meth:`GalleryIndex.load_model` and
:meth:`GalleryIndex.load_shortlist_model` refuse a checkpoint whose fingerprint differs
from the recorded one, and opening
refuses an index whose data folder still exists but holds other captions or features
than it was built from. Item ``i`` of the index is item ``i`` of the split.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .._files import atomic_write, read_json
from ..checkpoint import load_checkpoint, model_from_checkpoint
from ..data.precomp import PrecompSplit, caption_loader, image_loader, read_captions
from ..data.vocab import Vocabulary
from ..models import RetrievalModel, model_class
from . import pooled

FORMAT = "sgfused-index-1"
MANIFEST = "manifest.json"
KINDS = ("image", "caption")
OPTIONAL_FILES = ("boxes.npy", "sizes.npy", "region_labels.json")  # written when the split has boxes / graphs


def checkpoint_fingerprint(state: dict[str, Any]) -> str:
    """SHA-256 of what makes a checkpoint's model: its name, config, vocabulary and every weight (bytes)."""
    digest = hashlib.sha256()
    header = {"model": state["model_name"], "config": state["model_config"], "vocab": state["vocab"]}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for key in sorted(state["model"]):
        value = state["model"][key]
        digest.update(key.encode())
        if isinstance(value, Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


SAMPLED_IMAGES = 64  # feature rows hashed for the fingerprint, evenly spaced (about 19 MB at 36 x 2048 float32)


def data_fingerprint(data: Path, split: str) -> dict[str, Any]:
    """What identifies a split's content cheaply: the caption file's hash, the feature array's shape and size,
    and the hash of :data:`SAMPLED_IMAGES` evenly spaced images' features (first and last included), so
    features rewritten in place are caught without reading a 100K-image array whole."""
    features = data / f"{split}_ims.npy"
    array = np.load(features, mmap_mode="r")
    rows = np.unique(np.linspace(0, len(array) - 1, min(SAMPLED_IMAGES, len(array))).round().astype(np.int64))
    sample = hashlib.sha256()
    for row in rows:
        sample.update(np.ascontiguousarray(array[row]).tobytes())
    return {
        "captions_sha256": _file_digest(data / f"{split}_caps.txt"),
        "features_shape": list(array.shape),
        "features_bytes": features.stat().st_size,
        "features_sample_sha256": sample.hexdigest(),
    }


def _parts(encoding: Any) -> tuple[Tensor, ...]:
    return encoding if isinstance(encoding, tuple) else (encoding,)


class _PartWriter:
    """Collects per-batch encoding parts in a scratch folder, then writes each part as one padded ``.npy``."""

    def __init__(self, scratch: Path, kind: str) -> None:
        self.scratch, self.kind = scratch, kind
        self.batches: list[list[tuple[int, ...]]] = []  # the shapes of each batch's parts
        self.dtypes: list[np.dtype] = []

    def add(self, parts: Sequence[Tensor]) -> None:
        arrays = [part.detach().cpu().numpy() for part in parts]
        if self.batches and len(arrays) != len(self.batches[0]):
            raise ValueError(f"{self.kind} encodings: batch {len(self.batches)} has {len(arrays)} parts, batch 0 has {len(self.batches[0])}")
        self.dtypes = [a.dtype for a in arrays]
        for j, array in enumerate(arrays):
            np.save(self.scratch / f"{self.kind}_{len(self.batches)}_{j}.npy", array)
        self.batches.append([a.shape for a in arrays])

    def write(self, out: Path) -> list[dict[str, Any]]:
        """Write ``out/KIND_J.npy`` for every part; returns each part's shape and dtype."""
        described = []
        for j, dtype in enumerate(self.dtypes):
            shapes = [batch[j] for batch in self.batches]
            shape = [sum(s[0] for s in shapes), *shapes[0][1:]]
            if len(shape) == 3:
                shape[1] = max(s[1] for s in shapes)  # node dimension: pad to the widest batch
            if any(tuple(s[2:]) != tuple(shape[2:]) or (len(s) < 3 and tuple(s[1:]) != tuple(shape[1:])) for s in shapes):
                raise ValueError(f"{self.kind} encoding part {j}: batches disagree on the feature shape: {sorted(set(shapes))}")
            target = np.lib.format.open_memmap(out / f"{self.kind}_{j}.npy", mode="w+", dtype=dtype, shape=tuple(shape))
            row = 0
            for b, batch_shape in enumerate(shapes):
                block = np.load(self.scratch / f"{self.kind}_{b}_{j}.npy")
                if len(shape) == 3:
                    target[row : row + block.shape[0], : block.shape[1]] = block
                    target[row : row + block.shape[0], block.shape[1] :] = 0
                else:
                    target[row : row + block.shape[0]] = block
                row += batch_shape[0]
            target.flush()
            del target
            described.append({"shape": shape, "dtype": str(dtype)})
        return described


def _write_json(path: Path, value: Any) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(value, indent=1) + "\n").encode()))


def _split_options(data: Path, split: str, model_name: str) -> dict[str, bool]:
    """The dataset parts the model reads, plus boxes and visual graphs for explanations when the split has them."""
    options = {part: True for part in model_class(model_name).data_requirements}
    if (data / f"{split}_ims_bbx.npy").is_file() and (data / f"{split}_ims_size.npy").is_file():
        options["boxes"] = True
    if (data / f"{split}_ims_graphs.json").is_file():
        options["image_graphs"] = True
    return options


def _encodings(model: RetrievalModel, dataset: PrecompSplit, kind: str, batch_size: int, device: Any,
               progress: bool, label: str = "") -> Any:
    """``(batch, encoding)`` for every batch of ``kind`` ("image" / "caption") of the split, in split order."""
    from tqdm import tqdm

    loader = image_loader(dataset, batch_size) if kind == "image" else caption_loader(dataset, batch_size)
    for batch in tqdm(loader, desc=f"index {label}{kind}s", unit="batch", disable=not progress):
        batch = batch.to(device)
        yield batch, model.encode_images(batch) if kind == "image" else model.encode_captions(batch)


def _shortlist_key(checkpoint: str | os.PathLike, data: Path, split: str, captions_per_image: int, batch_size: int,
                   device: Any, progress: bool) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The global vectors of a second checkpoint's model over the split, and its manifest record."""
    state = load_checkpoint(checkpoint)
    model, vocab = model_from_checkpoint(state, str(checkpoint))
    name = state["model_name"]
    pooled.check_supported(name)
    dataset = PrecompSplit(data, split, vocab, captions_per_image=captions_per_image,
                           **{part: True for part in model_class(name).data_requirements})
    model.to(device).eval()
    vectors = {}
    for kind in KINDS:
        take = pooled.image_vectors if kind == "image" else pooled.caption_vectors
        blocks = [take(model, name, encoding).cpu().numpy()
                  for _, encoding in _encodings(model, dataset, kind, batch_size, device, progress, "shortlist ")]
        vectors[kind] = np.concatenate(blocks)
    record = {"model": name, "checkpoint": str(Path(checkpoint).resolve()), "checkpoint_sha256": checkpoint_fingerprint(state)}
    return vectors, record


@torch.no_grad()
def build_index(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike,
    split: str,
    out: str | os.PathLike,
    *,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    captions_per_image: int = 5,
    progress: bool = True,
    shortlist_checkpoint: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Encode split ``split`` of ``data`` with the model of ``checkpoint`` into index folder ``out``; returns the manifest.

    ``shortlist_checkpoint``: take the shortlist's global vectors from this checkpoint's model
    (trained on the same vocabulary's captions or not: it tokenises with its own) instead of
    the model's own pooled vectors (module doc).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out, data = Path(out), Path(data)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is an existing file; an index is a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise FileExistsError(f"--out {out} is a non-empty folder that is not an index; choose an empty or new folder")
    state = load_checkpoint(checkpoint)
    model, vocab = model_from_checkpoint(state, str(checkpoint))
    name = state["model_name"]
    pooled.check_supported(name)
    dataset = PrecompSplit(data, split, vocab, captions_per_image=captions_per_image, **_split_options(data, split, name))
    model.to(device).eval()
    out.mkdir(parents=True, exist_ok=True)
    boxes, labels = [], []
    with tempfile.TemporaryDirectory(dir=out, prefix=".scratch-") as scratch_dir:
        scratch = Path(scratch_dir)
        writers = {kind: _PartWriter(scratch, kind) for kind in KINDS}
        vectors: dict[str, list[np.ndarray]] = {kind: [] for kind in KINDS}
        is_tuple: dict[str, bool] = {}
        for kind in KINDS:
            for batch, encoding in _encodings(model, dataset, kind, batch_size, device, progress):
                if kind == "image":
                    vectors[kind].append(pooled.image_vectors(model, name, encoding).cpu().numpy())
                    if batch.boxes is not None:
                        boxes.append(batch.boxes.cpu().numpy())
                    if batch.graphs is not None:
                        labels.extend([[str(label) for label in graph["labels"]] for graph in batch.graphs])
                else:
                    vectors[kind].append(pooled.caption_vectors(model, name, encoding).cpu().numpy())
                is_tuple[kind] = isinstance(encoding, tuple)
                writers[kind].add(_parts(encoding))
        layout = {kind: writers[kind].write(out) for kind in KINDS}
    keys, shortlist = {kind: np.concatenate(vectors[kind]) for kind in KINDS}, None
    if shortlist_checkpoint is not None:
        keys, shortlist = _shortlist_key(shortlist_checkpoint, data, split, captions_per_image, batch_size, device, progress)
    for kind in KINDS:
        np.save(out / f"{kind}_global.npy", keys[kind].astype(np.float32))
    for stale in OPTIONAL_FILES:  # an index rebuilt in place must not keep the last one's boxes or labels
        (out / stale).unlink(missing_ok=True)
    if boxes:
        np.save(out / "boxes.npy", np.concatenate(boxes).astype(np.float32))
        np.save(out / "sizes.npy", np.load(data / f"{split}_ims_size.npy")[: dataset.n_images].astype(np.float32))
    if labels:
        _write_json(out / "region_labels.json", labels)
    _write_json(out / "captions.json", read_captions(data / f"{split}_caps.txt")[: dataset.n_captions])
    manifest = {
        "format": FORMAT,
        "model": name,
        "checkpoint": str(Path(checkpoint).resolve()),
        "checkpoint_sha256": checkpoint_fingerprint(state),
        "shortlist": shortlist,
        "data": str(data.resolve()),
        "split": split,
        "data_fingerprint": data_fingerprint(data, split),
        "n_images": dataset.n_images,
        "n_captions": dataset.n_captions,
        "captions_per_image": dataset.captions_per_image,
        "image_tuple": is_tuple["image"],
        "caption_tuple": is_tuple["caption"],
        "image_parts": layout["image"],
        "caption_parts": layout["caption"],
    }
    _write_json(out / MANIFEST, manifest)
    return manifest


def _trimmed(parts: list[np.ndarray]) -> list[np.ndarray]:
    """``parts`` with each node part cut to its items' largest node count (a view, nothing is read).

    A node part is a 3-D part followed by its counts (a 1-D integer part). Past the largest
    count every slot is padding that no score reads: SGM pads its object nodes to the
    region count (36) and its relation nodes to ``max_relations`` (25) while a synthetic
    image holds at most 6 and about 2. Without the cut, each search would copy and scan
    six times the object data it needs.
    """
    out = list(parts)
    for j in range(len(out) - 1):
        nodes, counts = out[j], out[j + 1]
        if nodes.ndim == 3 and counts.ndim == 1 and np.issubdtype(counts.dtype, np.integer) and len(counts):
            out[j] = nodes[:, : max(int(counts.max()), 1)]
    return out


@dataclass
class GalleryIndex:
    """An opened index (see the module doc); arrays are memory-mapped, copied row by row on use."""

    path: Path
    manifest: dict[str, Any]
    parts: dict[str, list[np.ndarray]]
    vectors: dict[str, Tensor]
    captions: list[str]
    boxes: np.ndarray | None
    sizes: np.ndarray | None
    region_labels: list[list[str]] | None

    @classmethod
    def open(cls, path: str | os.PathLike) -> "GalleryIndex":
        """Open index folder ``path``; an index of a split whose files changed since is refused."""
        path = Path(path)
        if not (path / MANIFEST).is_file():
            raise FileNotFoundError(f"index {path} has no {MANIFEST} (build it with `sgfused index`)")
        manifest = read_json(path / MANIFEST, "index manifest")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"{path / MANIFEST} is not an sgfused index manifest (expected format {FORMAT!r})")
        data, split = Path(manifest["data"]), manifest["split"]
        if (data / f"{split}_caps.txt").is_file() and (data / f"{split}_ims.npy").is_file():
            recorded = manifest["data_fingerprint"]
            now = {key: value for key, value in data_fingerprint(data, split).items() if key in recorded}
            if now != recorded:  # (an index written before the feature sample was recorded is checked without it)
                raise ValueError(
                    f"index {path} was built from other data: {data} split {split!r} has changed since "
                    f"(recorded {recorded}, now {now}); rebuild the index"
                )
        parts = {kind: _trimmed([np.load(path / f"{kind}_{j}.npy", mmap_mode="c") for j in range(len(manifest[f"{kind}_parts"]))])
                 for kind in KINDS}
        vectors = {kind: torch.from_numpy(np.load(path / f"{kind}_global.npy", mmap_mode="c")) for kind in KINDS}
        for kind in KINDS:
            count = manifest[f"n_{kind}s"]
            if any(part.shape[0] != count for part in parts[kind]) or vectors[kind].shape[0] != count:
                raise ValueError(f"index {path}: the {kind} arrays do not all hold {count} rows (damaged index?)")
        boxes = np.load(path / "boxes.npy", mmap_mode="r") if (path / "boxes.npy").is_file() else None
        sizes = np.load(path / "sizes.npy") if (path / "sizes.npy").is_file() else None
        labels = read_json(path / "region_labels.json", "region labels") if (path / "region_labels.json").is_file() else None
        for name, table in zip(OPTIONAL_FILES, (boxes, sizes, labels)):
            if table is not None and len(table) != manifest["n_images"]:
                raise ValueError(f"index {path}: {name} holds {len(table)} images, the index {manifest['n_images']} "
                                 f"(left from another index?); rebuild the index")
        captions = read_json(path / "captions.json", "index captions")
        return cls(path, manifest, parts, vectors, captions, boxes, sizes, labels)

    @property
    def model_name(self) -> str:
        return self.manifest["model"]

    @property
    def n_images(self) -> int:
        return self.manifest["n_images"]

    @property
    def n_captions(self) -> int:
        return self.manifest["n_captions"]

    def load_model(self, checkpoint: str | os.PathLike | None = None) -> tuple[RetrievalModel, Vocabulary]:
        """The model and vocabulary of ``checkpoint`` (default: the recorded one), refused unless it built this index."""
        return self._recorded_model(self.manifest, checkpoint, "checkpoint")

    @property
    def shortlist_model_name(self) -> str | None:
        """The model whose global vectors are the shortlist key, None for this index's own model."""
        record = self.manifest.get("shortlist")
        return record["model"] if record else None

    def load_shortlist_model(self, checkpoint: str | os.PathLike | None = None) -> tuple[RetrievalModel, Vocabulary] | None:
        """The shortlist key's model and vocabulary (None when the key is the index model's own vectors)."""
        record = self.manifest.get("shortlist")
        if record is None:
            if checkpoint is not None:
                raise ValueError(f"--shortlist-checkpoint: index {self.path} was built without one "
                                 "(its shortlist key is its own model's vectors)")
            return None
        return self._recorded_model(record, checkpoint, "shortlist checkpoint")

    def _recorded_model(self, record: dict[str, Any], checkpoint: str | os.PathLike | None,
                        what: str) -> tuple[RetrievalModel, Vocabulary]:
        source = Path(checkpoint) if checkpoint is not None else Path(record["checkpoint"])
        state = load_checkpoint(source)
        fingerprint = checkpoint_fingerprint(state)
        if fingerprint != record["checkpoint_sha256"]:
            raise ValueError(
                f"index {self.path} was built by another {what}: {source} has fingerprint {fingerprint[:12]}, "
                f"the index records {record['checkpoint_sha256'][:12]} ({record['checkpoint']}); "
                f"rebuild the index with this {what}"
            )
        return model_from_checkpoint(state, str(source))

    def encoding(self, kind: str, rows: Tensor | Sequence[int] | slice) -> Any:
        """The stored ``kind`` ("image" / "caption") encoding of ``rows`` as CPU tensors, in the model's layout."""
        if isinstance(rows, Tensor):
            rows = rows.cpu().numpy()
        parts = tuple(torch.from_numpy(np.ascontiguousarray(part[rows])) for part in self.parts[kind])
        return parts if self.manifest[f"{kind}_tuple"] else parts[0]
