"""README promises of ``sgfused eval`` / ``eval-ensemble`` ("Evaluation") and of search ("Search a gallery").

Tiny untrained models on a tiny synthetic split whose test images are all twins or their bases:
what is tested is what the README says the commands do, not that the models are good.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from sgfused.checkpoint import save_checkpoint
from sgfused.cli import main
from sgfused.data.batch import CaptionBatch
from sgfused.data.precomp import PrecompSplit, caption_loader, image_loader
from sgfused.data.vocab import Vocabulary, tokenize
from sgfused.evaluate import evaluate_model, retrieval_metrics, similarity_matrix
from sgfused.models import build_model, model_class
from sgfused.retrieval import GalleryIndex, Searcher, build_index
from sgfused.retrieval import late

TINY = {
    "sgraf": {"img_dim": 16, "embed_size": 16, "word_dim": 8, "sim_dim": 8},
    "sgm": {"img_dim": 16, "embed_size": 16, "word_dim": 8},
    "vsepp": {"img_dim": 16, "embed_size": 16, "word_dim": 8},
}
N_IMAGES, N_CAPTIONS = 6, 30  # the test (and dev) split: 10% of 60 images, 5 captions each
TWIN_KINDS = {"relation twins": ("predicate", "direction"), "attribute twins": ("attribute",)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """60 images, half of each split twins: seed 4's test split has relation and attribute twins."""
    root = tmp_path_factory.mktemp("evs_data")
    argv = ["data", "synth", "--out", str(root), "--images", "60", "--seed", "4", "--feature-dim", "16",
            "--twin-fraction", "0.5", "--quiet"]
    assert main(argv) == 0
    differs = {record["differs"] for record in json.loads((root / "test_distractors.json").read_text())}
    assert differs & {"predicate", "direction"} and "attribute" in differs  # both rows must be reported
    return root


def _checkpoint(path: Path, name: str, vocab: Vocabulary, seed: int) -> Path:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model(name, len(vocab), TINY[name])
    save_checkpoint(path, {"model_name": name, "model_config": model.build_config, "vocab": vocab.to_dict(),
                           "model": model.state_dict()})
    return path


@pytest.fixture(scope="module")
def vsepp(data, tmp_path_factory):
    """Two VSE++ checkpoints of different weights on the data's vocabulary."""
    root = tmp_path_factory.mktemp("evs_checkpoints")
    vocab = Vocabulary.load(data / "vocab.json")
    return [_checkpoint(root / f"vsepp_{seed}.pt", "vsepp", vocab, seed) for seed in (0, 1)]


