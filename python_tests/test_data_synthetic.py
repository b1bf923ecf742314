"""Tests of the synthetic scene-graph dataset generator (sgfused.data.synthetic)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from sgfused.data.synthetic import SPLITS, WorldConfig, generate
from sgfused.data.vocab import Vocabulary

N_IMAGES, DIM, REGIONS = 40, 16, 36


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic_small")
    return out, generate(out, N_IMAGES, seed=0, feature_dim=DIM, progress=False)


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """More images, for the statistical checks (every predicate, enough twins)."""
    out = tmp_path_factory.mktemp("synthetic_large")
    generate(out, 400, seed=3, feature_dim=DIM, progress=False)
    return out


def load_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def captions(out: Path, split: str) -> list[str]:
    return (out / f"{split}_caps.txt").read_text(encoding="utf-8").splitlines()


def world(out: Path) -> dict:
    return load_json(out / "world.json")


def test_files_shapes_and_dtypes(small):
    out, summary = small
    assert summary["images"] == {"train": 32, "dev": 4, "test": 4}
    for split in SPLITS:
        n = summary["images"][split]
        ims = np.load(out / f"{split}_ims.npy")
        assert ims.shape == (n, REGIONS, DIM) and ims.dtype == np.float32
        assert np.isfinite(ims).all() and 0.3 < ims.std() < 3.0
        boxes = np.load(out / f"{split}_ims_bbx.npy")
        sizes = np.load(out / f"{split}_ims_size.npy")
        assert boxes.shape == (n, REGIONS, 4) and boxes.dtype == np.float32
        assert sizes.shape == (n, 2)
        assert (boxes[..., 2] > boxes[..., 0]).all() and (boxes[..., 3] > boxes[..., 1]).all()
        assert (boxes >= 0).all()
        assert (boxes[..., [0, 2]] <= sizes[:, None, :1]).all() and (boxes[..., [1, 3]] <= sizes[:, None, 1:]).all()
        assert len(captions(out, split)) == summary["captions"][split] == 5 * n
        assert len(load_json(out / f"{split}_ims_graphs.json")) == n
        assert len(load_json(out / f"{split}_caps_graphs.json")) == 5 * n


def test_graph_objects_and_relations_are_the_first_regions(small):
    out, _ = small
    for split in SPLITS:
        boxes = np.load(out / f"{split}_ims_bbx.npy")
        for b, graph in enumerate(load_json(out / f"{split}_ims_graphs.json")):
            n = len(graph["labels"])
            assert len(set(graph["labels"])) == n >= 2 and len(graph["rels"]) >= 1
            np.testing.assert_allclose(boxes[b, :n], graph["bbox"], atol=0.01)
            for k, (s, _, o) in enumerate(graph["rels"]):
                pair = np.array([graph["bbox"][s], graph["bbox"][o]])
                union = [*pair[:, :2].min(0), *pair[:, 2:].max(0)]
                np.testing.assert_allclose(boxes[b, n + k], union, atol=0.01)


def test_relation_features_file_holds_each_relations_union_box_region(small, tmp_path):
    """``{split}_ims_rels.npy`` row r is relation r's region, zero past the relations; PrecompSplit reads it (or not)."""
    from sgfused.data.precomp import PrecompError, PrecompSplit, collate_images

    out, _ = small
    width = min(WorldConfig().relations_per_image[1], WorldConfig().objects_per_image[1] - 1)
    for split in SPLITS:
        ims, rels = np.load(out / f"{split}_ims.npy"), np.load(out / f"{split}_ims_rels.npy")
        assert rels.shape == (len(ims), width, DIM) and rels.dtype == np.float32
        for b, graph in enumerate(load_json(out / f"{split}_ims_graphs.json")):
            n, k = len(graph["labels"]), len(graph["rels"])
            np.testing.assert_array_equal(rels[b, :k], ims[b, n : n + k])
            assert not rels[b, k:].any()
    vocab = Vocabulary.load(out / "vocab.json")
    batch = collate_images([PrecompSplit(out, "dev", vocab, relation_features=True).image(i) for i in range(2)])
    np.testing.assert_array_equal(batch.relation_features.numpy(), np.load(out / "dev_ims_rels.npy")[:2])
    assert PrecompSplit(out, "dev", vocab).image(0).relation_features is None
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("dev_ims.npy", "dev_caps.txt", "dev_ims_graphs.json"):
        (bare / name).write_bytes((out / name).read_bytes())
    assert not PrecompSplit(bare, "dev", vocab, relation_features=True).has_relation_features  # optional file
    np.save(bare / "dev_ims_rels.npy", np.load(out / "dev_ims_rels.npy")[:, :0])  # no row for any relation
    with pytest.raises(PrecompError, match=r"image 0: relation 0 .* has no row"):
        PrecompSplit(bare, "dev", vocab, image_graphs=True, relation_features=True)
    np.save(bare / "dev_ims_rels.npy", np.zeros((1, width, DIM), np.float32))
    with pytest.raises(PrecompError, match="relation feature file"):
        PrecompSplit(bare, "dev", vocab, relation_features=True)


