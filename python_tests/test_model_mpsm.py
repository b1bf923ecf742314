"""MPSM model: fused = reference, knowledge-graph construction, padding, determinism, bad input, training.

Small dimensions throughout (embed 32, sim 16, word 16, img_dim 24, 7 regions,
vocab 50). Parameters are re-drawn with a larger spread than the published
initialisation and BatchNorm running statistics moved away from (0, 1), so
scores spread over (0, 1) and a wrong mask or a swapped weight shows.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from sgfused.data.batch import CaptionBatch, ImageBatch, PairBatch
from sgfused.models import build_model
from sgfused.models.mpsm import MPSM, PolarSpatialGraph, dependency_matrix, knowledge_edges
from conftest import assert_close, assert_gradients_close

DIMS = dict(embed_size=32, sim_dim=16, word_dim=16, img_dim=24, num_regions=7)
VOCAB = 50
LENGTHS = [9, 3, 5, 2, 7, 4]
N_IMAGE = 5


def random_graphs(lengths: list[int], seed: int) -> list[dict]:
    """A random dependency tree per caption: each token's head is an earlier token, token 0 the root."""
    g = torch.Generator().manual_seed(seed)
    graphs = []
    for length in lengths:
        n = length - 2
        heads = [-1 if t == 0 else int(torch.randint(0, t, (1,), generator=g)) for t in range(n)]
        graphs.append({"tokens": ["w"] * n, "heads": heads, "objects": [], "attributes": [], "relations": []})
    return graphs


def random_boxes(n: int, regions: int, g: torch.Generator) -> torch.Tensor:
    corner = torch.rand(n, regions, 2, generator=g) * 0.7
    size = torch.rand(n, regions, 2, generator=g) * 0.3 + 0.02
    return torch.cat([corner, corner + size], dim=-1)


def make_inputs(n_image: int = N_IMAGE, lengths: list[int] = LENGTHS, padded: int | None = None, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_image, DIMS["num_regions"], DIMS["img_dim"], generator=g)
    boxes = random_boxes(n_image, DIMS["num_regions"], g)
    lens = torch.tensor(lengths)
    ids = torch.randint(4, VOCAB, (len(lengths), padded or max(lengths)), generator=g)
    ids[torch.arange(ids.shape[1]) >= lens[:, None]] = 0
    return features, boxes, ids, lens, random_graphs(lengths, seed)


def encode(model: MPSM, features, boxes, ids, lens, graphs):
    return model.encode_image(features, boxes), model.encode_text(ids, lens, graphs)


def make_model(perspective: str, seed: int = 0, **options) -> MPSM:
    """Random weights (wider than the init), ``sim_eval_w`` calibrated so that scores spread over (0, 1)."""
    torch.manual_seed(seed)
    model = MPSM(VOCAB, perspective=perspective, **{**DIMS, **options})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "spatial_graph" in name:
                continue
            if "bn" in name or ".1." in name:  # BatchNorm affine
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0, 0.3)
            elif p.dim() > 1:
                p.normal_(0, 1.0 / math.sqrt(p.shape[-1]))
            else:
                p.normal_(0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.3)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
        raw = []
        for training in (False, True):  # calibrate on both modes: SRGR's BatchNorms differ between them
            trial = copy.deepcopy(model).train(training)
            scores = trial.similarity(*encode(trial, *make_inputs()))
            raw.append(torch.logit(scores.double()) - trial.srgr.sim_eval_w.bias.double())  # w . v of every pair
        raw = torch.cat(raw)
        eval_w = model.srgr.sim_eval_w
        gain = 2.0 / raw.std().item()
        eval_w.weight.mul_(gain)
        eval_w.bias.fill_(-gain * raw.mean().item())
    return model.train()


def pair_batch(n: int = 6, seed: int = 1) -> PairBatch:
    lengths = [(3 * i) % 8 + 2 for i in range(n)]
    features, boxes, ids, lens, graphs = make_inputs(n, lengths, seed=seed)
    index = torch.arange(n)
    return PairBatch(ImageBatch(features, index, boxes), CaptionBatch(ids, lens, index, index, graphs))