def _fails(args, capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("sgfused ") and "Traceback" not in err
    return err


def _eval(checkpoint, data, *extra):
    return ["eval", str(checkpoint), "--data", str(data), "--quiet", *extra]


# ----------------------------------------------------------------------------- evaluation


def _count_encoded(monkeypatch) -> dict[str, list[int]]:
    """Wraps VSE++'s encode functions: the indices of every image and caption they are given, in call order."""
    seen: dict[str, list[int]] = {"image": [], "caption": []}
    cls = model_class("vsepp")
    for kind, name in (("image", "encode_images"), ("caption", "encode_captions")):
        def counting(self, batch, _kind=kind, _encode=getattr(cls, name)):
            seen[_kind].extend(batch.index.tolist())
            return _encode(self, batch)

        monkeypatch.setattr(cls, name, counting)
    return seen


def test_eval_encodes_each_image_and_each_caption_exactly_once(data, vsepp, monkeypatch, capsys):
    """README: `sgfused eval` encodes each image and each caption once (CLI, evaluate_model, and small blocks)."""
    seen = _count_encoded(monkeypatch)
    assert main(_eval(vsepp[0], data, "--batch-size", "4")) == 0
    assert sorted(seen["image"]) == list(range(N_IMAGES)) and sorted(seen["caption"]) == list(range(N_CAPTIONS))

    vocab = Vocabulary.load(data / "vocab.json")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("vsepp", len(vocab), TINY["vsepp"])
    split = PrecompSplit(data, "test", vocab)
    for kind in seen:
        seen[kind].clear()
    evaluate_model(model, split, batch_size=4, progress=False)
    assert sorted(seen["image"]) == list(range(N_IMAGES)) and sorted(seen["caption"]) == list(range(N_CAPTIONS))
    for kind in seen:
        seen[kind].clear()
    # blocks of 2 images x 3 captions: 3 x 10 similarity calls, still one encoding per item
    similarity_matrix(model, image_loader(split, 4), caption_loader(split, 7), image_shard=2, caption_shard=3,
                      progress=False)
    assert sorted(seen["image"]) == list(range(N_IMAGES)) and sorted(seen["caption"]) == list(range(N_CAPTIONS))


def test_save_sims_sidecar_records_what_the_readme_lists(data, vsepp, tmp_path):
    """README: --save-sims writes the float32 matrix (.npy) and a .json of model, checkpoint, dataset folder,
    split, captions per image and shape; nothing more, nothing less."""
    out = tmp_path / "vsepp_dev"
    assert main(_eval(vsepp[0], data, "--split", "dev", "--save-sims", str(out), "--json", str(tmp_path / "r.json"))) == 0
    sidecar = json.loads((tmp_path / "vsepp_dev.json").read_text())
    expected = {
        "model": "vsepp",  # model
        "checkpoint": str(vsepp[0]),  # checkpoint (as given, absolute here)
        "data": str(data.resolve()),  # dataset folder
        "split": "dev",  # split
        "captions_per_image": 5,  # captions per image
        "n_images": N_IMAGES, "n_captions": N_CAPTIONS,  # shape
    }
    assert sidecar == expected
    matrix = np.load(tmp_path / "vsepp_dev.npy")
    assert matrix.dtype == np.float32 and matrix.shape == (N_IMAGES, N_CAPTIONS)
    state = torch.load(vsepp[0], weights_only=True)
    vocab = Vocabulary.from_dict(state["vocab"])
    model = build_model("vsepp", len(vocab), state["model_config"])
    model.load_state_dict(state["model"])
    split = PrecompSplit(data, "dev", vocab)
    _, sims = evaluate_model(model, split, batch_size=8, progress=False)
    np.testing.assert_allclose(matrix, sims.numpy(), rtol=1e-6, atol=1e-6)  # the matrix of that split
    assert json.loads((tmp_path / "r.json").read_text())["full"] == pytest.approx(retrieval_metrics(matrix))


def _expected_twins(sims: np.ndarray, records: list[dict], per_image: int = 5):
    """Rows and twin accuracies computed here: metrics on the pairs' images and captions; for each image of a pair
    (both ways), its captions won when its own image scores higher than the twin (text -> image), and the image won
    when the best of its own captions scores higher than the best of the twin's (image -> text); a tie is half a win."""
    def win(own: float, other: float) -> float:
        return 1.0 if own > other else 0.5 if own == other else 0.0

    rows, accuracy = {}, {}
    for name, kinds in TWIN_KINDS.items():
        pairs = [(r["image"], r["twin_of"]) for r in records if r["differs"] in kinds]
        images = sorted({image for pair in pairs for image in pair})
        captions = [image * per_image + j for image in images for j in range(per_image)]
        rows[name] = retrieval_metrics(sims[np.ix_(images, captions)], per_image)
        t2i, i2t = [], []
        for own, twin in pairs + [(b, a) for a, b in pairs]:
            own_captions = range(own * per_image, (own + 1) * per_image)
            twin_captions = range(twin * per_image, (twin + 1) * per_image)
            t2i += [win(sims[own, c], sims[twin, c]) for c in own_captions]
            i2t.append(win(max(sims[own, c] for c in own_captions), max(sims[own, c] for c in twin_captions)))
        accuracy[name] = {"i2t": 100.0 * np.mean(i2t), "t2i": 100.0 * np.mean(t2i)}
    return rows, accuracy


def _assert_twins_reported(printed: str, results: dict, sims: np.ndarray, records: list[dict]) -> None:
    rows, accuracy = _expected_twins(sims, records)
    lines = printed.splitlines()
    for name in TWIN_KINDS:
        table = [line for line in lines if line.startswith(name) and "%" not in line]
        assert len(table) == 1, (name, printed)
        values = table[0][len(name):].split()
        keys = [f"{d}_{m}" for d in ("i2t", "t2i") for m in ("r1", "r5", "r10", "medr", "meanr")] + ["rsum"]
        assert values == [f"{rows[name][key]:.1f}" for key in keys], (name, table[0])
        stated = " ".join(line for line in lines if line.startswith(name) and "%" in line)  # the accuracy line
        assert f"{accuracy[name]['i2t']:.1f}%" in stated and f"{accuracy[name]['t2i']:.1f}%" in stated, (name, printed)
        assert results[name] == pytest.approx(rows[name])
        assert results["twin_accuracy"][name]["i2t"] == pytest.approx(accuracy[name]["i2t"])
        assert results["twin_accuracy"][name]["t2i"] == pytest.approx(accuracy[name]["t2i"])
    # not a degenerate case that a wrong count could pass: some accuracy lies strictly between 0 and 100
    assert {round(a["t2i"]) for a in accuracy.values()} - {0, 100}


def test_eval_and_eval_ensemble_report_the_hard_distractors(data, vsepp, tmp_path, capsys):
    """README: on synthetic data both commands print the rows `relation twins` and `attribute twins` and a twin
    accuracy per kind, and --json holds them (rows and `twin_accuracy`); numbers recomputed here from the matrices."""
    records = json.loads((data / "test_distractors.json").read_text())
    capsys.readouterr()
    for seed, checkpoint in enumerate(vsepp):
        argv = _eval(checkpoint, data, "--save-sims", str(tmp_path / f"m{seed}"), "--json", str(tmp_path / f"r{seed}.json"))
        assert main(argv) == 0
        _assert_twins_reported(capsys.readouterr().out, json.loads((tmp_path / f"r{seed}.json").read_text()),
                               np.load(tmp_path / f"m{seed}.npy"), records)
    argv = ["eval-ensemble", str(tmp_path / "m0.npy"), str(tmp_path / "m1.npy"), "--json", str(tmp_path / "ens.json")]
    assert main(argv) == 0
    mean = (np.load(tmp_path / "m0.npy") + np.load(tmp_path / "m1.npy")) / 2
    _assert_twins_reported(capsys.readouterr().out, json.loads((tmp_path / "ens.json").read_text()), mean, records)


def test_save_sims_and_json_files_get_the_umask_mode(data, vsepp, tmp_path):
    """README: --save-sims matrices and --json files get the mode the umask gives (640 under umask 027)."""
    previous = os.umask(0o027)
    try:
        assert main(_eval(vsepp[0], data, "--save-sims", str(tmp_path / "m"), "--json", str(tmp_path / "r.json"))) == 0
        assert main(["eval-ensemble", str(tmp_path / "m.npy"), "--json", str(tmp_path / "ens.json")]) == 0
    finally:
        os.umask(previous)
    for name in ("m.npy", "m.json", "r.json", "ens.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name


def test_eval_refuses_a_missing_checkpoint_and_a_wrong_caption_count_in_one_line(data, vsepp, tmp_path, capsys):
    """README: a missing checkpoint, and a split whose caption count is not --captions-per-image per image, are one
    line with status 2."""
    err = _fails(_eval(tmp_path / "missing.pt", data), capsys)
    assert err.count("\n") == 1 and f"checkpoint {tmp_path / 'missing.pt'} does not exist" in err
    err = _fails(_eval(vsepp[0], data, "--captions-per-image", "4"), capsys)
    assert err.count("\n") == 1 and f"has {N_CAPTIONS} captions for the {N_IMAGES} images" in err and "expected 4" in err
    assert not list(tmp_path.iterdir())  # refused before anything is written


# ----------------------------------------------------------------------------- search


@pytest.fixture(scope="module")
def indexes(data, tmp_path_factory):
    """An SGM index; an SGRAF index keyed by a VSE++ checkpoint with its own vocabulary (the data's words in another
    order, plus two of its own); the VSE++ key's own index."""
    root = tmp_path_factory.mktemp("evs_indexes")
    vocab = Vocabulary.load(data / "vocab.json")
    words = [vocab.idx2word[i] for i in range(4, len(vocab))]
    order = np.random.default_rng(5).permutation(len(words))
    key_vocab = Vocabulary(["zebra", *[words[i] for i in order], "violin"])
    sgm = _checkpoint(root / "sgm.pt", "sgm", vocab, 2)
    sgraf = _checkpoint(root / "sgraf.pt", "sgraf", vocab, 3)
    key = _checkpoint(root / "key.pt", "vsepp", key_vocab, 4)
    build_index(sgm, data, "test", root / "sgm", batch_size=4, progress=False)
    build_index(sgraf, data, "test", root / "keyed", batch_size=4, progress=False, shortlist_checkpoint=key)
    build_index(key, data, "test", root / "key", batch_size=4, progress=False)
    return {"sgm": root / "sgm", "keyed": root / "keyed", "key": root / "key", "key_vocab": key_vocab, "vocab": vocab}


def _mapped_files(address: int) -> set[str]:
    """The files mapped at ``address`` in this process (Linux /proc/self/maps)."""
    found = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, stop = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < stop and len(fields) == 6:
            found.add(fields[5].strip())
    return found


@pytest.mark.parametrize("which", ["sgm", "keyed"])
def test_an_opened_index_memory_maps_its_arrays(indexes, which):
    """README: the index's arrays are memory-mapped: every encoding part is an np.memmap of its file, and the global
    vectors are tensors over the mapping of theirs (not copies in memory)."""
    path = indexes[which]
    index = GalleryIndex.open(path)
    for kind in ("image", "caption"):
        assert index.parts[kind]
        for j, part in enumerate(index.parts[kind]):
            assert isinstance(part, np.memmap), (kind, j, type(part))
            assert Path(part.filename) == (path / f"{kind}_{j}.npy").resolve(), (kind, j)
        vectors = index.vectors[kind]
        assert str((path / f"{kind}_global.npy").resolve()) in _mapped_files(vectors.data_ptr()), kind


def test_a_shortlist_key_with_its_own_vocabulary_encodes_the_query_with_it(indexes):
    """README: a VSE++ key may have its own vocabulary: the first-stage score of each hit is the key model's own
    exhaustive score for the typed caption (encoded with the key's vocabulary), the hit's score SGRAF's."""
    keyed, key = Searcher(indexes["keyed"], use_faiss=False), Searcher(indexes["key"], use_faiss=False)
    assert keyed.key_vocab.word2idx == indexes["key_vocab"].word2idx
    for kind in ("image", "caption"):  # the stored keys: VSE++'s vectors, its captions read with its vocabulary
        torch.testing.assert_close(keyed.index.vectors[kind], key.index.vectors[kind])
    for caption in (3, 11):
        text = keyed.index.captions[caption]
        own = {hit.item: hit.score for hit in key.by_caption(text, top=N_IMAGES).hits}  # VSE++ alone, exhaustive
        sgraf = {hit.item: hit.score for hit in keyed.by_caption(text, top=N_IMAGES).hits}
        for shortlist in (3, N_IMAGES):
            result = keyed.by_caption(text, top=2, shortlist=shortlist)
            assert {hit.item for hit in result.hits} <= set(sorted(own, key=lambda i: -own[i])[:shortlist])
            for hit in result.hits:
                assert hit.shortlist_score == pytest.approx(own[hit.item], abs=1e-5)
                assert hit.score == pytest.approx(sgraf[hit.item], abs=1e-6)
        # the test can tell: read with the data's vocabulary, the key model gives other scores
        ids = torch.tensor([indexes["vocab"].encode(tokenize(text))])
        batch = CaptionBatch(ids, torch.tensor([ids.shape[1]]), torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
        with torch.no_grad():
            wrong = keyed.index.vectors["image"] @ keyed.key_model.encode_captions(batch)[0].float()
        assert not torch.allclose(wrong, torch.tensor([own[i] for i in range(N_IMAGES)]), atol=1e-3)


def _fake_image_parts(n_nodes: int, width: int = 6, dim: int = 8, seed: int = 0) -> list[np.ndarray]:
    """SGM image parts holding ``n_nodes`` object nodes in all: counts cycle 1..width (padding past them), one or two
    relation nodes per image."""
    counts = []
    while sum(counts) < n_nodes:
        counts.append(min(1 + len(counts) % width, n_nodes - sum(counts)))
    generator = torch.Generator().manual_seed(seed)
    n = len(counts)
    nodes = torch.nn.functional.normalize(torch.randn(n, width, dim, generator=generator), dim=-1)
    nodes[torch.arange(width)[None, :] >= torch.tensor(counts)[:, None]] = 0
    relations = torch.nn.functional.normalize(torch.randn(n, 2, dim, generator=generator), dim=-1)
    relation_counts = 1 + torch.arange(n) % 2
    return [nodes.numpy(), np.array(counts, dtype=np.int64), relations.numpy(), relation_counts.numpy()]


@pytest.mark.parametrize("n_nodes, centroids", [(1000, 8), (4095, 32), (4096, 64), (127, 1), (128, 2)])
def test_late_ivf_default_centroids_are_the_power_of_two_at_most_nodes_over_64(n_nodes, centroids):
    """README: the clusters are the power of two at most nodes / 64 (object nodes, padding not counted)."""
    parts = _fake_image_parts(n_nodes)
    assert int(parts[1].sum()) == n_nodes and parts[0].shape[0] * parts[0].shape[1] > n_nodes
    ivf = late.LateIVFShortlister(parts, 1.0)
    assert ivf.n_centroids == centroids and tuple(ivf.centroids.shape) == (centroids, 8)


def test_late_ivf_probes_each_words_8_best_clusters_by_default():
    """README: a query takes the images listed under each word's 8 best clusters (computed here from the centroids)."""
    parts = _fake_image_parts(4096)
    ivf = late.LateIVFShortlister(parts, 1.0)  # 64 clusters
    assert ivf.probes == 8
    generator = torch.Generator().manual_seed(7)
    words = torch.nn.functional.normalize(torch.randn(1, 5, 8, generator=generator), dim=-1)
    query = (words, torch.tensor([5]), torch.nn.functional.normalize(torch.randn(1, 1, 8, generator=generator), dim=-1),
             torch.tensor([1]))
    best = set(torch.topk(words[0] @ ivf.centroids.T, 8, dim=1).indices.flatten().tolist())
    nodes, counts = torch.from_numpy(parts[0]), torch.from_numpy(parts[1])
    nearest = (nodes @ ivf.centroids.T).argmax(dim=-1)  # (images, width)
    valid = torch.arange(nodes.shape[1])[None, :] < counts[:, None]
    listed = {image for image in range(len(counts))
              if any(int(c) in best for c in nearest[image][valid[image]])}
    assert 0 < len(listed) < len(counts)
    assert set(ivf._candidates(words[0] @ ivf.centroids.T, 1).tolist()) == listed
    _, rows = ivf(query, len(listed))
    assert set(rows.tolist()) == listed


def _centroid_scores(parts, centroids: torch.Tensor, query, weight: float) -> torch.Tensor:
    """Per image: the mean over the caption's words of the max over the image's object nodes of the cosine of the
    word and the node's nearest centroid, plus ``weight`` x the cosine of the mean relation nodes of both."""
    nodes, counts, relations, relation_counts = (torch.from_numpy(np.array(part)) for part in parts)
    words = query[0][0, : int(query[1][0])].float()
    caption_relations = query[2][0, : int(query[3][0])].float().mean(dim=0)
    out = []
    for image in range(len(counts)):
        own = nodes[image, : int(counts[image])].float()
        replaced = centroids[(own @ centroids.T).argmax(dim=1)]
        s_o = torch.stack([torch.max(torch.nn.functional.cosine_similarity(word[None], replaced, dim=1))
                           for word in words]).mean()
        rels = relations[image, : int(relation_counts[image])].float().mean(dim=0)
        cos = torch.nn.functional.cosine_similarity(rels, caption_relations, dim=0) if int(relation_counts[image]) else 0.0
        out.append(s_o + weight * cos)
    return torch.stack(out)


def test_late_ivf_first_stage_score_is_centroid_interaction_plus_pooled_relations(indexes):
    """README / late.py: each candidate's first-stage score is S_o with its nodes replaced by their centroids (mean
    over words of the best cosine) plus lambda x cos(pooled relation means); with 4 clusters (every list probed) and
    with the Searcher's default."""
    searcher = Searcher(indexes["sgm"], shortlist_by="late-ivf")
    parts, weight = searcher.index.parts["image"], searcher.model.relation_weight
    ivf = late.LateIVFShortlister(parts, weight, centroids=4)
    assert ivf.n_centroids == 4
    torch.testing.assert_close(ivf.centroids.norm(dim=1), torch.ones(4))
    exact = late.LateShortlister(parts, True, weight)
    for caption in (2, 17):
        query = searcher.index.encoding("caption", [caption])
        scores, rows = ivf(query, N_IMAGES)
        assert sorted(rows.tolist()) == list(range(N_IMAGES))
        want = _centroid_scores(parts, ivf.centroids, query, weight)
        torch.testing.assert_close(scores, want[rows], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(want, exact.scores(query), atol=1e-4)  # centroids, not the nodes themselves
        result = searcher.by_indexed_caption(caption, top=3, shortlist=4)
        default = _centroid_scores(parts, searcher.shortlister("image").centroids, query, weight)
        assert [hit.shortlist_score for hit in result.hits] == pytest.approx([float(default[h.item]) for h in result.hits],
                                                                               abs=1e-5)


def test_a_searcher_builds_the_late_ivf_clusters_once(indexes, monkeypatch):
    """README: a program that keeps one Searcher(index, shortlist_by="late-ivf") builds the clusters once, on first
    use."""
    calls = []

    def counting(*args, _kmeans=late.spherical_kmeans, **kwargs):
        calls.append(args[1] if len(args) > 1 else kwargs["k"])
        return _kmeans(*args, **kwargs)

    monkeypatch.setattr(late, "spherical_kmeans", counting)
    searcher = Searcher(indexes["sgm"], shortlist_by="late-ivf")
    assert calls == []
    first = searcher.by_caption("a red cup", top=2, shortlist=3)
    second = searcher.by_indexed_caption(4, top=2, shortlist=3)
    third = searcher.by_caption("a small dog", top=1, shortlist=2)
    assert first.stage == second.stage == third.stage == "two-stage (late-ivf)"
    assert len(calls) == 1
