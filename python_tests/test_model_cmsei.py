"""CMSEI model: fused = reference, the IoU spatial graph, the relation graph, tiling, padding, bad input, BERT, training.

Small dimensions throughout (embed 32, word 16, img_dim 24, 7 regions, vocab 50).
The BERT tests build a tiny random BERT and word-piece vocabulary in a temporary
folder (nothing is fetched); they skip where transformers is not installed
(scripts/test.sh installs it).
"""

from __future__ import annotations

import pytest
import torch

from sgfused.data.batch import CaptionBatch, ImageBatch, PairBatch
from sgfused.data.vocab import Vocabulary
from sgfused.models import available_models, build_model
from sgfused.models.cmsei import CMSEI, BERT_LR_SCALE, SpatialGraphConv, box_iou, relation_adjacency
from conftest import assert_close, assert_gradients_close

DIMS = dict(embed_size=32, word_dim=16, img_dim=24, num_regions=7)
VOCAB = 50
LENGTHS = [9, 3, 5, 2, 7, 4]
N_IMAGE = 5
DIRECTIONS = ("i2t", "t2i")


def random_boxes(n: int, regions: int, g: torch.Generator) -> torch.Tensor:
    """Boxes big enough that some pairs overlap above the IoU threshold and some below."""
    corner = torch.rand(n, regions, 2, generator=g) * 0.4
    size = torch.rand(n, regions, 2, generator=g) * 0.4 + 0.2
    return torch.cat([corner, corner + size], dim=-1)


def random_graphs(n: int, regions: int, g: torch.Generator) -> list[dict]:
    graphs = []
    for _ in range(n):
        pairs = torch.randint(0, regions, (3, 2), generator=g).tolist()
        graphs.append({"labels": ["x"] * regions, "bbox": [], "attrs": [],
                       "rels": [[s, "near", o] for s, o in pairs if s != o]})
    return graphs


def make_inputs(n_image: int = N_IMAGE, lengths: list[int] = LENGTHS, padded: int | None = None, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_image, DIMS["num_regions"], DIMS["img_dim"], generator=g)
    boxes = random_boxes(n_image, DIMS["num_regions"], g)
    graphs = random_graphs(n_image, DIMS["num_regions"], g)
    lens = torch.tensor(lengths)
    ids = torch.randint(4, VOCAB, (len(lengths), padded or max(lengths)), generator=g)
    ids[torch.arange(ids.shape[1]) >= lens[:, None]] = 0
    return features, boxes, graphs, ids, lens


def make_model(direction: str, seed: int = 0, **options) -> CMSEI:
    torch.manual_seed(seed)
    return build_model("cmsei", VOCAB, dict(DIMS, direction=direction, **options))