# ---------------------------------------------------------------------------- fused = reference
@pytest.mark.parametrize("perspective", ["distance", "direction"])
@pytest.mark.parametrize("training", [True, False])
def test_fused_equals_reference_scores_and_gradients(perspective, training):
    fused = make_model(perspective).train(training)
    reference = copy.deepcopy(fused)
    reference.reference = True
    batch = pair_batch()
    results = []
    for model in (fused, reference):
        torch.manual_seed(7)  # identical dropout masks
        scores = model.similarity(model.encode_images(batch.images), model.encode_captions(batch.captions))
        torch.manual_seed(7)
        model.zero_grad(set_to_none=True)
        model.loss(batch).backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        results.append((scores.detach(), grads, dict(model.named_buffers())))
    (got, got_grads, got_buffers), (want, want_grads, want_buffers) = results
    assert_close(got, want, 1e-5, "scores")
    assert got.std() > 0.03  # the scores spread, so the comparison means something
    assert all(g is not None for g in got_grads.values())  # every parameter takes part
    # 1e-4: KGID's softmaxes and Eq. 2's column normalisation (which divides by small column norms now that
    # the node itself is left out) amplify the ops' rounding in the encoder gradients; far below a
    # wrong-weight error (~1)
    assert_gradients_close(got_grads, want_grads, 1e-4)
    for name, b in want_buffers.items():
        assert torch.allclose(got_buffers[name].double(), b.double(), rtol=1e-6, atol=1e-7), name


def test_chunking_does_not_change_scores_or_statistics():
    model = make_model("distance").train()
    for layer in model.modules():
        if isinstance(layer, torch.nn.Dropout):
            layer.p = 0.0
    one_by_one = copy.deepcopy(model)
    inputs = make_inputs()
    whole = model.similarity(*encode(model, *inputs), chunk_nodes=1 << 30)
    split = one_by_one.similarity(*encode(one_by_one, *inputs), chunk_nodes=1)
    assert_close(split, whole, 1e-5)
    for (name, got), want in zip(one_by_one.named_buffers(), model.buffers()):
        assert torch.allclose(got.double(), want.double(), rtol=1e-5, atol=1e-7), name


# ---------------------------------------------------------------------------- graph construction
def test_spatial_weight_falls_with_distance_and_follows_direction():
    graph = PolarSpatialGraph(kernels=8)
    centre = [0.45, 0.45, 0.55, 0.55]

    def weight(dx: float, dy: float) -> float:
        other = [centre[0] + dx, centre[1] + dy, centre[2] + dx, centre[3] + dy]
        with torch.no_grad():
            return graph(torch.tensor([[centre, other]]))[0, 0, 1].item()

    near, mid, far = weight(0.1, 0.0), weight(0.3, 0.0), weight(0.6, 0.0)
    assert 1.0 > near > mid > far > 0.0  # initialisation: falloff with distance
    assert weight(0.0, 0.3) == pytest.approx(mid, rel=0.05)  # ... nearly isotropic
    with torch.no_grad():
        graph.mixture.copy_(torch.tensor([20.0] + [0.0] * 7))  # only kernel 0, pointing right (angle 0)
        graph.angle_log_concentration.fill_(math.log(2.0))
    right, left, below = weight(0.3, 0.0), weight(-0.3, 0.0), weight(0.0, 0.3)
    assert right > below > left
    assert right / left == pytest.approx(math.exp(2.0 * 2), rel=1e-3)  # exp(kappa (cos 0 - cos pi))
    boxes = torch.tensor([[centre, centre, [0.0, 0.0, 0.2, 0.2]]])
    with torch.no_grad():
        p = graph(boxes)[0]
    assert torch.equal(p.diagonal(), torch.ones(3))
    assert torch.isfinite(p).all() and 0.0 < p[0, 1] < 1.0  # coincident centres: no direction, finite weight


def test_dependency_matrix_arcs_are_symmetric_with_self_loops():
    graphs = [{"heads": [1, -1, 1]}, {"heads": [-1]}]  # "a dog runs": a -> dog <- runs
    lens = torch.tensor([5, 3])
    p = dependency_matrix(graphs, lens, 6)
    want = torch.zeros(2, 6, 6)
    for b, length in enumerate(lens.tolist()):
        want[b, range(length), range(length)] = 1.0
    for token, head in ((0, 1), (2, 1)):  # token p is node p + 1
        want[0, token + 1, head + 1] = want[0, head + 1, token + 1] = 1.0
    assert torch.equal(p, want)
    assert torch.equal(p, p.transpose(1, 2))


