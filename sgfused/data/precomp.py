"""The SCAN ``*_precomp`` dataset: bottom-up region features, captions, optional boxes and graphs.

Files of a split ``s`` in ``data_path`` (the layout of the Flickr30K / MS-COCO features
released with SCAN, and of the synthetic-scene generator):

* ``s_ims.npy``: (N, R, D) float region features, memory-mapped (COCO train is 30 GB;
  only the images of a batch are read, as float32);
* ``s_caps.txt``: one caption a line, ``captions_per_image`` consecutive lines per image:
  caption k belongs to image ``k // captions_per_image``. The count is *required*, not
  inferred (5 unless told otherwise, as in Flickr30K and MS-COCO): a file short by a whole
  multiple of the image count would otherwise pair every caption with the wrong image;
* ``s_ims_bbx.npy`` (N, R, 4) pixel boxes x1 y1 x2 y2 and ``s_ims_size.npy`` (N, 2) image
  **width, height** (``boxes=True``). Several SCAN-style repositories release the sizes as
  a pickled object array of ``{"image_w": w, "image_h": h}`` dicts and divide x by
  ``image_w`` and y by ``image_h``; such a file is refused here (unpickling runs code) and
  :func:`convert_pickled_sizes` rewrites a trusted one in the (N, 2) layout;
* ``s_ims_graphs.json`` visual graphs, one per image, and ``s_caps_graphs.json`` caption
  graphs, one per caption (layouts in :mod:`sgfused.data.graphs`);
* ``s_ims_rels.npy`` (N, R_rel, D) float relation features, memory-mapped and optional
  (``relation_features=True`` reads it when it exists): row r of image i is the feature of
  the union box of relation r of image i's visual graph (zero rows past its relations).

Items are :class:`PairItem` (``__getitem__``), :class:`ImageItem` (:meth:`PrecompSplit.image`)
or :class:`CaptionItem` (:meth:`PrecompSplit.caption`); the ``collate_*`` functions and the
``*_loader`` functions turn them into :mod:`sgfused.data.batch` batches.
"""

from __future__ import annotations

import os
import zlib
from array import array
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from .batch import CaptionBatch, ImageBatch, PairBatch
from .graphs import load_caption_graphs, load_image_graphs
from .vocab import Vocabulary, tokenize


class PrecompError(ValueError):
    """A precomp split whose files are malformed or inconsistent."""


class ImageItem(NamedTuple):
    """One image: (R, D) float32 features, optional (R, 4) normalised boxes, visual graph and (R_rel, D) relation features."""

    index: int
    features: Tensor
    boxes: Optional[Tensor]
    graph: Optional[dict]
    relation_features: Optional[Tensor] = None


class CaptionItem(NamedTuple):
    """One caption: int64 ids wrapped in ``<start>``/``<end>``, optional caption graph."""

    index: int
    image_index: int
    ids: Tensor
    graph: Optional[dict]


class PairItem(NamedTuple):
    """A caption and its image."""

    image: ImageItem
    caption: CaptionItem


def _load_array(path: str, what: str, mmap: bool) -> np.ndarray:
    """``np.load`` with errors that name the file (memory-mapped when ``mmap``; never unpickles)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path!r} does not exist")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        if "Object arrays" in str(e):
            raise PrecompError(
                f"{what} file {path!r} is a pickled object array, which is not loaded (unpickling runs code); "
                "if it is the SCAN-style sizes file and you trust it, rewrite it with "
                "sgfused.data.precomp.convert_pickled_sizes(src, dst)"
            ) from None
        raise PrecompError(f"{what} file {path!r} is not a readable .npy array: {e}") from None


def convert_pickled_sizes(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rewrite a pickled sizes file (dicts with ``image_w`` / ``image_h``) as a float32 (N, 2) width, height array.

    Unpickles ``src``: use only on files from a source you trust.
    """
    sizes = np.load(src, allow_pickle=True)
    try:
        table = np.array([[size["image_w"], size["image_h"]] for size in sizes], dtype=np.float32)
    except (TypeError, KeyError, IndexError) as e:
        raise PrecompError(f"sizes file {os.fspath(src)!r}: expected dicts with 'image_w' and 'image_h', failed with {e!r}") from None
    np.save(dst, table.reshape(len(sizes), 2))