def scores_of(model: CMSEI, inputs, **similarity_options) -> torch.Tensor:
    features, boxes, graphs, ids, lens = inputs
    return model.similarity(model.encode_image(features, boxes, graphs), model.encode_text(ids, lens),
                            **similarity_options)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_fused_equals_reference_scores_and_gradients(direction):
    fused = make_model(direction)
    reference = make_model(direction, reference=True)
    reference.load_state_dict(fused.state_dict())
    inputs = make_inputs()
    weights = torch.randn(N_IMAGE, len(LENGTHS), generator=torch.Generator().manual_seed(5))
    results = []
    for model in (fused, reference):
        scores = scores_of(model, inputs)
        (scores * weights).sum().backward()
        results.append((scores.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert results[0][0].shape == (N_IMAGE, len(LENGTHS))
    assert results[0][0].std() > 1e-3  # the scores are spread: a wrong pairing would show
    assert_close(results[0][0], results[1][0], 1e-5, "scores")
    assert_gradients_close(results[0][1], results[1][1], 1e-4)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_tiling_does_not_change_scores(direction):
    model = make_model(direction).eval()
    inputs = make_inputs()
    with torch.no_grad():
        whole = scores_of(model, inputs)
        for fragments in (1, 20, 60):  # one image x one caption per tile, then a few of each
            assert_close(scores_of(model, inputs, chunk_fragments=fragments), whole, 1e-5, f"tiles of {fragments}")


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_padding_never_changes_scores(direction):
    model = make_model(direction).eval()
    tight = make_inputs()
    ids, lens = tight[3], tight[4]
    wide = torch.full((len(LENGTHS), max(LENGTHS) + 4), 7)  # garbage past every length must not matter
    wide[:, : max(LENGTHS)] = ids.masked_fill(torch.arange(ids.shape[1]) >= lens[:, None], 7)
    padded = (*tight[:3], wide, lens)
    with torch.no_grad():
        assert_close(scores_of(model, padded), scores_of(model, tight), 1e-5, "padded captions")


def test_encodings_do_not_depend_on_the_rest_of_the_batch():
    model = make_model("i2t").eval()
    features, boxes, graphs, ids, lens = make_inputs()
    with torch.no_grad():
        images, captions = model.encode_image(features, boxes, graphs), model.encode_text(ids, lens)
        one_image = model.encode_image(features[2:3], boxes[2:3], graphs[2:3])
        one_caption = model.encode_text(ids[1:2, : LENGTHS[1]], lens[1:2])
    for got, want in zip(one_image, images):
        assert_close(got[0], want[2], 1e-5, "image encoding")
    assert_close(one_caption[0][0], captions[0][1, : LENGTHS[1]], 1e-5, "caption encoding")


# ---------------------------------------------------------------------------- graphs
def test_box_iou_of_hand_made_boxes():
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.25, 0.0, 0.75, 0.5], [0.6, 0.6, 1.0, 1.0]]])
    iou = box_iou(boxes)[0]
    assert torch.allclose(iou.diagonal(), torch.ones(3))
    assert torch.allclose(iou[0, 1], torch.tensor(0.125 / 0.375)) and torch.allclose(iou[1, 0], iou[0, 1])
    assert iou[0, 2] == 0 and iou[1, 2] == 0


def test_iou_threshold_decides_the_spatial_edge():
    """IoU(0, 1) = 0.5, IoU(0, 2) = 1/3, IoU(1, 2) = 5/7: each threshold keeps exactly the pairs above it."""
    boxes = torch.tensor([[[0.0, 0.0, 0.6, 0.5], [0.2, 0.0, 0.8, 0.5], [0.3, 0.0, 0.9, 0.5]]])
    iou = box_iou(boxes)[0]
    assert torch.allclose(iou[0, 1], torch.tensor(0.5)) and torch.allclose(iou[0, 2], torch.tensor(1 / 3))
    assert torch.allclose(iou[1, 2], torch.tensor(5 / 7))
    torch.manual_seed(0)
    regions = torch.randn(1, 3, 8)
    for mu, kept in ((0.4, {(0, 1), (1, 0), (1, 2), (2, 1)}), (0.6, {(1, 2), (2, 1)}), (0.75, set())):
        graph = SpatialGraphConv(8, mu)
        adjacency = graph.adjacency(regions, boxes)[0]
        similarity = graph.edges.phi(regions[0]) @ graph.edges.varphi(regions[0]).t() / 3  # Eq. 1 over 3 nodes
        for i in range(3):
            for j in range(3):
                want = similarity[i, j] if i == j or (i, j) in kept else torch.tensor(0.0)
                assert torch.allclose(adjacency[i, j], want), (mu, i, j)


def test_relation_adjacency_is_symmetric_and_reaches_only_related_regions():
    graphs = [{"rels": [[0, "wears", 1], [1, "on", 3]]}, {"rels": []}]
    adjacency = relation_adjacency(graphs, 5, torch.device("cpu"))
    want = torch.zeros(2, 5, 5)
    want[0, [0, 1, 1, 3], [1, 0, 3, 1]] = 1
    assert torch.equal(adjacency, want)

    model = make_model("i2t").eval()
    features, boxes, _, _, _ = make_inputs(n_image=1)
    none = [{"rels": []}]
    related = [{"rels": [[0, "wears", 1]]}]
    with torch.no_grad():
        plain, regions, _ = model.encode_image(features, boxes, none)
        spatial = model.spatial_gcn(regions, boxes)
        assert_close(plain, model.relation_gcn.out(spatial) + regions, 1e-6, "no relations: Eq. 2 without A^v")
        with_edge = model.encode_image(features, boxes, related)[0]
    moved = (with_edge - plain).abs().amax(-1)[0]
    assert moved[:2].min() > 1e-4 and moved[2:].max() == 0  # only the two related regions change


