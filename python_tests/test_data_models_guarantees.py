"""Guards the promises of README.md's "Data" and "Models" sections that no other test checks.

Data: the synthetic generator's default twin share and ``--twin-fraction``, the hard setting's lack
of relation regions, NaN / inf in relation features reported with the split and image index.
Models: MPSM's ``spatial_prior`` / ``dependency_prior`` ablations; SGFN's defaults (one cross-modal
layer, GRU biases at zero, relation / attribute layers at 0.7% weight, ``S_G + 0.3 S_L``) and its
``intra`` / ``cross`` ablations; SGM's defaults (``relation_weight`` 1, ``max_relations`` 25, one GCN
layer, ``W_u``: 2048 + 300 -> 2048); CMSEI's CPU tile size (16 Ki fragments) and its reading only
``rels`` of the visual graphs; the training recipes in ``configs/`` the README lists.

Tiny synthetic datasets (feature_dim 8) and small models; every test runs on one torch thread.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sgfused.cli import main
from sgfused.data.batch import CaptionBatch, ImageBatch
from sgfused.data.precomp import PrecompError, PrecompSplit
from sgfused.data.synthetic import SPLITS, WorldConfig, generate
from sgfused.data.vocab import Vocabulary
from sgfused.models import build_model
from sgfused.models.sgfn import SGFN
from sgfused.models.sgm import SGM

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

pytestmark = pytest.mark.usefixtures("one_thread")


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def easy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("guarantees_easy")
    generate(out, 40, seed=0, feature_dim=8, progress=False)
    return out


# ============================================================================ Data


def test_synthetic_twins_are_a_fifth_by_default_and_twin_fraction_sets_the_share(easy, tmp_path, capsys):
    """README Data: "20% of images are hard distractors"; "--twin-fraction F sets the share of twins (default 0.2)"."""
    counts = _json(easy / "world.json")["images"]
    for split in SPLITS:
        assert len(_json(easy / f"{split}_distractors.json")) == round(0.2 * counts[split]), split
    out = tmp_path / "half"
    assert main(["data", "synth", "--out", str(out), "--images", "40", "--seed", "0", "--feature-dim", "8",
                 "--twin-fraction", "0.5", "--quiet"]) == 0
    capsys.readouterr()
    assert _json(out / "world.json")["config"]["distractor_fraction"] == 0.5
    for split in SPLITS:
        records = _json(out / f"{split}_distractors.json")
        assert len(records) == round(0.5 * counts[split]), split
        assert all({"image", "twin_of", "differs"} <= set(r) for r in records)


def test_hard_setting_has_no_relation_regions(tmp_path):
    """README Data: ``--setting hard`` "has no relation regions" (the easy setting puts union boxes after the objects)."""
    generate(tmp_path, 40, seed=0, feature_dim=8, world=WorldConfig(setting="hard"), progress=False)
    checked = 0
    for split in SPLITS:
        boxes = np.load(tmp_path / f"{split}_ims_bbx.npy")
        for b, graph in enumerate(_json(tmp_path / f"{split}_ims_graphs.json")):
            n = len(graph["labels"])
            for k, (s, _, o) in enumerate(graph["rels"]):
                pair = np.array([graph["bbox"][s], graph["bbox"][o]])
                union = np.array([*pair[:, :2].min(0), *pair[:, 2:].max(0)])
                assert not np.allclose(boxes[b, n + k], union, atol=0.01), (split, b, k)
                checked += 1
    assert checked > 40


def test_nan_in_relation_features_is_reported_with_split_and_image(easy, tmp_path):
    """README Data: "NaN or inf in a feature is reported with the split and the image index when its batch is loaded"
    (here in ``{split}_ims_rels.npy``)."""
    for name in ("dev_ims.npy", "dev_caps.txt", "dev_ims_rels.npy"):
        shutil.copy(easy / name, tmp_path / name)
    rels = np.load(tmp_path / "dev_ims_rels.npy")
    rels[1, 0, 0] = np.inf
    np.save(tmp_path / "dev_ims_rels.npy", rels)
    split = PrecompSplit(tmp_path, "dev", Vocabulary.load(easy / "vocab.json"), relation_features=True)
    assert split.image(0).relation_features is not None  # the others load
    with pytest.raises(PrecompError, match=r"split 'dev': image 1 has NaN or inf relation features in '.*dev_ims_rels.npy'"):
        split.image(1)


# ============================================================================ MPSM

MPSM_DIMS = dict(embed_size=16, sim_dim=8, word_dim=8, img_dim=12, num_regions=5)
MPSM_VOCAB = 30


def _mpsm_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(3, 5, 12, generator=g)
    corner = torch.rand(3, 5, 2, generator=g) * 0.7
    boxes = torch.cat([corner, corner + torch.rand(3, 5, 2, generator=g) * 0.3 + 0.02], dim=-1)
    lengths = torch.tensor([7, 5, 4])
    ids = torch.randint(4, MPSM_VOCAB, (3, 7), generator=g)
    ids[torch.arange(7) >= lengths[:, None]] = 0
    graphs = [{"tokens": ["w"] * (n - 2), "heads": [-1] + [t - 1 for t in range(1, n - 2)], "objects": [],
               "attributes": [], "relations": []} for n in lengths.tolist()]
    return features, boxes, ids, lengths, graphs


@pytest.mark.parametrize("perspective", ["distance", "direction"])
def test_mpsm_spatial_prior_false_makes_p_v_all_ones(perspective):
    """README MPSM: ``spatial_prior=false`` (``P_v`` all ones) is an option (``--set``) and an attribute of a trained
    model: without the spatial graph the image encoding no longer depends on the boxes."""
    torch.manual_seed(0)
    model = build_model("mpsm", MPSM_VOCAB, dict(MPSM_DIMS, perspective=perspective, spatial_prior=False)).eval()
    assert model.spatial_prior is False
    features, boxes, *_ = _mpsm_inputs()
    other = boxes.flip(1)
    with torch.no_grad():
        for got, want in zip(model.encode_image(features, other), model.encode_image(features, boxes)):
            assert torch.equal(got, want)
        model.spatial_prior = True
        moved = (model.encode_image(features, other)[0] - model.encode_image(features, boxes)[0]).abs().max()
    assert moved > 1e-6  # with the prior, the boxes matter


def test_mpsm_dependency_prior_false_removes_the_arcs():
    """README MPSM: ``dependency_prior=false`` (no dependency arcs): the text encoding no longer depends on the heads."""
    torch.manual_seed(0)
    model = build_model("mpsm", MPSM_VOCAB, dict(MPSM_DIMS, dependency_prior=False)).eval()
    assert model.dependency_prior is False
    _, _, ids, lengths, graphs = _mpsm_inputs()
    flat = copy.deepcopy(graphs)
    for graph in flat:
        graph["heads"] = [-1] + [0] * (len(graph["heads"]) - 1)
    with torch.no_grad():
        for got, want in zip(model.encode_text(ids, lengths, flat), model.encode_text(ids, lengths, graphs)):
            assert torch.equal(got, want)
        model.dependency_prior = True
        moved = (model.encode_text(ids, lengths, flat)[0] - model.encode_text(ids, lengths, graphs)[0]).abs().max()
    assert moved > 1e-6


# ============================================================================ SGFN

SGFN_WORDS = ["a", "the", "man", "dog", "cup", "red", "big", "on", "holding"]
SGFN_VOCAB = Vocabulary(SGFN_WORDS)
SGFN_DIMS = dict(img_dim=12, embed_size=16, word_dim=8, heads=2)


def _sgfn(seed: int = 0, **options) -> SGFN:
    torch.manual_seed(seed)
    model = SGFN(len(SGFN_VOCAB), **{**SGFN_DIMS, **options})
    model.set_vocabulary(SGFN_VOCAB)
    return model.eval()


def _sgfn_batches(seed: int = 1) -> tuple[ImageBatch, CaptionBatch]:
    g = torch.Generator().manual_seed(seed)
    image_graphs = [
        {"labels": ["man", "dog"], "bbox": [[0.0, 0.0, 1.0, 1.0]] * 2, "rels": [[0, "holding", 1]], "attrs": [[1, "big"]]},
        {"labels": ["cup"], "bbox": [[0.0, 0.0, 1.0, 1.0]], "rels": [], "attrs": [[0, "red"]]},
        {"labels": ["dog", "cup", "man"], "bbox": [[0.0, 0.0, 1.0, 1.0]] * 3, "rels": [[2, "on", 0]], "attrs": []},
    ]
    images = ImageBatch(torch.randn(3, 5, 12, generator=g) * 2, torch.arange(3), graphs=image_graphs)
    spec = [(7, [[0, 1, 3]], [[3, 2]]), (4, [], [[1, 0]]), (5, [], [])]
    lengths = torch.tensor([n for n, _, _ in spec])
    ids = torch.randint(4, len(SGFN_VOCAB), (3, 7), generator=g)
    ids[:, 0] = 1
    ids[torch.arange(3), lengths - 1] = 2
    ids[torch.arange(7) >= lengths[:, None]] = 0
    graphs = [{"tokens": ["w"] * (n - 2), "heads": [-1] * (n - 2),
               "objects": sorted({r[0] for r in rels} | {r[2] for r in rels} | {a[0] for a in attrs}),
               "attributes": attrs, "relations": rels} for n, rels, attrs in spec]
    return images, CaptionBatch(ids, lengths, torch.arange(3), torch.arange(3), graphs)


def test_sgfn_defaults():
    """README SGFN: ``cross_layers`` default 1; "the GRU biases start at zero"; "the relation and attribute layers start
    at 0.7% weight (alpha = 5, beta = 0)"."""
    model = _sgfn()
    assert len(model.cross) == 1
    biases = [p for name, p in model.text_encoder.rnn.named_parameters() if name.startswith("bias")]
    assert biases and all(not p.any() for p in biases)
    for fusion in (model.visual_fusion, model.text_fusion):
        w_alpha, w_beta = torch.softmax(fusion.layer_logits.detach(), 0).tolist()
        assert w_beta == pytest.approx(0.0067, abs=5e-4) and w_alpha == pytest.approx(1 - w_beta)


