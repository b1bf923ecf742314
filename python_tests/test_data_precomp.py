"""PrecompSplit on small SCAN-layout files written here: items, batches, loaders, memory mapping, bad inputs."""

import json
import pickle

import numpy as np
import pytest
import torch

from sgfused.data.batch import CaptionBatch, ImageBatch, PairBatch
from sgfused.data.graphs import GraphError
from sgfused.data.precomp import (
    PrecompError,
    PrecompSplit,
    caption_loader,
    collate_captions,
    collate_pairs,
    convert_pickled_sizes,
    image_loader,
    pair_loader,
)
from sgfused.data.vocab import Vocabulary, tokenize

N_IMAGES, N_REGIONS, DIM, CPI = 6, 36, 8, 5
WORDS = ["dog", "cat", "man", "red", "small", "on", "grass"]


def _caption(k: int) -> str:
    # Caption k has k % 4 + 2 words: lengths 2..5, so batches need padding.
    return " ".join(WORDS[(k + j) % len(WORDS)] for j in range(k % 4 + 2)).capitalize() + "."


def _caption_graph(k: int) -> dict:
    tokens = tokenize(_caption(k))
    return {"tokens": tokens, "heads": [-1] + [0] * (len(tokens) - 1), "objects": [0], "attributes": [], "relations": []}


def _image_graph(i: int) -> dict:
    return {"labels": ["dog", "grass"], "bbox": [[0, 0, 10, 10], [5, 5, 20, 20]], "rels": [[0, "on", 1]], "attrs": [[0, f"a{i}"]]}


@pytest.fixture
def vocab() -> Vocabulary:
    return Vocabulary(WORDS + ["."])


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "test_ims.npy", rng.standard_normal((N_IMAGES, N_REGIONS, DIM)).astype(np.float32))
    (tmp_path / "test_caps.txt").write_text("\n".join(_caption(k) for k in range(N_IMAGES * CPI)) + "\n")
    boxes = rng.uniform(0, 100, (N_IMAGES, N_REGIONS, 4)).astype(np.float32)
    np.save(tmp_path / "test_ims_bbx.npy", boxes)
    np.save(tmp_path / "test_ims_size.npy", np.array([[200.0 + i, 100.0 + 2 * i] for i in range(N_IMAGES)], dtype=np.float32))
    (tmp_path / "test_ims_graphs.json").write_text(json.dumps([_image_graph(i) for i in range(N_IMAGES)]))
    (tmp_path / "test_caps_graphs.json").write_text(json.dumps([_caption_graph(k) for k in range(N_IMAGES * CPI)]))
    return tmp_path


def test_attributes_and_items(data, vocab):
    split = PrecompSplit(data, "test", vocab)
    assert (split.n_images, split.n_captions, split.captions_per_image, split.n_regions, split.feature_dim) == (6, 30, 5, 36, 8)
    assert len(split) == 30
    stored = np.load(data / "test_ims.npy")
    image, caption = split[13]
    assert image.index == 2 and caption.index == 13 and caption.image_index == 2
    assert image.features.dtype == torch.float32
    torch.testing.assert_close(image.features, torch.from_numpy(stored[2]), rtol=0, atol=0)
    assert caption.ids.dtype == torch.int64
    assert caption.ids.tolist() == vocab.encode(tokenize(_caption(13)))
    assert image.boxes is None and image.graph is None and caption.graph is None
    with pytest.raises(IndexError, match="caption index 30 out of range"):
        split[30]


def test_features_are_memory_mapped(data, vocab):
    split = PrecompSplit(data, "test", vocab)
    assert isinstance(split.features, np.memmap)
    assert split.features.dtype == np.float32