# ---------------------------------------------------------------------------- checks
def test_build_by_name_and_data_requirements():
    assert "cmsei" in available_models()
    model = build_model("cmsei", VOCAB, dict(DIMS, direction="t2i"))
    assert isinstance(model, CMSEI) and model.direction == "t2i"
    assert set(model.data_requirements) == {"boxes", "image_graphs"}
    groups = model.parameter_groups(1e-3)
    assert len(groups) == 1 and len(groups[0]["params"]) == len(list(model.parameters()))


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_bad_inputs():
    model = make_model("i2t")
    features, boxes, graphs, ids, lens = make_inputs()
    index = torch.arange(N_IMAGE)
    with pytest.raises(ValueError) as e:
        model.encode_images(ImageBatch(features, index, boxes=None, graphs=graphs))
    assert "boxes=True" in _one_line(e)
    with pytest.raises(ValueError) as e:
        model.encode_images(ImageBatch(features, index, boxes=boxes, graphs=None))
    assert "image_graphs=True" in _one_line(e)
    with pytest.raises(ValueError) as e:
        model.encode_image(features, boxes, graphs[:2])
    assert "one image graph per image" in _one_line(e)
    with pytest.raises(ValueError) as e:
        model.encode_image(features, boxes, [{"rels": [[0, "on", 9]]}] * N_IMAGE)
    assert "[0, 7)" in _one_line(e)
    with pytest.raises(ValueError) as e:
        model.encode_image(features, boxes[:, :, :3], graphs)
    assert "boxes must be" in _one_line(e)
    with pytest.raises(ValueError) as e:
        build_model("cmsei", VOCAB, dict(DIMS, direction="both"))
    assert "direction" in _one_line(e)
    with pytest.raises(ValueError) as e:
        build_model("cmsei", VOCAB, dict(DIMS, text_encoder="bert"))
    assert "bert_path" in _one_line(e)
    with pytest.raises(FileNotFoundError) as e:
        build_model("cmsei", VOCAB, dict(DIMS, text_encoder="bert", bert_path="/nonexistent/bert-folder"))
    assert "/nonexistent/bert-folder" in _one_line(e)
    encodings = model.encode_image(features, boxes, graphs)
    with pytest.raises(TypeError) as e:
        model.similarity(encodings[:2], model.encode_text(ids, lens))
    _one_line(e)


# ---------------------------------------------------------------------------- BERT
WORDS = ["a", "man", "wears", "glasses", "dog", "on", "grass", "red"]
PIECES = ["a", "man", "wear", "##s", "glass", "##es", "dog", "on", "grass"]  # "red" is unknown to BERT


