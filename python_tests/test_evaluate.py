"""Tests of sgfused.evaluate: ranks and recalls by hand, ties, 5-fold, the blockwise matrix, files, reports."""

import json

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from sgfused import evaluate
from sgfused.data.batch import CaptionBatch, ImageBatch
from sgfused.data.precomp import PrecompSplit
from sgfused.data.vocab import Vocabulary
from sgfused.evaluate import (
    METRIC_KEYS,
    concat_encodings,
    ensemble,
    evaluate_model,
    evaluate_similarity,
    fold5_metrics,
    format_table,
    load_similarity,
    retrieval_metrics,
    retrieval_ranks,
    save_similarity,
    similarity_matrix,
    slice_encoding,
    write_json,
)
from sgfused.models.base import RetrievalModel


def brute_force_ranks(sims: np.ndarray, per_image: int) -> tuple[list[int], list[int]]:
    """The definition, one query at a time: 1 + candidates (other than the ground truth) scoring >= it."""
    n_images, n_captions = sims.shape
    i2t = []
    for i in range(n_images):
        own = range(i * per_image, (i + 1) * per_image)
        best = max(sims[i, c] for c in own)
        i2t.append(1 + sum(sims[i, c] >= best for c in range(n_captions) if c not in own))
    t2i = []
    for k in range(n_captions):
        truth = sims[k // per_image, k]
        t2i.append(1 + sum(sims[i, k] >= truth for i in range(n_images) if i != k // per_image))
    return i2t, t2i


# ----------------------------------------------------------------------------- metrics by hand

# 3 images x 5 captions; the comments give each image's rank of its best own caption.
HAND = np.array([
    # own: 0-4                     | image 1: 5-9                | image 2: 10-14
    [.50, .40, .30, .20, .10, .90, .80, .70, .60, .55, .51, .05, .05, .05, .05],  # 6 above .50 -> 7
    [.10, .10, .10, .10, .95, .90, .20, .20, .20, .20, .10, .10, .10, .10, .10],  # .95 above .90 -> 2
    [.30, .30, .30, .30, .30, .30, .30, .30, .30, .30, .00, .00, .00, .00, .00],  # 10 above .00 -> 11
], dtype=np.float32)
HAND_I2T = [7, 2, 11]
# column k: 1 + images scoring >= sims[k // 5, k]; column 2 ties .30 = .30 and column 5 ties .90 = .90
HAND_T2I = [1, 1, 2, 2, 3, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3]


def test_ranks_match_hand_computed():
    i2t, t2i = retrieval_ranks(HAND)
    assert i2t.tolist() == HAND_I2T
    assert t2i.tolist() == HAND_T2I


def test_metrics_match_hand_computed():
    m = retrieval_metrics(HAND)
    assert set(m) == set(METRIC_KEYS)
    assert m["i2t_r1"] == 0.0
    assert m["i2t_r5"] == pytest.approx(100 / 3)
    assert m["i2t_r10"] == pytest.approx(200 / 3)
    assert m["i2t_medr"] == 7.0
    assert m["i2t_meanr"] == pytest.approx(20 / 3)
    assert m["t2i_r1"] == pytest.approx(100 * 2 / 15)
    assert m["t2i_r5"] == m["t2i_r10"] == 100.0
    assert m["t2i_medr"] == 3.0
    assert m["t2i_meanr"] == pytest.approx(38 / 15)
    recalls = [m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert m["rsum"] == pytest.approx(sum(recalls))


def test_two_images_median_is_floored():
    sims = np.array([[.9, .1, .8, .3], [.7, .2, .6, .5]])
    m = retrieval_metrics(sims)  # i2t ranks [1, 2], t2i ranks [1, 2, 2, 1]
    assert (m["i2t_r1"], m["i2t_r5"], m["i2t_medr"], m["i2t_meanr"]) == (50.0, 100.0, 1.0, 1.5)
    assert (m["t2i_r1"], m["t2i_r5"], m["t2i_medr"], m["t2i_meanr"]) == (50.0, 100.0, 1.0, 1.5)
    assert m["rsum"] == 500.0


@pytest.mark.parametrize("seed", range(4))
def test_ranks_match_brute_force_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    sims = np.round(rng.random((7, 21)), 1).astype(np.float32)  # few distinct values: many ties
    i2t, t2i = retrieval_ranks(sims)
    want_i2t, want_t2i = brute_force_ranks(sims, 3)
    assert i2t.tolist() == want_i2t
    assert t2i.tolist() == want_t2i


def test_row_chunks_do_not_change_the_result(monkeypatch):
    sims = torch.rand(9, 27)
    whole = retrieval_ranks(sims)
    monkeypatch.setattr(evaluate, "_CHUNK_ELEMENTS", 30)  # one row at a time
    chunked = retrieval_ranks(sims)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))


@pytest.mark.parametrize("convert", [
    lambda a: a, lambda a: a.astype(np.float64), lambda a: a.astype(np.float16),
    torch.from_numpy, lambda a: torch.from_numpy(a).requires_grad_(),
])
def test_numpy_and_torch_of_any_float_dtype(convert):
    assert retrieval_metrics(convert(HAND)) == retrieval_metrics(HAND)


# ----------------------------------------------------------------------------- ties and edge cases


def test_constant_matrix_gets_the_worst_ranks():
    m = retrieval_metrics(np.zeros((12, 24)))
    assert all(m[f"{d}_r{k}"] == 0.0 for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert m["i2t_medr"] == m["i2t_meanr"] == 23.0  # all 22 other captions rank above
    assert m["t2i_medr"] == m["t2i_meanr"] == 12.0  # all 11 other images rank above
    assert m["rsum"] == 0.0


def test_constant_small_matrix():
    m = retrieval_metrics(torch.ones(3, 6))
    assert (m["i2t_r1"], m["i2t_r5"], m["i2t_meanr"]) == (0.0, 100.0, 5.0)
    assert (m["t2i_r1"], m["t2i_r5"], m["t2i_meanr"]) == (0.0, 100.0, 3.0)


def test_a_tie_with_one_negative_counts_against_the_ground_truth():
    sims = np.array([[1.0, 1.0], [0.0, 1.0]])
    i2t, t2i = retrieval_ranks(sims)
    assert i2t.tolist() == [2, 1]  # image 0: caption 1 ties its caption 0
    assert t2i.tolist() == [1, 2]  # caption 1: image 0 ties image 1


def test_ties_among_own_captions_do_not_count():
    sims = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    i2t, _ = retrieval_ranks(sims)
    assert i2t.tolist() == [1, 1]


def test_one_image():
    m = retrieval_metrics(torch.rand(1, 5))
    assert all(m[f"{d}_r{k}"] == 100.0 for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert m["i2t_medr"] == m["t2i_medr"] == m["i2t_meanr"] == m["t2i_meanr"] == 1.0
    assert m["rsum"] == 600.0


def test_one_caption_per_image():
    sims = np.array([[.9, .1, .2], [.8, .3, .1], [.1, .2, .7]])
    i2t, t2i = retrieval_ranks(sims, captions_per_image=1)
    assert i2t.tolist() == [1, 2, 1]  # image 1: caption 0 (.8) above its own (.3)
    assert t2i.tolist() == [1, 1, 1]


def test_rsum_is_the_sum_of_the_six_recalls():
    m = retrieval_metrics(torch.randn(40, 200))
    assert m["rsum"] == pytest.approx(sum(m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("sims, captions_per_image, error, match", [
    (np.zeros(5), None, ValueError, "2-D"),
    (torch.zeros(2, 3, 4), None, ValueError, "2-D"),
    (np.zeros((3, 7)), None, ValueError, "multiple of n_images"),
    (np.zeros((3, 15)), 4, ValueError, "captions_per_image=4"),
    (np.zeros((0, 5)), None, ValueError, "at least one"),
    (np.zeros((2, 4), dtype=np.int64), None, TypeError, "floating-point"),
    ([[1.0, 2.0]], None, TypeError, "numpy array or a torch tensor"),
])
def test_bad_input_is_named(sims, captions_per_image, error, match):
    with pytest.raises(error, match=match):
        retrieval_metrics(sims, captions_per_image)


def test_nan_is_an_error_naming_its_row():
    sims = torch.rand(4, 8)
    sims[2, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN.*row 2"):
        retrieval_metrics(sims)


# ----------------------------------------------------------------------------- 5-fold 1K


def fold_matrix() -> np.ndarray:
    """10 images x 50 captions: folds 1-3 perfect, folds 4-5 inverted, off-diagonal blocks 10 (never seen by a fold)."""
    sims = np.full((10, 50), 10.0, dtype=np.float32)
    for fold in range(5):
        block = np.zeros((2, 10), dtype=np.float32)
        perfect = fold < 3
        for image in range(2):
            own = slice(image * 5, image * 5 + 5)
            block[image] = 0.0 if perfect else 1.0
            block[image, own] = 1.0 if perfect else 0.0
        sims[2 * fold : 2 * fold + 2, 10 * fold : 10 * fold + 10] = block
    return sims


def test_fold5_scores_the_diagonal_blocks():
    results = fold5_metrics(fold_matrix())
    assert list(results) == ["fold1", "fold2", "fold3", "fold4", "fold5", "fold5 mean", "full"]
    for fold in ("fold1", "fold2", "fold3"):
        assert results[fold]["rsum"] == 600.0
    for fold in ("fold4", "fold5"):  # i2t: 5 other captions above -> rank 6; t2i: the other image above -> 2
        m = results[fold]
        assert (m["i2t_r1"], m["i2t_r5"], m["i2t_r10"], m["i2t_medr"]) == (0.0, 0.0, 100.0, 6.0)
        assert (m["t2i_r1"], m["t2i_r5"], m["t2i_medr"]) == (0.0, 100.0, 2.0)
    mean = results["fold5 mean"]
    assert (mean["i2t_r1"], mean["i2t_r5"], mean["i2t_r10"]) == (60.0, 60.0, 100.0)
    assert (mean["t2i_r1"], mean["t2i_r5"], mean["t2i_r10"]) == (60.0, 100.0, 100.0)
    assert mean["i2t_medr"] == pytest.approx(3.0)
    assert mean["t2i_medr"] == pytest.approx(1.4)
    assert mean["rsum"] == pytest.approx(480.0)
    assert results["full"] == retrieval_metrics(fold_matrix())
    assert results["full"]["i2t_r10"] == 0.0  # the off-diagonal 10s rank above everything


def test_fold5_works_on_tensors():
    sims = torch.from_numpy(fold_matrix())
    assert fold5_metrics(sims) == fold5_metrics(fold_matrix())


def test_fold5_needs_images_divisible_by_5():
    with pytest.raises(ValueError, match="divisible by 5, got n_images=12"):
        fold5_metrics(np.zeros((12, 60)))
    with pytest.raises(ValueError, match="multiple of n_images"):
        fold5_metrics(np.zeros((10, 51)))


def test_evaluate_similarity_rows():
    assert evaluate_similarity(HAND) == {"full": retrieval_metrics(HAND)}
    assert evaluate_similarity(fold_matrix(), 5, fold5=True) == fold5_metrics(fold_matrix())


# ----------------------------------------------------------------------------- similarity matrix


class PoolCosine(RetrievalModel):
    """Images: mean of region features; captions: masked mean of word embeddings; score: cosine."""

    def __init__(self, vocab: int = 20, dim: int = 6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.calls: list[tuple[int, int]] = []

    def encode_images(self, images: ImageBatch):
        return images.features.mean(dim=1), images.index  # a tuple encoding; the index is carried along

    def encode_captions(self, captions: CaptionBatch):
        return self.embed(captions.ids), captions.lengths  # padded width differs between batches

    def similarity(self, images, captions) -> Tensor:
        self.calls.append((images[0].shape[0], captions[0].shape[0]))
        words, lengths = captions
        mask = torch.arange(words.shape[1], device=words.device)[None, :] < lengths[:, None]
        pooled = (words * mask[..., None]).sum(1) / lengths[:, None]
        return nn.functional.normalize(images[0], dim=-1) @ nn.functional.normalize(pooled, dim=-1).T


def image_batches(features: Tensor, sizes: list[int]) -> list[ImageBatch]:
    out, start = [], 0
    for size in sizes:
        out.append(ImageBatch(features[start : start + size], torch.arange(start, start + size)))
        start += size
    return out


def caption_batches(ids: list[Tensor], sizes: list[int], per_image: int) -> list[CaptionBatch]:
    out, start = [], 0
    for size in sizes:
        chunk = ids[start : start + size]
        width = max(len(c) for c in chunk) + start % 3  # extra padding differs per batch
        padded = torch.zeros(size, width, dtype=torch.int64)
        for row, caption in enumerate(chunk):
            padded[row, : len(caption)] = caption
        index = torch.arange(start, start + size)
        out.append(CaptionBatch(padded, torch.tensor([len(c) for c in chunk]), index, index // per_image))
        start += size
    return out


@pytest.fixture
def tiny_split():
    features = torch.randn(11, 4, 6)
    ids = [torch.randint(1, 20, (int(n),)) for n in torch.randint(2, 9, (22,))]
    return features, ids


def test_similarity_matrix_matches_the_direct_computation(tiny_split):
    features, ids = tiny_split
    model = PoolCosine().train()
    sims = similarity_matrix(
        model, image_batches(features, [4, 4, 3]), caption_batches(ids, [5, 5, 5, 7], 2),
        image_shard=3, caption_shard=2, progress=False,
    )
    with torch.no_grad():
        pooled = torch.stack([model.embed(c).mean(0) for c in ids])
        want = nn.functional.normalize(features.mean(1), dim=-1) @ nn.functional.normalize(pooled, dim=-1).T
    assert sims.dtype == torch.float32 and sims.device.type == "cpu" and sims.shape == (11, 22)
    torch.testing.assert_close(sims, want)
    assert model.training  # the mode is restored
    assert max(rows for rows, _ in model.calls) == 3 and max(cols for _, cols in model.calls) == 2
    assert len(model.calls) == 4 * (3 + 3 + 3 + 4)  # 4 image shards x caption pieces per batch


def test_similarity_matrix_with_one_block_and_autocast(tiny_split):
    features, ids = tiny_split
    model = PoolCosine()
    exact = similarity_matrix(model, image_batches(features, [11]), caption_batches(ids, [22], 2), progress=False)
    assert len(model.calls) == 1
    low = similarity_matrix(
        model, image_batches(features, [11]), caption_batches(ids, [22], 2),
        progress=False, dtype_autocast=torch.bfloat16,
    )
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, exact, atol=3e-2, rtol=3e-2)


def test_similarity_matrix_needs_batches_in_index_order(tiny_split):
    features, ids = tiny_split
    images = image_batches(features, [4, 4, 3])
    images[1], images[2] = images[2], images[1]
    with pytest.raises(ValueError, match=r"image batch 1: .*expected indices 4..6, got \[8, 9, 10\]"):
        similarity_matrix(PoolCosine(), images, caption_batches(ids, [22], 2), progress=False)
    captions = caption_batches(ids, [22], 2)
    captions[0].index = captions[0].index + 1
    with pytest.raises(ValueError, match="caption batch 0"):
        similarity_matrix(PoolCosine(), image_batches(features, [11]), captions, progress=False)


def test_similarity_matrix_bad_arguments(tiny_split):
    features, ids = tiny_split
    with pytest.raises(ValueError, match="image_shard must be a positive int, got 0"):
        similarity_matrix(PoolCosine(), image_batches(features, [11]), [], image_shard=0)
    with pytest.raises(ValueError, match="yielded no images"):
        similarity_matrix(PoolCosine(), [], caption_batches(ids, [22], 2), progress=False)


def test_evaluate_model_on_a_precomp_split(tmp_path):
    words = [f"w{i}" for i in range(12)]
    features = np.random.default_rng(0).standard_normal((10, 4, 6)).astype(np.float32)
    captions = [" ".join(words[(3 * k) % 12 : (3 * k) % 12 + 1 + k % 5]) for k in range(20)]
    np.save(tmp_path / "test_ims.npy", features)
    (tmp_path / "test_caps.txt").write_text("\n".join(captions) + "\n")
    vocab = Vocabulary(words)
    split = PrecompSplit(tmp_path, "test", vocab, captions_per_image=2)
    model = PoolCosine(vocab=len(vocab))
    results, sims = evaluate_model(model, split, fold5=True, batch_size=3, progress=False)
    with torch.no_grad():
        pooled = torch.stack([model.embed(torch.tensor(vocab.encode(c.split()))).mean(0) for c in captions])
        images = nn.functional.normalize(torch.from_numpy(features).mean(1), dim=-1)
        want = images @ nn.functional.normalize(pooled, dim=-1).T
    torch.testing.assert_close(sims, want)
    assert results == fold5_metrics(sims, 2)
    plain, _ = evaluate_model(model, split, batch_size=4, progress=False)
    assert plain == {"full": results["full"]}


def test_encoding_helpers():
    a, b = (torch.arange(3), torch.ones(3, 2)), (torch.arange(3, 5), torch.zeros(2, 2))
    both = concat_encodings([a, b])
    assert both[0].tolist() == [0, 1, 2, 3, 4] and both[1].shape == (5, 2)
    assert slice_encoding(both, 2, 4)[0].tolist() == [2, 3]
    assert slice_encoding(torch.arange(5), 1, 3).tolist() == [1, 2]
    with pytest.raises(ValueError, match="2 parts"):
        concat_encodings([a, (torch.arange(2),)])


# ----------------------------------------------------------------------------- files and ensembles


def test_save_load_round_trip(tmp_path):
    sims = torch.rand(3, 15, dtype=torch.float64)
    path = save_similarity(tmp_path / "sgr_test", sims, {"model": "sgr", "split": "test", "checkpoint": "best.pt"})
    assert path == tmp_path / "sgr_test.npy"
    loaded, meta = load_similarity(tmp_path / "sgr_test.npy")
    assert loaded.dtype == torch.float32
    torch.testing.assert_close(loaded, sims.float())
    assert meta == {"model": "sgr", "split": "test", "checkpoint": "best.pt", "n_images": 3, "n_captions": 15}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sgr_test.json", "sgr_test.npy"]  # no temporaries


def test_save_rejects_conflicting_meta(tmp_path):
    with pytest.raises(ValueError, match="n_images"):
        save_similarity(tmp_path / "x", np.zeros((2, 4), dtype=np.float32), {"n_images": 3})


def test_load_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.npy"):
        load_similarity(tmp_path / "nothing")


def test_ensemble_averages(tmp_path):
    a, b = np.random.rand(2, 10).astype(np.float32), np.random.rand(2, 10).astype(np.float32)
    save_similarity(tmp_path / "sgr", a, {"split": "test"})
    save_similarity(tmp_path / "saf", b, {"split": "test"})
    out, meta = ensemble([tmp_path / "sgr.npy", tmp_path / "saf"])
    np.testing.assert_allclose(out.numpy(), (a + b) / 2, rtol=1e-6)
    assert meta == {"split": "test", "n_images": 2, "n_captions": 10}
    assert evaluate_similarity(out) == {"full": retrieval_metrics((a + b) / 2)}


def test_ensemble_mismatch_names_both_files(tmp_path):
    save_similarity(tmp_path / "sgr", np.zeros((2, 10), dtype=np.float32), {"split": "test"})
    save_similarity(tmp_path / "saf", np.zeros((2, 8), dtype=np.float32), {"split": "test"})
    save_similarity(tmp_path / "dev", np.zeros((2, 10), dtype=np.float32), {"split": "dev"})
    with pytest.raises(ValueError, match=r"sgr.npy has \(2, 10\).*saf.npy has \(2, 8\)"):
        ensemble([tmp_path / "sgr", tmp_path / "saf"])
    with pytest.raises(ValueError, match="different splits.*'test'.*'dev'"):
        ensemble([tmp_path / "sgr", tmp_path / "dev"])


@pytest.mark.parametrize("key, other", [("data", "/data/coco_precomp"), ("captions_per_image", 4)])
def test_ensemble_refuses_matrices_of_another_dataset(tmp_path, key, other):
    meta = {"split": "test", "data": "/data/f30k_precomp", "captions_per_image": 5}
    save_similarity(tmp_path / "sgr", np.zeros((2, 10), dtype=np.float32), meta)
    save_similarity(tmp_path / "saf", np.zeros((2, 10), dtype=np.float32), {**meta, key: other})
    with pytest.raises(ValueError, match=f"cannot average .* different .*sgr.npy has {key} {meta[key]!r}, .*saf.npy has {other!r}"):
        ensemble([tmp_path / "sgr", tmp_path / "saf"])
    with pytest.raises(ValueError, match="at least one"):
        ensemble([])


# ----------------------------------------------------------------------------- reports


def test_format_table():
    rows = {"test": retrieval_metrics(HAND), "fold5 mean": fold5_metrics(fold_matrix())["fold5 mean"]}
    table = format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1  # fixed width
    assert "image -> text" in lines[0] and "text -> image" in lines[0]
    assert lines[1].split() == ["R@1", "R@5", "R@10", "medr", "meanr"] * 2 + ["rsum"]
    assert lines[2].split() == ["test", "0.0", "33.3", "66.7", "7.0", "6.7", "13.3", "100.0", "100.0", "3.0",
                                "2.5", "313.3"]
    assert lines[3].startswith("fold5 mean") and lines[3].endswith("480.0")
    with pytest.raises(KeyError, match="results\\['bad'\\] lacks the metrics \\['i2t_r5'"):
        format_table({"bad": {"i2t_r1": 1.0}})


def test_write_json_round_trip(tmp_path):
    results = fold5_metrics(fold_matrix())
    write_json(tmp_path / "out" / "results.json", results)
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == results
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["results.json"]