def test_knowledge_edges_are_column_normalised_and_ignore_padding():
    g = torch.Generator().manual_seed(0)
    nodes = torch.nn.functional.normalize(torch.randn(2, 5, 8, generator=g), dim=-1)
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    prior = torch.rand(2, 5, 5, generator=g) * (valid[:, :, None] & valid[:, None, :])
    edges = knowledge_edges(nodes, prior, valid, 9.0)
    norms = torch.linalg.vector_norm(edges, dim=1)
    # a column of small weights (the node itself is left out) normalises to 1 - 1e-8 / its norm
    assert torch.allclose(norms[0], torch.ones(5), atol=1e-4)
    assert torch.allclose(norms[1, :3], torch.ones(3), atol=1e-4) and torch.equal(norms[1, 3:], torch.zeros(2))
    assert (edges.diagonal(dim1=1, dim2=2) == 0).all()  # every node has another valid node: no self loop
    lonely = knowledge_edges(nodes[:, :1], prior[:, :1, :1] + 1, valid[:, :1], 9.0)
    assert torch.allclose(lonely, torch.ones(2, 1, 1))  # a node alone keeps its self loop
    changed = nodes.clone()
    changed[1, 3:] = 100.0
    assert torch.equal(knowledge_edges(changed, prior, valid, 9.0)[1, :3, :3], edges[1, :3, :3])


def test_caption_graph_reaches_the_scores():
    """Changing one dependency arc changes that caption's scores only."""
    model = make_model("distance").eval()
    features, boxes, ids, lens, graphs = make_inputs()
    want = model.similarity(*encode(model, features, boxes, ids, lens, graphs))
    changed = copy.deepcopy(graphs)
    changed[0]["heads"][-1] = 0 if changed[0]["heads"][-1] != 0 else 1
    got = model.similarity(*encode(model, features, boxes, ids, lens, changed))
    assert (got[:, 0] - want[:, 0]).abs().max() > 1e-4  # one arc of one caption: 4e-4 here; rounding ~1e-7
    assert torch.equal(got[:, 1:], want[:, 1:])


@pytest.mark.parametrize("perspective", ["distance", "direction"])
def test_graphs_move_the_scores_at_initialisation(perspective):
    """Issue 20: with the published initialisation, replacing ``P_v`` by all ones moved scores by <= 9e-8 and
    removing every dependency arc by <= 7e-6, against a spread of 9e-3 (``E`` was nearly the identity and
    Eq. 5's softmax uniform). Measured here over seeds 0-4 and both perspectives (max |change| / std of the
    scores): spatial graph 0.017-0.040, dependency arcs 0.015-0.10; before the fix ~1e-4."""
    torch.manual_seed(0)
    model = MPSM(VOCAB, perspective=perspective, **DIMS).eval()
    inputs = make_inputs()
    with torch.no_grad():
        want = model.similarity(*encode(model, *inputs))
        for switch in ("spatial_prior", "dependency_prior"):
            setattr(model, switch, False)
            got = model.similarity(*encode(model, *inputs))
            setattr(model, switch, True)
            moved = (got - want).abs().max() / want.std()
            assert moved > 0.008, f"{switch}=False moves the scores by only {moved:.3g} of their spread"