def test_collate_padding_lengths_indexes(data, vocab):
    split = PrecompSplit(data, "test", vocab)
    batch = collate_pairs([split[k] for k in (0, 1, 7, 29)])
    assert isinstance(batch, PairBatch)
    caps = batch.captions
    # caption k has k % 4 + 2 words plus "." plus start and end
    assert caps.lengths.tolist() == [5, 6, 8, 6] and caps.lengths.dtype == torch.int64
    assert caps.ids.shape == (4, 8) and caps.ids.dtype == torch.int64
    assert caps.ids[0].tolist() == vocab.encode(tokenize(_caption(0))) + [0, 0, 0]
    assert caps.index.tolist() == [0, 1, 7, 29] and caps.image_index.tolist() == [0, 0, 1, 5]
    assert caps.index.dtype == caps.image_index.dtype == torch.int64
    assert batch.images.index.tolist() == [0, 0, 1, 5] and batch.images.index.dtype == torch.int64
    assert batch.images.features.shape == (4, N_REGIONS, DIM)


def test_loaders_cover_everything_once_in_order(data, vocab):
    split = PrecompSplit(data, "test", vocab)
    images = list(image_loader(split, batch_size=4))
    assert all(isinstance(b, ImageBatch) for b in images)
    assert torch.cat([b.index for b in images]).tolist() == list(range(6))
    stored = np.load(data / "test_ims.npy")
    torch.testing.assert_close(torch.cat([b.features for b in images]), torch.from_numpy(stored), rtol=0, atol=0)
    captions = list(caption_loader(split, batch_size=7))
    assert all(isinstance(b, CaptionBatch) for b in captions)
    assert torch.cat([b.index for b in captions]).tolist() == list(range(30))
    assert torch.cat([b.image_index for b in captions]).tolist() == [k // 5 for k in range(30)]
    pairs = list(pair_loader(split, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0)))
    seen = torch.cat([b.captions.index for b in pairs])
    assert sorted(seen.tolist()) == list(range(30)) and seen.tolist() != list(range(30))
    assert all(torch.equal(b.images.index, b.captions.image_index) for b in pairs)
    assert [len(b.captions.index) for b in pair_loader(split, batch_size=8, drop_last=True)] == [8, 8, 8]


def test_loader_with_worker_processes(data, vocab):
    split = PrecompSplit(data, "test", vocab)
    assert torch.cat([b.index for b in image_loader(split, batch_size=4, workers=2)]).tolist() == list(range(6))


def test_pickling_reopens_the_memory_map(data, vocab):
    split = PrecompSplit(data, "test", vocab, boxes=True)
    state = pickle.dumps(split)
    assert len(state) < split.features.nbytes  # the features are not copied into the pickle
    copy = pickle.loads(state)
    assert isinstance(copy.features, np.memmap)
    torch.testing.assert_close(copy[3].image.boxes, split[3].image.boxes)


def test_max_images(data, vocab):
    split = PrecompSplit(data, "test", vocab, max_images=2, caption_graphs=True)
    assert (split.n_images, split.n_captions, len(split)) == (2, 10, 10)
    assert torch.cat([b.image_index for b in caption_loader(split, 4)]).tolist() == [0] * 5 + [1] * 5
    with pytest.raises(ValueError, match="max_images must be None or >= 1, got 0"):
        PrecompSplit(data, "test", vocab, max_images=0)


def test_more_captions_per_image(data, vocab):
    (data / "test_caps.txt").write_text("\n".join(_caption(k) for k in range(N_IMAGES * 25)))
    split = PrecompSplit(data, "test", vocab, captions_per_image=25)
    assert (split.captions_per_image, split.n_captions) == (25, 150)
    assert split[149].caption.image_index == 5 and split[149].image.index == 5


def test_boxes_normalised_and_file_unchanged(data, vocab):
    before = (data / "test_ims_bbx.npy").read_bytes()
    split = PrecompSplit(data, "test", vocab, boxes=True)
    stored = np.load(data / "test_ims_bbx.npy")
    item = split[17].image  # image 3: width 203, height 106
    expected = stored[3] / np.array([203.0, 106.0, 203.0, 106.0], dtype=np.float32)
    torch.testing.assert_close(item.boxes, torch.from_numpy(expected))
    assert item.boxes.dtype == torch.float32
    assert 0 <= item.boxes.min() and item.boxes[:, 0::2].max() <= 100 / 203
    batch = next(iter(image_loader(split, 6)))
    assert batch.boxes.shape == (6, N_REGIONS, 4)
    assert np.array_equal(split._boxes[3], stored[3])  # the memory map still holds pixels
    assert (data / "test_ims_bbx.npy").read_bytes() == before