def test_sgfn_score_is_agent_cosine_plus_0_3_local_alignment():
    """README Models table: SGFN scores "agent cosine + 0.3 x local alignment" (``delta`` default 0.3)."""
    model = _sgfn()
    assert model.delta == pytest.approx(0.3)
    images, captions = _sgfn_batches()
    with torch.no_grad():
        encoded = model.encode_images(images), model.encode_captions(captions)
        default = model.similarity(*encoded)
        model.delta = 0.0
        glob = model.similarity(*encoded)
        model.delta = 1.0
        local = model.similarity(*encoded) - glob
    assert local.abs().max() > 1e-3
    torch.testing.assert_close(default, glob + 0.3 * local, rtol=1e-5, atol=1e-6)


def test_sgfn_fusion_ablations():
    """README SGFN: ``fusion="intra"`` is intra-modal fusion only (no cross-modal layer, whatever ``cross_layers``),
    ``fusion="cross"`` cross-modal fusion only (no graph fusion: the graphs are not read); ``cross_layers`` sets the
    number of cross-modal layers."""
    images, captions = _sgfn_batches()
    intra = _sgfn(fusion="intra", cross_layers=3)
    assert len(intra.cross) == 0
    cross = _sgfn(fusion="cross")
    assert len(cross.cross) == 1 and len(_sgfn(cross_layers=3).cross) == 3  # cross_layers sets the layer count
    with torch.no_grad():
        with_graphs = cross.encode_images(images), cross.encode_captions(captions)
        without = cross.encode_image(images.features, None), cross.encode_text(captions.ids, captions.lengths, None)
        torch.testing.assert_close(cross.similarity(*without), cross.similarity(*with_graphs), rtol=0, atol=0)
        assert torch.equal(with_graphs[0][0], cross.region_norm(cross.image_encoder(images.features)))  # F' = F


