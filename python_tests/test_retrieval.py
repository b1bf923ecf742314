"""sgfused.retrieval: the index, one- and two-stage search, explanations, the report, and the CLI's errors.

Tiny untrained models on a tiny synthetic split: what is tested is that search returns what
the model's own full scores and global vectors say, not that the model is good.
"""

from __future__ import annotations

import html.parser
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sgfused.checkpoint import save_checkpoint
from sgfused.cli import main
from sgfused.data.precomp import PrecompSplit, caption_loader, image_loader
from sgfused.data.synthetic import generate
from sgfused.data.vocab import Vocabulary
from sgfused.evaluate import similarity_matrix
from sgfused.models import build_model
from sgfused import reference
from sgfused.reference import cross_attention, l2norm
from sgfused.retrieval import GalleryIndex, Searcher, build_index, scan_attention_weights, write_html
from sgfused.retrieval import late, pooled

TINY = {
    "sgraf": {"img_dim": 16, "embed_size": 16, "word_dim": 8, "sim_dim": 8},
    "sgm": {"img_dim": 16, "embed_size": 16, "word_dim": 8},
    "vsepp": {"img_dim": 16, "embed_size": 16, "word_dim": 8},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval_data")
    generate(root, 60, seed=3, feature_dim=16, progress=False)  # test split: 6 images, 30 captions
    return root


def _checkpoint(path, name, vocab, seed):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model(name, len(vocab), TINY[name])
    state = {"model_name": name, "model_config": model.build_config, "vocab": vocab.to_dict(), "model": model.state_dict()}
    save_checkpoint(path, state)
    return path


@pytest.fixture(scope="module")
def built(data, tmp_path_factory):
    """``{model name: (checkpoint, index folder)}`` for the three supported models."""
    root = tmp_path_factory.mktemp("retrieval_indexes")
    vocab = Vocabulary.load(data / "vocab.json")
    out = {}
    for seed, name in enumerate(TINY):
        checkpoint = _checkpoint(root / f"{name}.pt", name, vocab, seed)
        build_index(checkpoint, data, "test", root / f"index_{name}", batch_size=4, progress=False)
        out[name] = (checkpoint, root / f"index_{name}")
    return out


def _full_matrix(searcher, data):
    needs = {part: True for part in type(searcher.model).data_requirements}
    split = PrecompSplit(data, "test", searcher.vocab, **needs)
    return similarity_matrix(searcher.model, image_loader(split, 4), caption_loader(split, 4), progress=False)


@pytest.mark.parametrize("name", ["sgraf", "sgm"])
def test_exhaustive_search_gives_the_models_full_scores(built, data, name):
    """Image -> text from the stored encodings; text -> image from a typed caption (SGRAF: the same encoding as the
    split's; SGM reads the split's gold caption graphs, a typed query has none, so only its image side is compared)."""
    searcher = Searcher(built[name][1])
    sims = _full_matrix(searcher, data)
    if name == "sgraf":
        caption = 7
        result = searcher.by_caption(searcher.index.captions[caption], top=searcher.index.n_images)
        scores = torch.tensor([hit.score for hit in result.hits])
        items = [hit.item for hit in result.hits]
        assert sorted(items) == list(range(searcher.index.n_images))
        torch.testing.assert_close(scores, sims[items, caption], atol=1e-5, rtol=1e-5)
        assert torch.all(scores[:-1] >= scores[1:])
    result = searcher.by_image(2, top=searcher.index.n_captions)
    items = [hit.item for hit in result.hits]
    torch.testing.assert_close(torch.tensor([hit.score for hit in result.hits]), sims[2, items], atol=1e-5, rtol=1e-5)
    assert [hit.image for hit in result.hits] == [item // 5 for item in items]


def test_two_stage_reranks_the_global_top_k(built, data):
    searcher = Searcher(built["sgraf"][1], use_faiss=False)
    model = searcher.model
    split = PrecompSplit(data, "test", searcher.vocab)
    with torch.no_grad():
        regions = model.encode_image(torch.stack([split.image(i).features for i in range(split.n_images)]))
        image_global = model.sim_encoder.v_global_w(regions)
        ids = split.caption(11).ids[None]
        words = model.encode_text(ids, torch.tensor([ids.shape[1]]))
        query_global = model.sim_encoder.t_global_w(words, torch.tensor([ids.shape[1]]))[0]
    expected = set(torch.topk(image_global @ query_global, 3).indices.tolist())
    text = searcher.index.captions[11]
    exhaustive = {hit.item: hit.score for hit in searcher.by_caption(text, top=6).hits}
    two_stage = searcher.by_caption(text, top=2, shortlist=3)
    assert two_stage.stage == "two-stage (torch)"
    assert {hit.item for hit in two_stage.hits} <= expected
    best_of_shortlist = sorted(expected, key=lambda i: -exhaustive[i])[:2]
    assert [hit.item for hit in two_stage.hits] == best_of_shortlist
    for hit in two_stage.hits:
        assert hit.score == pytest.approx(exhaustive[hit.item], abs=1e-6)
        assert hit.shortlist_score == pytest.approx(float(image_global[hit.item] @ query_global), abs=1e-5)
    whole = searcher.by_caption(text, top=6, shortlist=6)
    assert [h.item for h in whole.hits] == list(exhaustive)


def _sgm_late_scores(searcher, data):
    """``S_o + lambda cos(mean relation nodes)`` of every (image, caption) of the test split, from encodings made here:
    the reference max_sim batch by batch, the means item by item."""
    split = PrecompSplit(data, "test", searcher.vocab, **{part: True for part in type(searcher.model).data_requirements})
    with torch.no_grad():
        images = [searcher.model.encode_images(batch) for batch in image_loader(split, 4)]
        captions = [searcher.model.encode_captions(batch) for batch in caption_loader(split, 7)]
    s_o = torch.cat([torch.cat([reference.max_sim(im[0], cap[0], im[1], cap[1], False)[0] for cap in captions], dim=1)
                     for im in images])

    def relation_means(encodings):
        return l2norm(torch.stack([rels[i, : int(counts[i])].mean(dim=0) for _, _, rels, counts in encodings
                                   for i in range(len(counts))]))

    assert searcher.model.relation_weight == 1.0
    return s_o + relation_means(images) @ relation_means(captions).T


def test_sgm_shortlist_by_late_interaction_reranks_its_top_k(built, data):
    """Both directions: the shortlist is the top K' by the late score, the hits its best by the full score, each with
    its late score."""
    searcher = Searcher(built["sgm"][1], shortlist_by="late")
    s_o, full = _sgm_late_scores(searcher, data), _full_matrix(searcher, data)
    objects, n_objects = searcher.index.parts["image"][:2]  # served up to the largest count, stored padded to 36 regions
    assert objects.shape[1] == int(n_objects.max()) < np.load(built["sgm"][1] / "image_0.npy", mmap_mode="r").shape[1]
    for caption in (3, 22):
        result = searcher.by_indexed_caption(caption, top=2, shortlist=3)
        assert result.stage == "two-stage (late)"
        shortlist = torch.topk(s_o[:, caption], 3).indices.tolist()
        assert [hit.item for hit in result.hits] == sorted(shortlist, key=lambda i: -full[i, caption])[:2]
        for hit in result.hits:
            assert hit.score == pytest.approx(float(full[hit.item, caption]), abs=1e-5)
            assert hit.shortlist_score == pytest.approx(float(s_o[hit.item, caption]), abs=1e-5)
    result = searcher.by_image(4, top=3, shortlist=8)
    shortlist = torch.topk(s_o[4], 8).indices.tolist()
    assert [hit.item for hit in result.hits] == sorted(shortlist, key=lambda i: -full[4, i])[:3]
    assert [hit.shortlist_score for hit in result.hits] == pytest.approx([float(s_o[4, hit.item]) for hit in result.hits], abs=1e-5)
    typed = searcher.by_caption("a red cup on a table", top=6, shortlist=6)  # the whole gallery: exhaustive's order
    assert [hit.item for hit in typed.hits] == [hit.item for hit in searcher.by_caption("a red cup on a table", top=6).hits]


def test_shortlist_by_late_is_refused_for_other_models_and_unknown_stages(built):
    with pytest.raises(ValueError, match="--shortlist-by late needs an SGM index .* holds a 'sgraf' model"):
        Searcher(built["sgraf"][1], shortlist_by="late")
    with pytest.raises(ValueError, match="--shortlist-by must be one of vectors, late, late-ivf, got 'words'"):
        Searcher(built["sgm"][1], shortlist_by="words")


def test_late_ivf_with_a_centroid_per_node_and_every_list_probed_is_the_exact_late_score(built):
    """Each node its own centroid, every list probed: the approximation is exact, ranks and scores alike."""
    searcher = Searcher(built["sgm"][1], shortlist_by="late")
    parts, weight = searcher.index.parts["image"], searcher.model.relation_weight
    n_nodes = int(parts[1].sum())
    ivf = late.LateIVFShortlister(parts, weight, centroids=n_nodes, probes=n_nodes)
    assert ivf.n_centroids == n_nodes and len(torch.unique(ivf.codes[ivf.codes < n_nodes])) == n_nodes
    for caption in (0, 17):
        query = searcher.index.encoding("caption", [caption])
        (ivf_scores, ivf_rows), (exact_scores, exact_rows) = ivf(query, 4), searcher.shortlister("image")(query, 4)
        assert ivf_rows.tolist() == exact_rows.tolist()
        torch.testing.assert_close(ivf_scores, exact_scores, atol=1e-5, rtol=1e-5)


def test_late_ivf_probes_the_best_lists_and_widens_until_k_images_are_found(built):
    searcher = Searcher(built["sgm"][1], shortlist_by="late-ivf")
    query = searcher.index.encoding("caption", [9])
    parts = searcher.index.parts["image"]
    ivf = late.LateIVFShortlister(parts, searcher.model.relation_weight, centroids=8, probes=1)
    words = query[0][0, : int(query[1][0])]
    best = (words @ ivf.centroids.T).argmax(dim=1).unique()
    listed = {int(i) for i in range(len(ivf.codes)) if bool(torch.isin(ivf.codes[i], best).any())}
    rows = ivf._candidates(words @ ivf.centroids.T, 1)
    assert set(rows.tolist()) == listed
    scores, rows = ivf(query, searcher.index.n_images)  # more than one probe finds: the probes double
    assert sorted(rows.tolist()) == list(range(searcher.index.n_images)) and torch.isfinite(scores).all()
    assert searcher.shortlister("image").n_centroids == 1  # default: a power of two at most nodes / 64 (24 nodes here)
    whole = searcher.by_indexed_caption(9, top=6, shortlist=6)
    assert whole.stage == "two-stage (late-ivf)"
    assert [hit.item for hit in whole.hits] == [hit.item for hit in searcher.by_indexed_caption(9, top=6).hits]
    with pytest.raises(ValueError, match="--shortlist-by late-ivf searches images by caption"):
        searcher.by_image(0, top=2, shortlist=3)


def test_spherical_kmeans_finds_separated_clusters():
    generator = torch.Generator().manual_seed(1)
    directions = torch.eye(8)[:3]
    points = l2norm(directions.repeat_interleave(50, dim=0) + 0.05 * torch.randn(150, 8, generator=generator))
    centroids = late.spherical_kmeans(points, 3, seed=2)
    assign = late.nearest_centroid(points, centroids)
    assert [len(set(assign[i * 50 : (i + 1) * 50].tolist())) for i in range(3)] == [1, 1, 1]
    assert len(set(assign.tolist())) == 3
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(3))


def test_shortlist_key_from_a_second_checkpoint_shortlists_by_its_vectors(built, data, tmp_path):
    """An SGRAF index keyed by a VSE++ checkpoint: VSE++'s vectors pick the shortlist, SGRAF's full score ranks it."""
    (sgraf, own_index), (vsepp, vsepp_index) = built["sgraf"], built["vsepp"]
    manifest = build_index(sgraf, data, "test", tmp_path / "keyed", batch_size=4, progress=False, shortlist_checkpoint=vsepp)
    assert manifest["shortlist"]["model"] == "vsepp" and manifest["shortlist"]["checkpoint"] == str(vsepp.resolve())
    keyed, by_vsepp = Searcher(tmp_path / "keyed", use_faiss=False), Searcher(vsepp_index, use_faiss=False)
    for kind in ("image", "caption"):  # VSE++'s encodings are its global vectors
        torch.testing.assert_close(keyed.index.vectors[kind], by_vsepp.index.vectors[kind])
    text = keyed.index.captions[11]
    exhaustive = {hit.item: hit.score for hit in Searcher(own_index).by_caption(text, top=6).hits}
    vsepp_key = {hit.item: hit.score for hit in by_vsepp.by_caption(text, top=6).hits}
    shortlist = set(sorted(vsepp_key, key=lambda i: -vsepp_key[i])[:3])
    two_stage = keyed.by_caption(text, top=2, shortlist=3)
    assert [hit.item for hit in two_stage.hits] == sorted(shortlist, key=lambda i: -exhaustive[i])[:2]
    for hit in two_stage.hits:
        assert hit.score == pytest.approx(exhaustive[hit.item], abs=1e-6)
        assert hit.shortlist_score == pytest.approx(vsepp_key[hit.item], abs=1e-5)
    stored = keyed.by_indexed_caption(11, top=2, shortlist=3)
    assert [hit.item for hit in stored.hits] == [hit.item for hit in two_stage.hits]


def test_words_the_shortlist_key_does_not_know_are_reported(built, data, tmp_path):
    """A shortlist checkpoint with its own vocabulary reads some query words as <unk>: the result says which,
    apart from the model's own unknown words, in the table, the page and the JSON."""
    from sgfused.data.vocab import tokenize
    from sgfused.retrieval.report import format_results

    vocab = Vocabulary.load(data / "vocab.json")
    caption = GalleryIndex.open(built["sgraf"][1]).captions[0]
    dropped = tokenize(caption)[1]
    key_vocab = Vocabulary([vocab.idx2word[i] for i in range(4, len(vocab)) if vocab.idx2word[i] != dropped])
    assert dropped not in key_vocab.word2idx and len(key_vocab) == len(vocab) - 1
    key = _checkpoint(tmp_path / "key.pt", "vsepp", key_vocab, seed=5)
    build_index(built["sgraf"][0], data, "test", tmp_path / "keyed", batch_size=4, progress=False, shortlist_checkpoint=key)
    result = Searcher(tmp_path / "keyed", use_faiss=False).by_caption(caption + " qqqq", top=2, shortlist=3)
    expected = [token for token in tokenize(caption + " qqqq") if token not in key_vocab.word2idx]
    assert dropped in expected and result.unknown_words == ["qqqq"]
    assert result.shortlist_unknown_words == expected
    words = " ".join(expected)
    assert f"unknown to the shortlist checkpoint (read as <unk> by the first stage): {words}" in format_results(result)
    assert result.to_dict()["shortlist_unknown_words"] == expected
    page = tmp_path / "report.html"
    write_html(page, result)
    assert f"by the first stage): {words}" in page.read_text()
    assert Searcher(built["sgraf"][1]).by_caption(caption, top=1).shortlist_unknown_words == []


def test_shortlist_checkpoint_is_checked_like_the_model_checkpoint(built, data, tmp_path):
    sgraf, own_index = built["sgraf"]
    build_index(sgraf, data, "test", tmp_path / "keyed", batch_size=4, progress=False, shortlist_checkpoint=built["vsepp"][0])
    other = _checkpoint(tmp_path / "other_vsepp.pt", "vsepp", Vocabulary.load(data / "vocab.json"), seed=42)
    with pytest.raises(ValueError, match="was built by another shortlist checkpoint: .*other_vsepp.pt"):
        Searcher(tmp_path / "keyed", shortlist_checkpoint=other)
    with pytest.raises(ValueError, match="--shortlist-checkpoint: index .* was built without one"):
        Searcher(own_index, shortlist_checkpoint=built["vsepp"][0])
    vocab, mpsm = Vocabulary.load(data / "vocab.json"), tmp_path / "mpsm.pt"
    model = build_model("mpsm", len(vocab), {"img_dim": 16, "embed_size": 16, "word_dim": 8, "sim_dim": 8})
    save_checkpoint(mpsm, {"model_name": "mpsm", "model_config": model.build_config, "vocab": vocab.to_dict(),
                           "model": model.state_dict()})
    with pytest.raises(ValueError, match="retrieval supports the models .* 'mpsm'"):
        build_index(sgraf, data, "test", tmp_path / "bad", progress=False, shortlist_checkpoint=mpsm)


@pytest.mark.parametrize("name", ["sgraf", "sgm"])
def test_indexed_caption_query_gives_the_evaluation_column(built, data, name):
    """A stored caption (SGM: with its gold caption graph) scores every image exactly as evaluation does."""
    searcher = Searcher(built[name][1])
    sims = _full_matrix(searcher, data)
    for caption in (0, 13, searcher.index.n_captions - 1):
        result = searcher.by_indexed_caption(caption, top=searcher.index.n_images)
        items = [hit.item for hit in result.hits]
        assert sorted(items) == list(range(searcher.index.n_images))
        torch.testing.assert_close(torch.tensor([hit.score for hit in result.hits]), sims[items, caption], atol=1e-5, rtol=1e-5)
        assert result.query["caption"] == searcher.index.captions[caption]
    with pytest.raises(ValueError, match=r"caption must be a caption index in \[0, 30\) of the index, got 30"):
        searcher.by_indexed_caption(30)


def test_faiss_and_torch_shortlists_agree():
    """Both are exact inner-product top-k: the same rows and scores (the faiss extra, which scripts/test.sh installs)."""
    pytest.importorskip("faiss")
    generator = torch.Generator().manual_seed(0)
    gallery = l2norm(torch.randn(500, 24, generator=generator))
    by_faiss, by_torch = pooled.Shortlister(gallery, use_faiss=True), pooled.Shortlister(gallery, use_faiss=False)
    for query in l2norm(torch.randn(5, 24, generator=generator)):
        (faiss_scores, faiss_rows), (torch_scores, torch_rows) = by_faiss(query, 20), by_torch(query, 20)
        assert faiss_rows.tolist() == torch_rows.tolist()
        torch.testing.assert_close(faiss_scores, torch_scores, atol=1e-5, rtol=1e-5)


def test_vsepp_two_stage_equals_exhaustive_and_is_not_explained(built):
    searcher = Searcher(built["vsepp"][1])
    text = searcher.index.captions[4]
    exhaustive = searcher.by_caption(text, top=4)
    two_stage = searcher.by_caption(text, top=4, shortlist=5)
    assert [h.item for h in two_stage.hits] == [h.item for h in exhaustive.hits]
    assert [h.score for h in exhaustive.hits] == pytest.approx([h.shortlist_score for h in exhaustive.hits], abs=1e-6)
    with pytest.raises(ValueError, match="--explain needs a model with word-region alignment"):
        searcher.by_caption(text, top=1, explain=True)


def test_scan_attention_weights_give_the_reference_context():
    generator = torch.Generator().manual_seed(5)
    words, regions = torch.randn(6, 8, generator=generator), torch.randn(10, 8, generator=generator)
    weights = scan_attention_weights(words, regions, smooth=9.0)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(6))
    context = cross_attention(words[None], regions[None], torch.tensor([6]), torch.tensor([10]), smooth=9.0)[0, 0]
    torch.testing.assert_close(l2norm(weights @ regions), context, atol=1e-5, rtol=1e-5)