def test_same_seed_same_bytes_other_seed_differs(small, tmp_path):
    out, _ = small
    generate(tmp_path / "again", N_IMAGES, seed=0, feature_dim=DIM, progress=False)
    generate(tmp_path / "other", N_IMAGES, seed=1, feature_dim=DIM, progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 2 + 8 * len(SPLITS)  # vocab.json, world.json and eight files per split
    assert names == sorted(p.name for p in (tmp_path / "again").iterdir())
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    for name in ("train_ims.npy", "train_caps.txt", "train_ims_graphs.json", "train_ims_bbx.npy"):
        assert (out / name).read_bytes() != (tmp_path / "other" / name).read_bytes(), name


def spatial_holds(predicate: str, s: np.ndarray, o: np.ndarray) -> bool:
    """The geometry a spatial predicate promises, checked from scratch (x1 y1 x2 y2, y grows downwards)."""
    y_overlap = min(s[3], o[3]) > max(s[1], o[1])
    if predicate == "left of":
        return s[2] < o[0]
    if predicate == "right of":
        return s[0] > o[2]
    if predicate == "above":
        return s[3] < o[1]
    if predicate == "below":
        return s[1] > o[3]
    if predicate == "on top of":
        centre = (s[0] + s[2]) / 2
        return o[0] <= centre <= o[2] and s[1] < o[1] < s[3] <= o[1] + 0.25 * (o[3] - o[1])
    if predicate == "next to":
        gap = max(s[0], o[0]) - min(s[2], o[2])  # negative when the boxes overlap horizontally
        return y_overlap and abs(gap) <= 0.25 * min(s[2] - s[0], o[2] - o[0])
    raise AssertionError(f"not a spatial predicate: {predicate}")


def test_boxes_agree_with_spatial_predicates(large):
    spatial = {p["name"] for p in world(large)["predicates"] if p["spatial"]}
    assert spatial == {"left of", "right of", "above", "below", "on top of", "next to"}
    checked = dict.fromkeys(spatial, 0)
    for split in SPLITS:
        boxes = np.load(large / f"{split}_ims_bbx.npy")
        for b, graph in enumerate(load_json(large / f"{split}_ims_graphs.json")):
            for s, predicate, o in graph["rels"]:
                if predicate in spatial:
                    assert spatial_holds(predicate, boxes[b, s], boxes[b, o]), (split, b, s, predicate, o)
                    checked[predicate] += 1
    assert min(checked.values()) >= 10, checked


def test_spatial_check_rejects_wrong_boxes():
    left, right = np.array([0, 0, 10, 10.0]), np.array([20, 0, 30, 10.0])
    assert spatial_holds("left of", left, right) and not spatial_holds("left of", right, left)
    assert not spatial_holds("above", left, right) and not spatial_holds("next to", left, right)


def dependency_root(heads: list[int], i: int) -> int:
    """Follow heads from token ``i`` to the root; fails on a cycle."""
    for _ in range(len(heads)):
        if heads[i] == -1:
            return i
        i = heads[i]
    raise AssertionError(f"cycle in {heads}")


def check_caption(caption: str, graph: dict, image: dict, names: dict) -> None:
    """One caption graph: a tree over caption.split() whose objects, attributes and relations are the image's."""
    tokens, heads = graph["tokens"], graph["heads"]
    assert tokens == caption.split() and all(t.isalpha() and t.islower() for t in tokens)
    assert len(heads) == len(tokens) and all(-1 <= h < len(tokens) for h in heads)
    roots = [i for i, h in enumerate(heads) if h == -1]
    assert len(roots) == 1 and all(dependency_root(heads, i) == roots[0] for i in range(len(tokens)))
    index = {label: i for i, label in enumerate(image["labels"])}
    assert graph["objects"] and all(tokens[p] in index for p in graph["objects"])
    image_attrs = {(i, a) for i, a in image["attrs"]}
    for obj, attr in graph["attributes"]:
        assert obj in graph["objects"] and heads[attr] == obj and tokens[attr] in names["attributes"]
        assert (index[tokens[obj]], tokens[attr]) in image_attrs
    image_rels = {(s, names["head_of"][p], o) for s, p, o in image["rels"]}
    for subj, pred, obj in graph["relations"]:
        assert subj in graph["objects"] and obj in graph["objects"] and heads[obj] == pred
        assert (index[tokens[subj]], tokens[pred], index[tokens[obj]]) in image_rels


def world_names(out: Path) -> dict:
    w = world(out)
    return {"attributes": {a["name"] for a in w["attributes"]}, "head_of": {p["name"]: p["head"] for p in w["predicates"]}}


def test_caption_graphs_are_valid_trees_true_of_their_image(large):
    names = world_names(large)
    with_relation = total = 0
    for split in SPLITS:
        images = load_json(large / f"{split}_ims_graphs.json")
        for k, (caption, graph) in enumerate(zip(captions(large, split), load_json(large / f"{split}_caps_graphs.json"))):
            check_caption(caption, graph, images[k // 5], names)
            with_relation += bool(graph["relations"])
            total += 1
    assert with_relation >= 0.8 * total


def test_caption_check_rejects_a_wrong_relation(large):
    image, (s, predicate, o) = next(
        (g, r) for g in load_json(large / "train_ims_graphs.json") for r in g["rels"] if r[1] in ("left of", "right of")
    )

    def caption(side: str) -> tuple[str, dict]:
        tokens = ["a", image["labels"][s], "to", "the", side, "of", "a", image["labels"][o]]
        return " ".join(tokens), {"tokens": tokens, "heads": [1, -1, 4, 4, 1, 4, 7, 4], "objects": [1, 7], "attributes": [], "relations": [[1, 4, 7]]}

    true_side = predicate.split()[0]
    check_caption(*caption(true_side), image, world_names(large))
    with pytest.raises(AssertionError):
        check_caption(*caption({"left": "right", "right": "left"}[true_side]), image, world_names(large))


def test_predicate_head_words(small):
    out, _ = small
    heads = world_names(out)["head_of"]
    assert heads["left of"] == "left" and heads["on top of"] == "on" and heads["holding"] == "holding"


def twin_pairs(out: Path, split: str):
    images = load_json(out / f"{split}_ims_graphs.json")
    for d in load_json(out / f"{split}_distractors.json"):
        yield d, images[d["twin_of"]], images[d["image"]]


def test_twins_differ_in_one_relation_or_attribute(large):
    kinds = set()
    for split in SPLITS:
        pairs = list(twin_pairs(large, split))
        assert pairs, split
        assert len({d["image"] for d, _, _ in pairs} | {d["twin_of"] for d, _, _ in pairs}) == 2 * len(pairs)
        for d, base, twin in pairs:
            kinds.add(d["differs"])
            assert base["labels"] == twin["labels"]
            if d["differs"] == "attribute":
                assert base["rels"] == twin["rels"]
                changed = [(a, b) for a, b in zip(base["attrs"], twin["attrs"]) if a != b]
                assert len(base["attrs"]) == len(twin["attrs"]) and len(changed) == 1
                assert changed[0] == ([d["object"], d["before"]], [d["object"], d["after"]])
            else:
                assert base["attrs"] == twin["attrs"] and len(base["rels"]) == len(twin["rels"])
                changed = [k for k, (a, b) in enumerate(zip(base["rels"], twin["rels"])) if a != b]
                assert changed == [d["relation"]]
                assert base["rels"][d["relation"]] == d["before"] and twin["rels"][d["relation"]] == d["after"]
                if d["differs"] == "direction":
                    assert d["after"] == d["before"][::-1]
    assert kinds == {"attribute", "predicate", "direction"}


def test_twin_captions_all_mention_the_difference(large):
    names = world_names(large)
    for split in SPLITS:
        graphs = load_json(large / f"{split}_caps_graphs.json")
        for d, _, twin in twin_pairs(large, split):
            for k in range(5 * d["image"], 5 * d["image"] + 5):
                tokens = graphs[k]["tokens"]
                if d["differs"] == "attribute":
                    said = {(tokens[o], tokens[a]) for o, a in graphs[k]["attributes"]}
                    assert (twin["labels"][d["object"]], d["after"]) in said
                else:
                    s, p, o = d["after"]
                    said = {(tokens[a], tokens[b], tokens[c]) for a, b, c in graphs[k]["relations"]}
                    assert (twin["labels"][s], names["head_of"][p], twin["labels"][o]) in said


def test_object_regions_are_nearest_their_class_centroid(large):
    ims = np.load(large / "train_ims.npy")
    graphs = load_json(large / "train_ims_graphs.json")
    features = np.concatenate([ims[b, : len(g["labels"])] for b, g in enumerate(graphs)])
    labels = np.array([label for g in graphs for label in g["labels"]])
    classes = sorted(set(labels))
    centroids = np.stack([features[labels == c].mean(0) for c in classes])
    nearest = np.array(classes)[((features[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)]
    assert (nearest == labels).mean() > 0.9
    own_distance = ((features - centroids[np.searchsorted(classes, labels)]) ** 2).sum(-1).mean()
    background = ims[:, -1]  # the last region is background in every image
    assert ((background[:, None] - centroids[None]) ** 2).sum(-1).min(1).mean() > 2 * own_distance


def test_vocabulary_covers_train_and_dev_words(small):
    out, summary = small
    vocab = Vocabulary.load(out / "vocab.json")
    assert len(vocab) == summary["vocab_size"]
    words = {w for split in ("train", "dev") for c in captions(out, split) for w in c.split()}
    assert words <= set(vocab.word2idx)


def test_world_json_documents_the_dataset(small):
    out, summary = small
    w = world(out)
    assert w["seed"] == 0 and w["feature_dim"] == DIM and w["n_regions"] == REGIONS
    assert w["images"] == summary["images"] and w["config"] == json.loads(json.dumps(asdict(WorldConfig())))
    assert len(w["classes"]) == WorldConfig().n_classes and len(w["attributes"]) == WorldConfig().n_attributes
    used = {label for split in SPLITS for g in load_json(out / f"{split}_ims_graphs.json") for label in g["labels"]}
    assert used <= {c["name"] for c in w["classes"]}


def test_world_config_is_honoured(tmp_path):
    config = WorldConfig(n_classes=5, objects_per_image=(3, 3), relations_per_image=(2, 2), distractor_fraction=0.0)
    generate(tmp_path, 20, feature_dim=4, n_regions=8, world=config, progress=False)
    assert np.load(tmp_path / "train_ims.npy").shape == (16, 8, 4)
    for split in SPLITS:
        assert load_json(tmp_path / f"{split}_distractors.json") == []
        for g in load_json(tmp_path / f"{split}_ims_graphs.json"):
            assert len(g["labels"]) == 3 and len(g["rels"]) == 2
            assert set(g["labels"]) <= {c["name"] for c in world(tmp_path)["classes"]}


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(world=WorldConfig(objects_per_image=(1, 3))),
        dict(world=WorldConfig(relations_per_image=(0, 2))),
        dict(world=WorldConfig(n_classes=99)),
        dict(n_regions=6),
        dict(splits=(0.5, 0.5, 0.5)),
        dict(splits=(1.0, 0.0, 0.0)),
    ],
)
def test_invalid_arguments_raise(tmp_path, kwargs):
    with pytest.raises(ValueError):
        generate(tmp_path, 40, feature_dim=4, progress=False, **kwargs)


def test_hard_setting_twins_share_region_features_and_differ_in_layout(tmp_path):
    # relations only in boxes and graphs: a relation twin has its base's features bit for bit, an attribute
    # twin differs in the changed object's region only; union-box features are the pair's mean
    generate(tmp_path, 400, seed=0, feature_dim=16, world=WorldConfig(setting="hard", distractor_fraction=0.5), progress=False)
    features, boxes = np.load(tmp_path / "test_ims.npy"), np.load(tmp_path / "test_ims_bbx.npy")
    relation_features = np.load(tmp_path / "test_ims_rels.npy")
    graphs = json.loads((tmp_path / "test_ims_graphs.json").read_text())
    records = json.loads((tmp_path / "test_distractors.json").read_text())
    assert {r["differs"] for r in records} == {"attribute", "direction", "predicate"}
    for r in records:
        twin, base, n = r["image"], r["twin_of"], len(graphs[r["image"]]["labels"])
        changed = np.nonzero(np.abs(features[twin] - features[base]).sum(1))[0].tolist()
        assert changed == ([r["object"]] if r["differs"] == "attribute" else [])
        assert np.array_equal(boxes[twin, n:], boxes[base, n:])  # background boxes shared
        if r["differs"] != "attribute":
            assert not np.array_equal(boxes[twin, :n], boxes[base, :n])  # the objects laid out anew
    for i, graph in enumerate(graphs):
        for k, (s, _, o) in enumerate(graph["rels"]):
            np.testing.assert_allclose(relation_features[i, k], (features[i, s] + features[i, o]) / 2, rtol=1e-6)


def test_unknown_setting_is_refused(tmp_path):
    with pytest.raises(ValueError, match="setting must be one of"):
        generate(tmp_path, 40, feature_dim=4, world=WorldConfig(setting="medium"), progress=False)


def test_an_interrupted_generation_is_not_taken_for_a_finished_dataset(tmp_path, monkeypatch):
    """world.json marks a finished dataset: removed first, written last, so a crash leaves none."""
    from sgfused.data import synthetic

    assert not synthetic.holds_dataset(tmp_path, 20, 5, 8)
    synthetic.generate(tmp_path, 20, 5, feature_dim=8, progress=False)
    assert synthetic.holds_dataset(tmp_path, 20, 5, 8)
    assert not synthetic.holds_dataset(tmp_path, 20, 6, 8)  # another seed
    assert not synthetic.holds_dataset(tmp_path, 20, 5, 8, synthetic.WorldConfig(setting="hard"))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_write_split", crash)
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate(tmp_path, 20, 5, feature_dim=8, progress=False)
    assert not (tmp_path / "world.json").exists() and not synthetic.holds_dataset(tmp_path, 20, 5, 8)