# ============================================================================ SGM

SGM_WORDS = ["a", "the", "man", "dog", "cup", "red", "on", "holding", "cat"]
SGM_VOCAB = Vocabulary(SGM_WORDS)


def _sgm_images(n_rels: int, seed: int = 1) -> ImageBatch:
    g = torch.Generator().manual_seed(seed)
    labels = ["man", "dog", "cup", "cat", "man", "dog"]
    pairs = [(s, o) for s in range(6) for o in range(6) if s != o][:n_rels]
    graphs = [{"labels": labels, "bbox": [[0.0, 0.0, 1.0, 1.0]] * 6, "rels": [[s, "on", o] for s, o in pairs], "attrs": []},
              {"labels": labels[:2], "bbox": [[0.0, 0.0, 1.0, 1.0]] * 2, "rels": [[0, "holding", 1]], "attrs": []}]
    return ImageBatch(torch.randn(2, 6, 12, generator=g), torch.arange(2), graphs=graphs,
                      relation_features=torch.randn(2, max(n_rels, 1), 12, generator=g))


def _sgm_captions(seed: int = 2) -> CaptionBatch:
    g = torch.Generator().manual_seed(seed)
    spec = [(7, [[0, 1, 3]]), (5, [])]
    ids = torch.zeros(2, 7, dtype=torch.long)
    for c, (n, _) in enumerate(spec):
        ids[c, :n] = torch.randint(4, len(SGM_VOCAB), (n,), generator=g)
    graphs = [{"tokens": ["w"] * (n - 2), "heads": [-1] * (n - 2), "objects": sorted({r[0] for r in rels} | {r[2] for r in rels}),
               "attributes": [], "relations": rels} for n, rels in spec]
    return CaptionBatch(ids, torch.tensor([n for n, _ in spec]), torch.arange(2), torch.arange(2), graphs)