@pytest.fixture
def bert_folder(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the BERT text encoder needs transformers (sgfused[bert])")
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *PIECES]) + "\n")
    tokenizer = transformers.BertTokenizerFast(str(folder / "vocab.txt"))
    tokenizer.save_pretrained(folder)
    torch.manual_seed(3)
    config = transformers.BertConfig(vocab_size=len(PIECES) + 5, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def test_word_pieces_stay_aligned_to_words(bert_folder):
    from sgfused.data.wordpiece import WordPieceTable, load_bert

    _, tokenizer = load_bert(bert_folder)
    vocab = Vocabulary(WORDS)
    table = WordPieceTable(vocab, tokenizer)
    ids = torch.tensor([vocab.encode(["a", "man", "wears", "red", "glasses"]), vocab.encode(["dog", "on", "grass", "a", "a"])])
    ids[1, 5:] = 0
    lengths = torch.tensor([7, 5])
    pieces = table.pieces(ids, lengths)
    names = tokenizer.convert_ids_to_tokens(pieces.ids[0].tolist())
    assert names == ["[CLS]", "a", "man", "wear", "##s", "[UNK]", "glass", "##es", "[SEP]"]
    assert pieces.word[0].tolist() == [0, 1, 2, 3, 3, 4, 5, 5, 6]
    assert pieces.mask[1].tolist() == [1] * 5 + [0] * 4 and pieces.word[1, 5:].eq(-1).all()
    hidden = torch.randn(2, pieces.ids.shape[1], 4)
    pooled = pieces.pool(hidden, 7)
    assert_close(pooled[0, 3], hidden[0, 3:5].mean(0), 1e-6, "a two-piece word is the mean of its pieces")
    assert_close(pooled[0, 6], hidden[0, 8], 1e-6, "<end> is [SEP]")
    assert pooled[1, 5:].abs().max() == 0  # padded word positions


def test_bert_encoder_trains_at_a_tenth_of_the_learning_rate(bert_folder):
    vocab = Vocabulary(WORDS)
    torch.manual_seed(0)
    model = build_model("cmsei", len(vocab), dict(DIMS, text_encoder="bert", bert_path=str(bert_folder)))
    with pytest.raises(RuntimeError) as e:
        model.encode_text(torch.tensor([[1, 4, 2]]), torch.tensor([3]))
    assert "set_vocabulary" in _one_line(e)
    model.set_vocabulary(vocab)
    groups = model.parameter_groups(1e-3)
    bert = {id(p) for p in model.text_encoder.bert.parameters()}
    assert [g["lr"] for g in groups] == [1e-3, BERT_LR_SCALE * 1e-3]
    assert {id(p) for p in groups[1]["params"]} == bert and not bert & {id(p) for p in groups[0]["params"]}
    g = torch.Generator().manual_seed(2)
    features = torch.randn(4, DIMS["num_regions"], DIMS["img_dim"], generator=g)
    boxes, graphs = random_boxes(4, DIMS["num_regions"], g), random_graphs(4, DIMS["num_regions"], g)
    captions = [["a", "man", "wears", "glasses"], ["dog", "on", "grass"], ["red", "dog"], ["a", "man", "on", "grass"]]
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(vocab.encode(c)) for c in captions], batch_first=True)
    lengths = torch.tensor([len(c) + 2 for c in captions])
    index = torch.arange(4)
    batch = PairBatch(ImageBatch(features, index, boxes=boxes, graphs=graphs),
                      CaptionBatch(ids, lengths, index, index))
    before = {n: p.detach().clone() for n, p in model.text_encoder.bert.named_parameters()}
    optimizer = torch.optim.Adam(groups, lr=1e-3)
    model.margin, model.max_violation = 0.5, False
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    moved = max((p.detach() - before[n]).abs().max().item() for n, p in model.text_encoder.bert.named_parameters())
    assert 0 < moved <= 6 * BERT_LR_SCALE * 1e-3 * 1.01  # Adam steps of at most the group's lr each


def test_bert_folder_without_a_model_is_a_one_line_error(tmp_path):
    pytest.importorskip("transformers", reason="the BERT text encoder needs transformers (sgfused[bert])")
    empty = tmp_path / "empty-bert"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        build_model("cmsei", VOCAB, dict(DIMS, text_encoder="bert", bert_path=str(empty)))
    assert str(empty) in _one_line(e)


# ---------------------------------------------------------------------------- training
def test_learns_on_synthetic_scenes(tmp_path):
    """Four short epochs on 200 synthetic scenes (10 regions) raise test rSum clearly above the untrained model's."""
    from sgfused.data.precomp import PrecompSplit
    from sgfused.data.synthetic import generate
    from sgfused.evaluate import evaluate_model
    from sgfused.train import TrainConfig, Trainer

    root = tmp_path / "data"
    generate(root, 200, 3, feature_dim=32, n_regions=10, progress=False)
    vocab = Vocabulary.load(root / "vocab.json")
    train, test = (PrecompSplit(root, s, vocab, boxes=True, image_graphs=True) for s in ("train", "test"))
    torch.manual_seed(0)
    model = build_model("cmsei", len(vocab), dict(embed_size=32, word_dim=16, img_dim=32, num_regions=10))
    before = evaluate_model(model, test, progress=False)[0]["full"]["rsum"]
    options = TrainConfig(epochs=4, lr=1e-3, lr_decay_epochs=10, batch_size=32, max_violation=False, device="cpu")
    Trainer(model, train, test, vocab, options, tmp_path / "run", progress=False).fit()
    after = evaluate_model(model, test, progress=False)[0]["full"]["rsum"]
    # measured with model seeds 0, 1, 2 (data seed fixed): i2t 159 -> 322, 114 -> 210, 139 -> 270 (gains
    # 96-163); t2i, not run here, gained 80 and 57 (seeds 0, 1). An untrained or collapsed model stays near `before`.
    assert after > before + 50, (before, after)