@pytest.mark.parametrize("perspective", ["distance", "direction"])
def test_kgid_logit_scale_multiplies_eq5_logits_and_moves_scores_more(perspective):
    """``kgid_logit_scale`` is a multiplier of Eq. 5's logits: a model with scale s equals the model with scale 1
    (Eq. 5 as printed) whose ``propagate`` weights (the logits' only source) are multiplied by s; with the default,
    the paper's lambda, the graphs move the scores more at initialisation than as printed (``P_v`` -> all ones:
    0.48 vs 0.027 of the scores' spread for distance, 0.17 vs 0.017 for direction, seed 0)."""
    torch.manual_seed(0)
    scaled = MPSM(VOCAB, perspective=perspective, **DIMS).eval()
    assert all(layer.logit_scale == 9.0 for layer in scaled.visual_kgid.layers)  # the default is lambda
    plain = MPSM(VOCAB, perspective=perspective, kgid_logit_scale=1.0, **DIMS).eval()
    plain.load_state_dict(scaled.state_dict())
    with torch.no_grad():
        for kgid in (plain.visual_kgid, plain.textual_kgid):
            for layer in kgid.layers:
                layer.propagate.weight.mul_(9.0)
    inputs = make_inputs()
    with torch.no_grad():
        want = plain.similarity(*encode(plain, *inputs))
        assert_close(scaled.similarity(*encode(scaled, *inputs)), want, 1e-5, "scale 9 vs weights x 9")
        moved = {}
        printed = MPSM(VOCAB, perspective=perspective, kgid_logit_scale=1.0, **DIMS).eval()
        for name, model in (("scaled", scaled), ("printed", printed)):
            model.load_state_dict(scaled.state_dict())
            full = model.similarity(*encode(model, *inputs))
            model.spatial_prior = False
            moved[name] = ((model.similarity(*encode(model, *inputs)) - full).abs().max() / full.std()).item()
    assert moved["scaled"] > 8 * moved["printed"], moved  # 17.7x and 10.1x here


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "9"])
def test_kgid_logit_scale_must_be_a_positive_number(bad):
    with pytest.raises(ValueError, match=r"kgid_logit_scale must be a finite number > 0, got"):
        MPSM(VOCAB, **DIMS, kgid_logit_scale=bad)


def test_weights_of_the_earlier_graph_reading_are_refused():
    model = make_model("distance")
    state = model.state_dict()
    assert state._metadata[""]["version"] == 3
    MPSM(VOCAB, perspective="distance", **DIMS).load_state_dict(state)  # the current version loads
    state._metadata[""]["version"] = 2
    MPSM(VOCAB, perspective="distance", **DIMS).load_state_dict(state)  # so does version 2 (same graph reading)
    state._metadata[""]["version"] = 1
    with pytest.raises(ValueError, match="MPSM state dict is version 1, the oldest this code can use is version 2 .* "
                                         "retrain"):
        MPSM(VOCAB, perspective="distance", **DIMS).load_state_dict(state)


@pytest.mark.parametrize("version, config, expected", [
    (2, {}, 1.0),  # written when the default was Eq. 5 as printed: rebuilt as it was trained
    (2, {"kgid_logit_scale": 9.0}, 9.0),  # set explicitly: kept
    (2, {"kgid_logit_scale": 3.0}, 3.0),
    (3, {}, 9.0),  # the current default
    (None, {}, 9.0),  # a plain dict without metadata is taken as current
])
def test_checkpoints_score_with_the_kgid_logit_scale_they_were_trained_with(version, config, expected):
    """Checkpoints store the options as given; one of version 2 that left ``kgid_logit_scale`` out was trained
    with the default of the time, 1, and must not silently get today's default (its scores would change)."""
    from sgfused.checkpoint import model_from_checkpoint
    from sgfused.data.vocab import Vocabulary

    vocab = Vocabulary([f"w{i}" for i in range(VOCAB)])
    dims = {**DIMS, "perspective": "direction"}
    torch.manual_seed(0)
    trained = MPSM(len(vocab), **dims, kgid_logit_scale=expected).eval()
    state = trained.state_dict()
    if version is None:
        state = dict(state)
    else:
        state._metadata[""]["version"] = version
    checkpoint = {"model_name": "mpsm", "model_config": {**dims, **config}, "vocab": vocab.to_dict(), "model": state}
    loaded, _ = model_from_checkpoint(checkpoint)
    scales = [layer.logit_scale for kgid in (loaded.visual_kgid, loaded.textual_kgid) for layer in kgid.layers]
    assert scales and set(scales) == {expected}
    inputs = make_inputs()
    with torch.no_grad():
        assert torch.equal(loaded.similarity(*encode(loaded, *inputs)), trained.similarity(*encode(trained, *inputs)))