def test_sgm_defaults_relation_weight_1_and_max_relations_25():
    """README SGM: ``S = S_o + lambda S_r`` with lambda = ``relation_weight`` = 1 by default; relation nodes padded to
    ``max_relations`` (25): 25 relations load, a 26th is a one-line error naming the image; one GCN layer."""
    torch.manual_seed(0)
    model = SGM(len(SGM_VOCAB), img_dim=12, embed_size=16, word_dim=8).eval()
    model.set_vocabulary(SGM_VOCAB)
    assert model.max_relations == 25 and model.relation_weight == 1.0 and len(model.visual.object_layers) == 1
    captions = _sgm_captions()
    with torch.no_grad():
        encoded = model.encode_images(_sgm_images(25)), model.encode_captions(captions)
        default = model.similarity(*encoded)
        model.relation_weight = 0.0
        s_o = model.similarity(*encoded)
        model.relation_weight = 2.0
        s_r = (model.similarity(*encoded) - s_o) / 2
        assert s_r.abs().max() > 1e-3
        torch.testing.assert_close(default, s_o + s_r, rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="image 0 has 26 relations, more than max_relations=25"):
            model.encode_images(_sgm_images(26))


def test_sgm_fusion_layer_keeps_the_paper_size():
    """README SGM: "The fusion layer keeps the paper's size (W_u: 2048 + 300 -> 2048)" at the default sizes."""
    model = SGM(len(SGM_VOCAB))
    assert tuple(model.visual.fusion.weight.shape) == (2048, 2048 + 300)


# ============================================================================ CMSEI

CMSEI_DIMS = dict(embed_size=8, word_dim=8, img_dim=12, num_regions=6)


def _cmsei_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(3, 6, 12, generator=g)
    corner = torch.rand(3, 6, 2, generator=g) * 0.4
    boxes = torch.cat([corner, corner + torch.rand(3, 6, 2, generator=g) * 0.4 + 0.2], dim=-1)
    rels = [[[0, "on", 1], [2, "near", 4]], [[5, "on", 3]], []]
    return features, boxes, rels