def test_sgraf_explanation_names_the_attended_regions_with_boxes_and_labels(built, data):
    searcher = Searcher(built["sgraf"][1])
    text = searcher.index.captions[0] + " qqqq"
    result = searcher.by_caption(text, top=1, explain=True)
    assert result.unknown_words == ["qqqq"]
    hit = result.hits[0]
    words = [w.word for w in hit.alignment]
    assert words == text.split()
    assert [w.known for w in hit.alignment] == [True] * (len(words) - 1) + [False]
    with torch.no_grad():
        regions = searcher.index.encoding("image", [hit.image])[0]
        encoding, _, _ = searcher.encode_caption(text)
        weights = scan_attention_weights(encoding[0][0], regions, searcher.model.lambda_softmax)
    graphs = json.loads((data / "test_ims_graphs.json").read_text())
    boxes, sizes = np.load(data / "test_ims_bbx.npy"), np.load(data / "test_ims_size.npy")
    for p, word in enumerate(hit.alignment):
        assert [r.region for r in word.regions] == torch.topk(weights[p + 1], 3).indices.tolist()
        for region in word.regions:
            assert region.weight == pytest.approx(float(weights[p + 1, region.region]), abs=1e-6)
            w, h = sizes[hit.image]
            np.testing.assert_allclose(region.box, boxes[hit.image, region.region] / [w, h, w, h], rtol=1e-6)
            labels = graphs[hit.image]["labels"]
            assert region.label == (labels[region.region] if region.region < len(labels) else None)