# ---------------------------------------------------------------------------- padding, batching, determinism
@pytest.mark.parametrize("perspective", ["distance", "direction"])
def test_padding_never_changes_scores(perspective):
    model = make_model(perspective).eval()
    features, boxes, ids, lens, graphs = make_inputs()
    images = model.encode_image(features, boxes)
    want = model.similarity(images, model.encode_text(ids, lens, graphs))
    long_ids = make_inputs(padded=max(LENGTHS) + 4)[2]
    long_ids[:, : ids.shape[1]] = ids
    long_ids[torch.arange(long_ids.shape[1]) >= lens[:, None]] = 7  # any id in the padding
    words, _, glob = model.encode_text(long_ids, lens, graphs)
    assert_close(model.similarity(images, (words, lens, glob)), want, 1e-5, "padded ids")
    assert (words[torch.arange(words.shape[1]) >= lens[:, None]] == 0).all()  # zero past each length
    nan_words = words.clone()
    nan_words[torch.arange(words.shape[1]) >= lens[:, None]] = float("nan")
    assert_close(model.similarity(images, (nan_words, lens, glob)), want, 1e-5, "padded values")


def test_encodings_do_not_depend_on_the_rest_of_the_batch():
    """In evaluation an image's (and a caption's) encoding is its own: regions of other images never enter it."""
    model = make_model("direction").eval()
    features, boxes, ids, lens, graphs = make_inputs()
    regions, glob = model.encode_image(features, boxes)
    alone = model.encode_image(features[2:3], boxes[2:3])
    # 1e-5: batched and single matrix products round differently, and KGID amplifies it (see above)
    assert_close(alone[0], regions[2:3], 1e-5)
    assert_close(alone[1], glob[2:3], 1e-5)
    words, _, cap_glo = model.encode_text(ids, lens, graphs)
    one = model.encode_text(ids[1:2, : lens[1]], lens[1:2], graphs[1:2])
    assert_close(one[0], words[1:2, : lens[1]], 1e-5)
    assert_close(one[2], cap_glo[1:2], 1e-5)


def test_eval_mode_is_deterministic():
    model = make_model("distance").eval()
    inputs = make_inputs()
    first = model.similarity(*encode(model, *inputs))
    second = model.similarity(*encode(model, *inputs))
    assert torch.equal(first, second)


# ---------------------------------------------------------------------------- configuration and bad input
def test_build_by_name_and_data_requirements():
    model = build_model("mpsm", VOCAB, {"perspective": "direction", **DIMS})
    assert isinstance(model, MPSM) and model.perspective == "direction"
    assert MPSM.data_requirements == ("boxes", "caption_graphs")
    assert set(MPSM.config_keys()) >= {"perspective", "embed_size", "word_dim", "sim_dim", "kgid_layers",
                                       "lambda_softmax", "margin", "img_dim", "num_regions", "reference"}
    assert len(model.visual_kgid.layers) == 3 and len(model.visual_kgid.edge_updates) == 2


def test_bad_inputs():
    with pytest.raises(ValueError, match="perspective must be one of"):
        MPSM(VOCAB, perspective="angle", **DIMS)
    with pytest.raises(ValueError, match="kgid_layers must be >= 0"):
        MPSM(VOCAB, kgid_layers=-1, **DIMS)
    model = make_model("distance").eval()
    features, boxes, ids, lens, graphs = make_inputs()
    with pytest.raises(ValueError, match="num_regions = 7"):
        model.encode_image(features[:, :-1], boxes[:, :-1])
    with pytest.raises(ValueError, match="boxes must be"):
        model.encode_image(features, boxes[..., :2])
    with pytest.raises(ValueError, match="boxes must be finite"):
        model.encode_image(features, boxes.masked_fill(boxes > 0.5, float("nan")))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 50\)"):
        model.encode_text(ids + VOCAB, lens, graphs)
    with pytest.raises(ValueError, match="lengths must lie in"):
        model.encode_text(ids, lens * 0, graphs)
    with pytest.raises(ValueError, match="one caption graph per caption"):
        model.encode_text(ids, lens, graphs[:-1])
    with pytest.raises(ValueError, match="caption graph 1: expected .* 'heads' has one entry per token"):
        model.encode_text(ids, lens, [graphs[0], {"heads": [-1] * 5}, *graphs[2:]])
    with pytest.raises(ValueError, match="caption graph 0: head 9 of token 1"):
        model.encode_text(ids, lens, [{"heads": [-1, 9] + [0] * 5}, *graphs[1:]])
    with pytest.raises(ValueError, match="dependency matrix must be"):
        model.encode_text(ids, lens, torch.zeros(6, 3, 3))
    index = torch.arange(len(LENGTHS))
    with pytest.raises(ValueError, match="boxes=True"):
        model.encode_images(ImageBatch(features, index[:N_IMAGE]))
    with pytest.raises(ValueError, match="caption_graphs=True"):
        model.encode_captions(CaptionBatch(ids, lens, index, index))
    images, captions = encode(model, features, boxes, ids, lens, graphs)
    with pytest.raises(TypeError, match="images must be the"):
        model.similarity(images[0], captions)
    with pytest.raises(ValueError, match="image encoding must be"):
        model.similarity((images[0][..., :-1], images[1]), captions)
    with pytest.raises(TypeError, match="captions must be the"):
        model.similarity(images, captions[:2])
    with pytest.raises(ValueError, match="lengths must lie in"):
        model.similarity(images, (captions[0], captions[1] + 1, captions[2]))