def test_graphs_in_items_and_batches(data, vocab):
    split = PrecompSplit(data, "test", vocab, image_graphs=True, caption_graphs=True)
    batch = collate_pairs([split[k] for k in (4, 5, 12)])
    assert batch.images.graphs == [_image_graph(0), _image_graph(1), _image_graph(2)]
    assert batch.captions.graphs == [_caption_graph(4), _caption_graph(5), _caption_graph(12)]
    assert collate_captions([split.caption(0)]).graphs[0]["tokens"] == tokenize(_caption(0))


def test_nan_reported_with_image_index(data, vocab):
    features = np.load(data / "test_ims.npy")
    features[4, 7, 3] = np.nan
    features[5, 0, 0] = np.inf
    np.save(data / "test_ims.npy", features)
    split = PrecompSplit(data, "test", vocab)
    split[19]  # image 3 is fine
    with pytest.raises(PrecompError, match="split 'test': image 4 has NaN or inf features"):
        split[20]
    with pytest.raises(PrecompError, match="image 5 has NaN or inf"):
        split.image(5)
    with pytest.raises(PrecompError, match="image 4 has NaN or inf"):
        list(image_loader(split, batch_size=6))


@pytest.mark.parametrize("name", ["test_ims.npy", "test_caps.txt"])
def test_missing_files(data, vocab, name):
    (data / name).unlink()
    with pytest.raises(FileNotFoundError, match=f"file '.*{name}' does not exist"):
        PrecompSplit(data, "test", vocab)


@pytest.mark.parametrize(
    "name, flag",
    [("test_ims_bbx.npy", "boxes"), ("test_ims_size.npy", "boxes"), ("test_ims_graphs.json", "image_graphs"), ("test_caps_graphs.json", "caption_graphs")],
)
def test_missing_optional_files(data, vocab, name, flag):
    PrecompSplit(data, "test", vocab)  # not needed unless asked for
    (data / name).unlink()
    with pytest.raises(FileNotFoundError, match=f"'.*{name}' does not exist"):
        PrecompSplit(data, "test", vocab, **{flag: True})


def test_unreadable_files(data, vocab):
    (data / "test_ims.npy").write_bytes(b"not an array")
    with pytest.raises(PrecompError, match="test_ims.npy' is not a readable .npy array"):
        PrecompSplit(data, "test", vocab)


def test_bad_caption_encoding(data, vocab):
    (data / "test_caps.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(PrecompError, match="test_caps.txt' is not readable utf-8"):
        PrecompSplit(data, "test", vocab)


def test_empty_split(data, vocab):
    np.save(data / "test_ims.npy", np.zeros((0, N_REGIONS, DIM), dtype=np.float32))
    with pytest.raises(PrecompError, match="split 'test' is empty: .* has shape \\(0, 36, 8\\)"):
        PrecompSplit(data, "test", vocab)
    np.save(data / "test_ims.npy", np.zeros((2, N_REGIONS, DIM), dtype=np.float32))
    (data / "test_caps.txt").write_text("")
    with pytest.raises(PrecompError, match="has 0 captions for the 2 images"):
        PrecompSplit(data, "test", vocab)


def test_caption_count_not_a_multiple(data, vocab):
    (data / "test_caps.txt").write_text("\n".join(_caption(k) for k in range(29)))
    with pytest.raises(PrecompError, match="test_caps.txt' has 29 captions for the 6 images .* expected 5 per image = 30"):
        PrecompSplit(data, "test", vocab)


def test_caption_count_short_by_a_multiple_of_the_images(data, vocab):
    # 4 per image would pair caption 4 with image 1 instead of image 0: never inferred
    (data / "test_caps.txt").write_text("\n".join(_caption(k) for k in range(N_IMAGES * 4)))
    with pytest.raises(PrecompError, match="has 24 captions for the 6 images .*\\(4 per image\\), expected 5 per image = 30"):
        PrecompSplit(data, "test", vocab)
    split = PrecompSplit(data, "test", vocab, captions_per_image=4)
    assert split[4].caption.image_index == 1
    with pytest.raises(ValueError, match="captions_per_image must be an int >= 1, got 0"):
        PrecompSplit(data, "test", vocab, captions_per_image=0)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((6, 36 * 8), dtype=np.float32), "expected rank 3 \\(images, regions, dim\\), got shape \\(6, 288\\)"),
        (np.zeros((6, 36, 8), dtype=np.int64), "expected float features, got dtype int64"),
    ],
)
def test_bad_features(data, vocab, array, message):
    np.save(data / "test_ims.npy", array)
    with pytest.raises(PrecompError, match=message):
        PrecompSplit(data, "test", vocab)