def test_cmsei_reads_only_the_rels_of_the_visual_graphs():
    """README CMSEI: reads "the visual scene graphs (``{split}_ims_graphs.json``, ``rels`` only)": graphs holding only
    ``rels`` encode as full graphs do, whatever their labels, boxes and attributes."""
    torch.manual_seed(0)
    model = build_model("cmsei", 30, dict(CMSEI_DIMS)).eval()
    features, boxes, rels = _cmsei_inputs()
    full = [{"labels": ["x"] * 6, "bbox": [[0.0, 0.0, 0.5, 0.5]] * 6, "attrs": [[0, "red"]], "rels": r} for r in rels]
    bare = [{"rels": r} for r in rels]
    with torch.no_grad():
        for got, want in zip(model.encode_image(features, boxes, bare), model.encode_image(features, boxes, full)):
            assert torch.equal(got, want)


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_cmsei_cpu_tiles_hold_16ki_fragments_and_at_least_one_pair(direction, monkeypatch):
    """README CMSEI memory bound: tiles hold at most ``chunk_fragments`` pair fragments (pair x region for i2t, pair x
    word for t2i), "at least one caption and one image", with "the CPU default of 16 Ki fragments"."""
    torch.manual_seed(0)
    model = build_model("cmsei", 30, dict(CMSEI_DIMS, direction=direction))
    tiles: list[tuple[int, int]] = []

    def fake_tile(tile_images, tile_captions):
        tiles.append((tile_images[0].shape[0], tile_captions[0].shape[0]))
        return torch.zeros(tile_captions[0].shape[0], tile_images[0].shape[0])

    monkeypatch.setattr(model, "_tile_scores", fake_tile)
    k, d, length = 6, 8, 6  # t2i: every caption 6 words long, so a fragment count of 6 per pair either way
    n_captions = (1 << 14) // 6 + 1
    images = (torch.zeros(1, k, d), torch.zeros(1, k, d), torch.zeros(1, d))
    captions = (torch.zeros(n_captions, length, d), torch.zeros(n_captions, length, d),
                torch.full((n_captions,), length), torch.zeros(n_captions, d))
    assert model.similarity(images, captions).shape == (1, n_captions)
    assert tiles == [(1, (1 << 14) // 6), (1, 1)]
    tiles.clear()
    two = tuple(torch.zeros(2, *t.shape[1:]) for t in images)
    assert model.similarity(two, tuple(t[:3] for t in captions), chunk_fragments=1).shape == (2, 3)
    assert tiles == [(1, 1)] * 6


# ============================================================================ recipes


@pytest.mark.parametrize("name, epochs, lr, decay, batch", [
    *[(f"mpsm_{data}_{p}", epochs, 2e-4, None, 128) for data, epochs in (("f30k", 30), ("coco", 20)) for p in ("dis", "dir")],
    ("sgfn_f30k", 30, 2e-4, 15, 64),
    ("sgfn_coco", 20, 5e-4, 10, None),
    *[(f"cmsei_{data}_{d}", 30, 2e-4, 15, 64) for data in ("f30k", "coco") for d in ("i2t", "t2i")],
    ("sgm_f30k", 30, 2e-4, 15, 128),
    ("sgm_coco", 30, 5e-4, 15, 128),
])
def test_recipes_are_those_the_readme_lists(name, epochs, lr, decay, batch):
    """README Models (MPSM and SGFN, CMSEI, SGM): the recipes' epochs, learning rate, decay epoch and batch size, and
    the model options the README names (MPSM's perspective, SGFN's full fusion with one cross layer, CMSEI's direction,
    mu 0.4 and 1024-d, SGM's embed 1024 / word 300 / one GCN layer / N_r 25 / lambda 1)."""
    recipe = _json(CONFIGS / f"{name}.json")
    train, model = recipe["train"], recipe["model_config"]
    assert train["epochs"] == epochs and train["lr"] == pytest.approx(lr)
    if decay is not None:
        assert train["lr_decay_epochs"] == decay and train["lr_decay_gamma"] == pytest.approx(0.1)
    if batch is not None:
        assert train["batch_size"] == batch
    if name.startswith("mpsm"):
        assert recipe["model"] == "mpsm" and model["perspective"] == {"dis": "distance", "dir": "direction"}[name[-3:]]
    elif name.startswith("sgfn"):
        assert recipe["model"] == "sgfn" and model.get("fusion", "full") == "full" and model.get("cross_layers", 1) == 1
    elif name.startswith("cmsei"):
        assert recipe["model"] == "cmsei" and model["direction"] == name[-3:]
        assert model["iou_threshold"] == pytest.approx(0.4) and model["embed_size"] == 1024
        assert train["margin"] == pytest.approx(0.2)
    else:
        assert recipe["model"] == "sgm"
        assert (model["embed_size"], model["word_dim"], model["gcn_layers"], model["max_relations"]) == (1024, 300, 1, 25)
        assert model.get("relation_weight", 1.0) == 1.0
        assert (train["grad_clip"], train["margin"], train["max_violation"]) == (2.0, 0.2, True)


def test_sgm_synthetic_recipe():
    """README SGM: ``sgm_synthetic`` (embed 256, 10 epochs, one warm-up epoch of summed hinges)."""
    recipe = _json(CONFIGS / "sgm_synthetic.json")
    assert recipe["model_config"]["embed_size"] == 256
    assert recipe["train"]["epochs"] == 10 and recipe["train"]["sum_warmup_epochs"] == 1


@pytest.mark.parametrize("name, epochs, decay", [
    ("sgraf_f30k_sgr", 40, 30), ("sgraf_f30k_saf", 30, 20), ("sgraf_coco_sgr", 20, 10), ("sgraf_coco_saf", 20, 10),
])
def test_sgraf_recipes_are_those_the_readme_lists(name, epochs, decay):
    """README Models, recipe table: epochs, lr 2e-4, decay x0.1 at the listed epoch; "all four use batch 128, margin
    0.2, max violation and gradient clip 2.0"; the module (SGR / SAF) is the one in the name."""
    recipe = _json(CONFIGS / f"{name}.json")
    train = recipe["train"]
    assert recipe["model"] == "sgraf" and recipe["model_config"]["module"] == name[-3:].upper()
    assert (train["epochs"], train["lr_decay_epochs"]) == (epochs, decay)
    assert train["lr"] == pytest.approx(2e-4) and train["lr_decay_gamma"] == pytest.approx(0.1)
    assert (train["batch_size"], train["margin"], train["max_violation"], train["grad_clip"]) == (128, 0.2, True, 2.0)


def test_models_table_needs_column():
    """README Models table, "needs": beyond features and captions, MPSM boxes and caption graphs, SGFN image and caption
    graphs, SGM image and caption graphs and (optional) relation features, CMSEI boxes and image graphs."""
    from sgfused.models import model_class

    needs = {"vsepp": set(), "sgraf": set(), "mpsm": {"boxes", "caption_graphs"}, "sgfn": {"image_graphs", "caption_graphs"},
             "sgm": {"image_graphs", "caption_graphs", "relation_features"}, "cmsei": {"boxes", "image_graphs"}}
    for name, parts in needs.items():
        assert set(model_class(name).data_requirements) == parts, name


def test_sgraf_shapes_at_the_default_sizes():
    """README Models example: ``encode_image`` (n_image, 36, 2048) -> (n_image, 36, 1024), ``encode_text`` (n_caption, L)
    -> (n_caption, L, 1024), ``similarity`` (n_image, n_caption) for all pairs."""
    torch.manual_seed(0)
    model = build_model("sgraf", 20, config={"module": "SAF"}).eval()
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, 36, 2048, generator=g)
    ids, lengths = torch.randint(4, 20, (3, 6), generator=g), torch.tensor([6, 4, 5])
    with torch.no_grad():
        regions, words = model.encode_image(features), model.encode_text(ids, lengths)
        assert regions.shape == (2, 36, 1024) and words.shape == (3, 6, 1024)
        assert model.similarity(regions, words, lengths).shape == (2, 3)