# ---------------------------------------------------------------------------- training
def test_learns_on_synthetic_scenes(tmp_path):
    """A short run on 200 synthetic scenes raises test rSum clearly above the untrained model's."""
    from sgfused.data.precomp import PrecompSplit
    from sgfused.data.synthetic import generate
    from sgfused.data.vocab import Vocabulary
    from sgfused.evaluate import evaluate_model
    from sgfused.train import TrainConfig, Trainer

    root = tmp_path / "data"
    generate(root, 200, 3, feature_dim=32, progress=False)
    vocab = Vocabulary.load(root / "vocab.json")
    train, test = (PrecompSplit(root, s, vocab, boxes=True, caption_graphs=True) for s in ("train", "test"))
    config = dict(embed_size=64, sim_dim=16, word_dim=16, img_dim=32, num_regions=train.features.shape[1])
    torch.manual_seed(0)
    model = build_model("mpsm", len(vocab), config)
    before = evaluate_model(model, test, progress=False)[0]["full"]["rsum"]
    options = TrainConfig(epochs=4, lr=2e-3, lr_decay_epochs=10, batch_size=32, device="cpu")
    Trainer(model, train, test, vocab, options, tmp_path / "run", progress=False).fit()
    after = evaluate_model(model, test, progress=False)[0]["full"]["rsum"]
    # measured here (seed 0, 2 threads): 115 -> 146 with Eq. 5's logits x lambda (the default since state-dict
    # version 3); at embed 32 that model starts at 141 and ends at 138 (as printed: 105 -> 140), so the test
    # runs at embed 64. VSE++ gains > 60 in the same setting; the SGRAF family learns more slowly on
    # synthetic scenes (see the issue notes); an untrained or collapsed model stays at or below `before`
    assert after > before + 15, (before, after)


def test_resuming_a_version_2_run_with_the_new_default_is_refused_and_with_scale_1_continues(tmp_path):
    """A last.pt of state-dict version 2 that left ``kgid_logit_scale`` out was trained with 1: resuming it under
    today's default (9) would change the model half-way, so it is refused in one line naming the option."""
    from sgfused.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from sgfused.data.precomp import PrecompSplit
    from sgfused.data.synthetic import generate
    from sgfused.data.vocab import Vocabulary
    from sgfused.train import TrainConfig, Trainer

    root = tmp_path / "data"
    generate(root, 40, 3, feature_dim=16, progress=False)
    vocab = Vocabulary.load(root / "vocab.json")
    train, dev = (PrecompSplit(root, s, vocab, boxes=True, caption_graphs=True) for s in ("train", "dev"))
    config = dict(embed_size=16, sim_dim=8, word_dim=8, img_dim=16, num_regions=train.features.shape[1])

    def trainer(**options) -> Trainer:
        torch.manual_seed(0)
        model = build_model("mpsm", len(vocab), {**config, **options})
        return Trainer(model, train, dev, vocab, TrainConfig(epochs=2, batch_size=16, checkpoint_every=1),
                       tmp_path / "run", progress=False)

    trainer(kgid_logit_scale=1.0).fit(stop_after_steps=1)
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    del state["model_config"]["kgid_logit_scale"]  # as a version-2 run with the default of the time wrote it
    state["model"]._metadata[""]["version"] = 2
    save_checkpoint(tmp_path / "run" / "last.pt", state)
    with pytest.raises(CheckpointError, match="model option kgid_logit_scale was 1.0, now 9.0"):
        trainer().fit()
    trainer(kgid_logit_scale=1.0).fit()  # the scale it was trained with: resumes