def read_captions(path: str | os.PathLike[str]) -> list[str]:
    """The captions of a ``{split}_caps.txt`` file, one a line, surrounding whitespace stripped."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f]
    except FileNotFoundError:
        raise FileNotFoundError(f"caption file {os.fspath(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PrecompError(f"caption file {os.fspath(path)!r} is not readable utf-8 text: {e}") from None


class PrecompSplit(Dataset):
    """One split of a precomp dataset; item k is caption k with its image (see the module doc)."""

    def __init__(
        self,
        data_path: str | os.PathLike[str],
        split: str,
        vocab: Vocabulary,
        *,
        boxes: bool = False,
        image_graphs: bool = False,
        caption_graphs: bool = False,
        relation_features: bool = False,
        max_images: int | None = None,
        captions_per_image: int = 5,
    ) -> None:
        """Open split ``split`` of ``data_path``; ``max_images`` keeps the first images and their captions.

        The caption file must hold exactly ``captions_per_image`` lines per image.
        ``relation_features=True`` reads ``{split}_ims_rels.npy`` when it exists; it is an
        optional file, so without it ``has_relation_features`` is False and the batches carry
        ``relation_features=None`` (SGM then uses its fallback and says so).
        """
        if max_images is not None and max_images < 1:
            raise ValueError(f"PrecompSplit: max_images must be None or >= 1, got {max_images}")
        if isinstance(captions_per_image, bool) or not isinstance(captions_per_image, int) or captions_per_image < 1:
            raise ValueError(f"PrecompSplit: captions_per_image must be an int >= 1, got {captions_per_image!r}")
        self.data_path, self.split, self.vocab, self._with_boxes = os.fspath(data_path), split, vocab, boxes
        self.has_relation_features = relation_features and os.path.isfile(self._path("ims_rels.npy"))
        self._open_arrays()
        n_stored = self._check_features()
        captions = self._read_captions()
        if len(captions) != n_stored * captions_per_image:
            raise PrecompError(
                f"split {split!r}: {self._path('caps.txt')!r} has {len(captions)} captions for the {n_stored} images "
                f"in {self._path('ims.npy')!r} ({len(captions) / n_stored:g} per image), expected {captions_per_image} "
                f"per image = {n_stored * captions_per_image} (another count: pass captions_per_image / --captions-per-image)"
            )
        self.captions_per_image = captions_per_image
        self.n_images = min(n_stored, max_images or n_stored)
        self.n_captions = self.n_images * self.captions_per_image
        self.n_regions, self.feature_dim = self.features.shape[1:]
        self._sizes = self._load_sizes(n_stored) if boxes else None
        self._image_graphs = self._load_image_graphs(n_stored) if image_graphs else None
        if self._relations is not None and self._image_graphs is not None:
            self._check_relation_rows()
        graphs = self._load_caption_graphs(len(captions)) if caption_graphs else None
        self._caption_graphs = graphs[: self.n_captions] if graphs is not None else None
        self._ids, self._offsets = self._encode(captions[: self.n_captions])

    def identity(self) -> dict[str, Any]:
        """What a training run records of this split to recognise it on resume: its name, its size and a
        checksum of its captions' token ids (the folder may move; another dataset or split is caught)."""
        return {
            "split": self.split,
            "images": self.n_images,
            "captions_per_image": self.captions_per_image,
            "captions_crc32": zlib.crc32(self._offsets.tobytes(), zlib.crc32(self._ids.tobytes())),
        }

    def _path(self, suffix: str) -> str:
        return os.path.join(self.data_path, f"{self.split}_{suffix}")

    def _open_arrays(self) -> None:
        """Memory-map the features (and boxes); also run after unpickling in a worker process."""
        self.features: np.memmap = _load_array(self._path("ims.npy"), "image feature", mmap=True)
        self._boxes = _load_array(self._path("ims_bbx.npy"), "box", mmap=True) if self._with_boxes else None
        self._relations = _load_array(self._path("ims_rels.npy"), "relation feature", mmap=True) if self.has_relation_features else None

    def __getstate__(self) -> dict[str, Any]:
        # Pickling a memmap would copy the whole file into the pickle: workers reopen it instead.
        return {**self.__dict__, "features": None, "_boxes": None, "_relations": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open_arrays()

    def _check_features(self) -> int:
        """Check the feature array's rank, dtype and size; return its image count."""
        path, shape = self._path("ims.npy"), self.features.shape
        if len(shape) != 3:
            raise PrecompError(f"image feature file {path!r}: expected rank 3 (images, regions, dim), got shape {shape}")
        if not np.issubdtype(self.features.dtype, np.floating):
            raise PrecompError(f"image feature file {path!r}: expected float features, got dtype {self.features.dtype}")
        if 0 in shape:
            raise PrecompError(f"split {self.split!r} is empty: {path!r} has shape {shape}")
        if self._boxes is not None and (self._boxes.shape != (*shape[:2], 4) or not np.issubdtype(self._boxes.dtype, np.number)):
            raise PrecompError(
                f"box file {self._path('ims_bbx.npy')!r}: expected a numeric {(*shape[:2], 4)} array, got {self._boxes.dtype} {self._boxes.shape}"
            )
        if self._relations is not None:
            rels = self._relations
            if rels.ndim != 3 or rels.shape[0] != shape[0] or rels.shape[2] != shape[2] or not np.issubdtype(rels.dtype, np.floating):
                raise PrecompError(
                    f"relation feature file {self._path('ims_rels.npy')!r}: expected a float ({shape[0]}, R_rel, {shape[2]}) "
                    f"array (one row per relation of each image graph), got {rels.dtype} {rels.shape}"
                )
        return shape[0]

    def _check_relation_rows(self) -> None:
        """Every relation of every visual graph has its row in the relation feature file."""
        rows = self._relations.shape[1]
        for i, graph in enumerate(self._image_graphs):
            if len(graph["rels"]) > rows:
                raise PrecompError(
                    f"image {i}: relation {rows} ({graph['rels'][rows]}) of {self._path('ims_graphs.json')!r} has no row in "
                    f"{self._path('ims_rels.npy')!r}, which holds {rows} relation rows per image"
                )

    def _read_captions(self) -> list[str]:
        return read_captions(self._path("caps.txt"))

    def _load_sizes(self, n_stored: int) -> np.ndarray:
        """The (N, 2) float32 width, height table (positive, finite)."""
        path = self._path("ims_size.npy")
        sizes = _load_array(path, "image size", mmap=False)
        if sizes.shape != (n_stored, 2) or not np.issubdtype(sizes.dtype, np.number):
            raise PrecompError(f"image size file {path!r}: expected a numeric ({n_stored}, 2) width, height array, got {sizes.dtype} {sizes.shape}")
        sizes = sizes.astype(np.float32)
        if not (np.isfinite(sizes) & (sizes > 0)).all():
            raise PrecompError(f"image size file {path!r}: widths and heights must be finite and > 0")
        return sizes

    def _load_image_graphs(self, n_stored: int) -> list[dict]:
        path = self._path("ims_graphs.json")
        graphs = load_image_graphs(path, self.features.shape[1])
        if len(graphs) != n_stored:
            raise PrecompError(f"image graph file {path!r}: expected {n_stored} graphs (one per image), got {len(graphs)}")
        return graphs

    def _load_caption_graphs(self, n_stored: int) -> list[dict]:
        path = self._path("caps_graphs.json")
        graphs = load_caption_graphs(path)
        if len(graphs) != n_stored:
            raise PrecompError(f"caption graph file {path!r}: expected {n_stored} graphs (one per caption), got {len(graphs)}")
        return graphs

    def _encode(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of all captions packed in one int32 array, with (n + 1) offsets."""
        ids, offsets = array("i"), array("q", [0])
        for k, caption in enumerate(captions):
            tokens = tokenize(caption)
            if self._caption_graphs is not None and self._caption_graphs[k]["tokens"] != tokens:
                raise PrecompError(
                    f"caption graph {k} in {self._path('caps_graphs.json')!r} has tokens {self._caption_graphs[k]['tokens']}, "
                    f"expected tokenize(caption {k}) = {tokens}"
                )
            ids.extend(self.vocab.encode(tokens))
            offsets.append(len(ids))
        return np.frombuffer(ids, dtype=np.int32), np.frombuffer(offsets, dtype=np.int64)

    def __len__(self) -> int:
        return self.n_captions

    def __getitem__(self, k: int) -> PairItem:
        caption = self.caption(k)
        return PairItem(self.image(caption.image_index), caption)

    def image(self, i: int) -> ImageItem:
        """Image ``i``: features as float32 (NaN / inf raise), boxes divided by the image size."""
        if not 0 <= i < self.n_images:
            raise IndexError(f"split {self.split!r}: image index {i} out of range [0, {self.n_images})")
        features = np.array(self.features[i], dtype=np.float32)
        if not np.isfinite(features).all():
            raise PrecompError(f"split {self.split!r}: image {i} has NaN or inf features in {self._path('ims.npy')!r}")
        boxes = None
        if self._boxes is not None and self._sizes is not None:
            width, height = self._sizes[i]
            boxes = torch.from_numpy(np.array(self._boxes[i], dtype=np.float32) / np.array([width, height, width, height], dtype=np.float32))
        graph = self._image_graphs[i] if self._image_graphs is not None else None
        relations = None
        if self._relations is not None:
            relations = np.array(self._relations[i], dtype=np.float32)
            if not np.isfinite(relations).all():
                raise PrecompError(f"split {self.split!r}: image {i} has NaN or inf relation features in {self._path('ims_rels.npy')!r}")
            relations = torch.from_numpy(relations)
        return ImageItem(i, torch.from_numpy(features), boxes, graph, relations)

    def caption(self, k: int) -> CaptionItem:
        """Caption ``k``: its token ids (``<start>`` ... ``<end>``) and graph."""
        if not 0 <= k < self.n_captions:
            raise IndexError(f"split {self.split!r}: caption index {k} out of range [0, {self.n_captions})")
        ids = torch.from_numpy(self._ids[self._offsets[k] : self._offsets[k + 1]].astype(np.int64))
        graph = self._caption_graphs[k] if self._caption_graphs is not None else None
        return CaptionItem(k, k // self.captions_per_image, ids, graph)


def collate_images(items: Sequence[ImageItem]) -> ImageBatch:
    """Stack image items (boxes / graphs kept when the items carry them)."""
    return ImageBatch(
        features=torch.stack([item.features for item in items]),
        index=torch.tensor([item.index for item in items], dtype=torch.int64),
        boxes=torch.stack([item.boxes for item in items]) if items[0].boxes is not None else None,
        graphs=[item.graph for item in items] if items[0].graph is not None else None,
        relation_features=torch.stack([item.relation_features for item in items]) if items[0].relation_features is not None else None,
    )


def collate_captions(items: Sequence[CaptionItem]) -> CaptionBatch:
    """Pad caption ids with 0 into (B, L); ``lengths`` count ``<start>`` and ``<end>``."""
    return CaptionBatch(
        ids=pad_sequence([item.ids for item in items], batch_first=True, padding_value=0),
        lengths=torch.tensor([len(item.ids) for item in items], dtype=torch.int64),
        index=torch.tensor([item.index for item in items], dtype=torch.int64),
        image_index=torch.tensor([item.image_index for item in items], dtype=torch.int64),
        graphs=[item.graph for item in items] if items[0].graph is not None else None,
    )


def collate_pairs(items: Sequence[PairItem]) -> PairBatch:
    """Row b of the images is the image of caption b."""
    return PairBatch(collate_images([item.image for item in items]), collate_captions([item.caption for item in items]))


class _ItemView(Dataset):
    """The images (or the captions) of a split as a dataset, for the evaluation loaders."""

    def __init__(self, split: PrecompSplit, images: bool) -> None:
        self.split, self.images = split, images

    def __len__(self) -> int:
        return self.split.n_images if self.images else self.split.n_captions

    def __getitem__(self, i: int) -> ImageItem | CaptionItem:
        return self.split.image(i) if self.images else self.split.caption(i)


def pair_loader(
    split: PrecompSplit,
    batch_size: int,
    *,
    sampler: Sampler[int] | None = None,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """Batches of :class:`PairBatch` over the captions of ``split`` (for training)."""
    return DataLoader(
        split, batch_size, shuffle=shuffle, sampler=sampler, generator=generator, num_workers=workers, drop_last=drop_last, collate_fn=collate_pairs
    )


def _ordered_loader(items: Dataset, batch_size: int, workers: int, collate: Callable[[list], Any]) -> DataLoader:
    """A loader over ``items`` in order that leaves torch's global generator alone.

    A DataLoader draws its workers' base seed from its ``generator`` on every pass, from the global
    one when it has none; evaluation in the middle of training would then move every later dropout
    mask, so how often a run validates would change what it learns. Its own generator keeps them apart.
    """
    return DataLoader(items, batch_size, num_workers=workers, collate_fn=collate, generator=torch.Generator())


def image_loader(split: PrecompSplit, batch_size: int, workers: int = 0, images: range | None = None) -> DataLoader:
    """Batches of :class:`ImageBatch` with every image of ``split`` (or those of ``images``) once, in order."""
    view = _ItemView(split, images=True)
    return _ordered_loader(view if images is None else Subset(view, images), batch_size, workers, collate_images)


def caption_loader(split: PrecompSplit, batch_size: int, workers: int = 0) -> DataLoader:
    """Batches of :class:`CaptionBatch` with every caption of ``split`` once, in order."""
    return _ordered_loader(_ItemView(split, images=False), batch_size, workers, collate_captions)