def test_sgm_explanation_is_each_words_best_object_node(built):
    searcher = Searcher(built["sgm"][1])
    result = searcher.by_image(1, top=2, explain=True)
    objects, n_objects = searcher.index.encoding("image", [1])[:2]
    for hit in result.hits:
        words, n_words = searcher.index.encoding("caption", [hit.item])[:2]
        cosines = words[0, : int(n_words[0])] @ objects[0, : int(n_objects[0])].t()  # (L, objects)
        best = cosines.max(dim=1)
        assert [w.regions[0].region for w in hit.alignment] == best.indices[1:-1].tolist()
        assert [w.regions[0].weight for w in hit.alignment] == pytest.approx(best.values[1:-1].tolist(), abs=1e-5)


class _Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.append(dict(attrs))


def test_html_report_is_self_contained_and_draws_each_words_region(built, tmp_path):
    searcher = Searcher(built["sgraf"][1])
    result = searcher.by_caption(searcher.index.captions[3] + " <b>", top=2, explain=True)
    page = tmp_path / "report.html"
    write_html(page, result, searcher.index.sizes)
    text = page.read_text()
    parser = _Tags()
    parser.feed(text)
    assert not {"script", "link", "img", "iframe"} & set(parser.tags)
    assert not any(key in ("src", "href") for attrs in parser.attrs for key in attrs)
    assert "url(" not in text and "@import" not in text
    heading = text.split("<h1>")[1].split("</h1>")[0]
    assert "&lt;b&gt;" in heading and "<b>" not in heading  # the query is escaped
    drawn = [attrs for tag, attrs in zip(parser.tags, parser.attrs) if tag == "rect" and attrs.get("class") == "box"]
    assert len(drawn) == sum(len(hit.alignment) for hit in result.hits)  # the strongest region of every word