def test_bad_boxes_and_sizes(data, vocab):
    np.save(data / "test_ims_bbx.npy", np.zeros((6, 35, 4), dtype=np.float32))
    with pytest.raises(PrecompError, match="test_ims_bbx.npy'.*expected a numeric \\(6, 36, 4\\) array, got float32 \\(6, 35, 4\\)"):
        PrecompSplit(data, "test", vocab, boxes=True)
    np.save(data / "test_ims_bbx.npy", np.zeros((6, 36, 4), dtype=np.float32))
    np.save(data / "test_ims_size.npy", np.ones((5, 2), dtype=np.float32))
    with pytest.raises(PrecompError, match="test_ims_size.npy'.*expected a numeric \\(6, 2\\) width, height array"):
        PrecompSplit(data, "test", vocab, boxes=True)
    np.save(data / "test_ims_size.npy", np.array([[1.0, 0.0]] * 6))
    with pytest.raises(PrecompError, match="widths and heights must be finite and > 0"):
        PrecompSplit(data, "test", vocab, boxes=True)


def test_pickled_sizes_refused_then_converted(data, vocab):
    released = np.array([{"image_h": 100.0 + 2 * i, "image_w": 200.0 + i} for i in range(N_IMAGES)], dtype=object)
    np.save(data / "pickled_size.npy", released, allow_pickle=True)
    np.save(data / "test_ims_size.npy", released, allow_pickle=True)
    with pytest.raises(PrecompError, match="test_ims_size.npy' is a pickled object array.*convert_pickled_sizes"):
        PrecompSplit(data, "test", vocab, boxes=True)
    convert_pickled_sizes(data / "pickled_size.npy", data / "test_ims_size.npy")
    sizes = np.load(data / "test_ims_size.npy")
    assert sizes.dtype == np.float32 and sizes[3].tolist() == [203.0, 106.0]  # width, height
    assert PrecompSplit(data, "test", vocab, boxes=True)[15].image.boxes is not None


def test_graph_file_length_mismatch(data, vocab):
    (data / "test_ims_graphs.json").write_text(json.dumps([_image_graph(i) for i in range(5)]))
    with pytest.raises(PrecompError, match="test_ims_graphs.json'.*expected 6 graphs \\(one per image\\), got 5"):
        PrecompSplit(data, "test", vocab, image_graphs=True)
    (data / "test_caps_graphs.json").write_text(json.dumps([_caption_graph(k) for k in range(31)]))
    with pytest.raises(PrecompError, match="test_caps_graphs.json'.*expected 30 graphs \\(one per caption\\), got 31"):
        PrecompSplit(data, "test", vocab, caption_graphs=True)


def test_bad_graphs_in_files(data, vocab):
    graphs = [_caption_graph(k) for k in range(30)]
    graphs[7] = _caption_graph(8)  # valid graph, tokens of another caption
    (data / "test_caps_graphs.json").write_text(json.dumps(graphs))
    with pytest.raises(PrecompError, match="caption graph 7 in .* has tokens .* expected tokenize\\(caption 7\\)"):
        PrecompSplit(data, "test", vocab, caption_graphs=True)
    image_graphs = [_image_graph(i) for i in range(6)]
    image_graphs[2]["rels"] = [[0, "on", 2]]
    (data / "test_ims_graphs.json").write_text(json.dumps(image_graphs))
    with pytest.raises(GraphError, match="image graph 2 in .*test_ims_graphs.json'.*object index: 2 is not an integer in \\[0, 2\\)"):
        PrecompSplit(data, "test", vocab, image_graphs=True)