def test_html_report_of_an_image_query_frames_every_card_as_the_query_image(built, tmp_path):
    """Image -> text: every card draws the query image's boxes, so its frame keeps the query image's aspect,
    whichever image the hit caption belongs to."""
    from sgfused.retrieval.report import _frame

    searcher = Searcher(built["sgraf"][1])
    sizes = searcher.index.sizes
    result = searcher.by_image(0, top=searcher.index.n_captions, explain=True)
    assert any(_frame(sizes[hit.image]) != _frame(sizes[0]) for hit in result.hits)  # else the test could not fail
    page = tmp_path / "report.html"
    write_html(page, result, sizes)
    parser = _Tags()
    parser.feed(page.read_text())
    frames = [(float(a["width"]), float(a["height"])) for t, a in zip(parser.tags, parser.attrs) if t == "svg"]
    assert frames == [_frame(tuple(float(v) for v in sizes[0]))] * len(result.hits)


BROWSER = next((name for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)


@pytest.mark.skipif(BROWSER is None, reason="scripts/render_report.sh needs a Chromium-family browser")
def test_html_report_renders_in_a_headless_browser_with_its_boxes(built, tmp_path):
    """The page as a browser draws it (scripts/render_report.sh): every hit's word colours appear as box pixels."""
    import subprocess

    from matplotlib import image as mpimg

    from sgfused.retrieval.report import FRAME, PALETTE

    searcher = Searcher(built["sgraf"][1])
    result = searcher.by_caption(searcher.index.captions[3], top=1, explain=True)
    page, shot = tmp_path / "report.html", tmp_path / "shot.png"
    write_html(page, result, searcher.index.sizes)
    script = Path(__file__).resolve().parents[1] / "scripts" / "render_report.sh"
    done = subprocess.run(["sh", str(script), str(page), str(shot), "900x700"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    pixels = (mpimg.imread(shot)[..., :3] * 255).round().astype(int)
    assert pixels.shape == (700, 900, 3)
    pixels = pixels[:, : int(FRAME) + 40]  # the drawing (page margin + frame); the word list with its colour chips is right of it
    on_top = {}  # region -> the colour of the last word drawn on it (words sharing a region share one box outline)
    for number, word in enumerate(result.hits[0].alignment):
        on_top[word.regions[0].region] = PALETTE[number % len(PALETTE)]
    assert len(on_top) >= 2
    for region, colour in on_top.items():
        rgb = [int(colour[i : i + 2], 16) for i in (1, 3, 5)]
        assert (np.abs(pixels - rgb).max(axis=-1) <= 8).sum() > 20, f"region {region}'s box ({colour}) is not drawn"


def test_an_index_rebuilt_in_place_from_data_without_boxes_keeps_none_of_the_old_ones(built, data, tmp_path):
    """Rebuilding into an index folder replaces everything: the old split's boxes, sizes and region labels do
    not survive into an index of a split that has none, and a table of the wrong length is refused."""
    bare = tmp_path / "bare"
    shutil.copytree(data, bare)
    for name in ("test_ims_bbx.npy", "test_ims_size.npy", "test_ims_graphs.json"):
        (bare / name).unlink()
    checkpoint, out = built["sgraf"][0], tmp_path / "index"
    build_index(checkpoint, data, "test", out, batch_size=4, progress=False)
    assert GalleryIndex.open(out).boxes is not None
    build_index(checkpoint, bare, "test", out, batch_size=4, progress=False)
    index = GalleryIndex.open(out)
    assert index.boxes is None and index.sizes is None and index.region_labels is None
    hit = Searcher(index).by_caption(index.captions[0], top=1, explain=True).hits[0]
    assert all(region.box is None and region.label is None for word in hit.alignment for region in word.regions)
    np.save(out / "sizes.npy", np.ones((index.n_images + 1, 2), dtype=np.float32))
    with pytest.raises(ValueError, match=f"sizes.npy holds {index.n_images + 1} images, the index {index.n_images}"):
        GalleryIndex.open(out)


def test_index_refuses_changed_data(built, data, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    checkpoint = built["vsepp"][0]
    build_index(checkpoint, copy, "test", tmp_path / "index", progress=False)
    lines = (copy / "test_caps.txt").read_text().splitlines()
    (copy / "test_caps.txt").write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    with pytest.raises(ValueError, match="was built from other data"):
        GalleryIndex.open(tmp_path / "index")


def test_index_refuses_features_rewritten_in_place(built, data, tmp_path):
    """Same shape and size, one value changed in a sampled image: refused; an index from before the sample opens."""
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    build_index(built["vsepp"][0], copy, "test", tmp_path / "index", progress=False)
    features = np.load(copy / "test_ims.npy", mmap_mode="r+")
    features[-1, 0, 0] += 1.0  # the last image is always among the sampled ones
    features.flush()
    del features
    with pytest.raises(ValueError, match="was built from other data"):
        GalleryIndex.open(tmp_path / "index")
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    del manifest["data_fingerprint"]["features_sample_sha256"]  # as written before the sample was recorded
    (tmp_path / "index" / "manifest.json").write_text(json.dumps(manifest))
    assert GalleryIndex.open(tmp_path / "index").n_images == manifest["n_images"]


def test_unsupported_model_is_named():
    with pytest.raises(ValueError, match="retrieval supports the models sgraf, sgm, vsepp; .* 'mpsm'"):
        pooled.check_supported("mpsm")


# ----------------------------------------------------------------------------- command line


def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"sgfused {argv[0]}: error:"), err
    for needle in needles:
        assert needle in err, err
    return err


def test_cli_index_and_search_write_table_json_and_html(built, data, tmp_path, capsys):
    checkpoint, _ = built["sgraf"]
    index = tmp_path / "index"
    assert main(["index", str(checkpoint), "--data", str(data), "--split", "test", "--out", str(index), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["n_images"] == 6
    out_json, out_html = tmp_path / "hits.json", tmp_path / "hits.html"
    argv = ["search", str(index), "--caption", "a red cup zzz", "--top", "3", "--shortlist", "4",
            "--json", str(out_json), "--html", str(out_html)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    shortlister = "faiss" if pooled.faiss_available() else "torch"  # the CLI uses faiss when it is installed
    assert f"two-stage ({shortlister}), K' = 4" in printed and "unknown words (read as <unk>): zzz" in printed
    saved = json.loads(out_json.read_text())
    assert [hit["rank"] for hit in saved["hits"]] == [1, 2, 3] and saved["unknown_words"] == ["zzz"]
    assert all(hit["alignment"] for hit in saved["hits"]) and out_html.read_text().startswith("<!DOCTYPE html>")
    assert main(["search", str(index), "--image", "5", "--top", "2"]) == 0
    assert "image 5 -> captions (exhaustive, gallery 30)" in capsys.readouterr().out
    keyed = tmp_path / "keyed"
    assert main(["index", str(checkpoint), "--data", str(data), "--out", str(keyed), "--quiet",
                 "--shortlist-checkpoint", str(built["vsepp"][0])]) == 0
    assert json.loads(capsys.readouterr().out)["shortlist"]["model"] == "vsepp"
    assert main(["search", str(keyed), "--caption", "a red cup", "--top", "2", "--shortlist", "3"]) == 0
    assert "K' = 3" in capsys.readouterr().out


def test_cli_late_ivf_search_says_it_builds_its_first_stage(built, capsys):
    argv = ["search", str(built["sgm"][1]), "--caption", "a red cup", "--top", "2", "--shortlist", "3", "--shortlist-by"]
    assert main([*argv, "late-ivf"]) == 0
    captured = capsys.readouterr()
    assert "two-stage (late-ivf), K' = 3" in captured.out and "building the late-ivf first stage" in captured.err
    assert main([*argv, "late", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "two-stage (late), K' = 3" in captured.out and captured.err == ""


def test_cli_bad_input_is_one_line_exit_2(built, data, tmp_path, capsys):
    checkpoint, index = built["sgraf"]
    other = _checkpoint(tmp_path / "other.pt", "sgraf", Vocabulary.load(data / "vocab.json"), seed=99)
    search = ["search", str(index)]
    _one_line_error(capsys, [*search, "--caption", "a cup", "--checkpoint", str(other)], "built by another checkpoint")
    _one_line_error(capsys, [*search, "--caption", "a cup", "--shortlist-checkpoint", str(other)],
                    "--shortlist-checkpoint", "was built without one")
    _one_line_error(capsys, [*search, "--caption", "qqq zzzz"], "--caption", "none of its words", "qqq zzzz")
    _one_line_error(capsys, [*search, "--image", "6"], "--image", "[0, 6)", "got 6")
    _one_line_error(capsys, [*search, "--image", "-1"], "--image", "got -1")
    _one_line_error(capsys, [*search, "--caption", "a cup", "--top", "5", "--shortlist", "3"],
                    "--shortlist (3) must be >= --top (5)")
    _one_line_error(capsys, [*search, "--caption", "a cup", "--top", "7"], "--top must be in [1, 6]", "got 7")
    _one_line_error(capsys, [*search, "--caption", "a cup", "--shortlist-by", "late", "--shortlist", "3"],
                    "--shortlist-by late needs an SGM index", "'sgraf'")
    sgm = ["search", str(built["sgm"][1]), "--caption", "a cup", "--shortlist-by", "late"]
    _one_line_error(capsys, sgm, "--shortlist-by late needs --shortlist K'")
    _one_line_error(capsys, [*sgm, "--shortlist", "3", "--faiss"], "--faiss searches global vectors")
    _one_line_error(capsys, ["search", str(built["sgm"][1]), "--image", "1", "--shortlist-by", "late-ivf", "--shortlist", "3"],
                    "--shortlist-by late-ivf searches images by caption")
    _one_line_error(capsys, ["search", str(tmp_path), "--caption", "a cup"], "has no manifest.json")
    _one_line_error(capsys, ["index", str(checkpoint), "--data", str(data), "--out", str(tmp_path / "x"), "--batch-size", "0"],
                    "--batch-size must be >= 1, got 0")
