"""Synthetic scene-graph image-text datasets, written in exactly the Flickr30K / COCO file layout.

What: :func:`generate` draws a random world of object classes, attributes and predicates,
then scenes in it (objects with attributes, related by predicates, laid out in an image),
and writes for each split ``train`` / ``dev`` / ``test`` everything the real pipeline reads
(docs/architecture.md, "Data"): region features ``{split}_ims.npy`` (float32, N x regions x dim),
five captions per image ``{split}_caps.txt``, region boxes ``{split}_ims_bbx.npy`` (float32
pixel x1 y1 x2 y2), image sizes ``{split}_ims_size.npy`` (float32 width, height), visual scene graphs
``{split}_ims_graphs.json``, gold caption graphs ``{split}_caps_graphs.json``, relation
(union-box) features ``{split}_ims_rels.npy`` (float32, N x max relations x dim: row r is the
region of relation r of the image's graph, zero past its relations), plus
``vocab.json`` (train + dev captions), ``world.json`` (the world, so a dataset documents
itself) and ``{split}_distractors.json`` (the hard-distractor twins).

Why: every code path used for the real datasets (loading, vocabulary, scene-graph models,
training, evaluation) runs and learns on a machine with no downloads, and the twins make
relation and attribute awareness measurable: a twin has the same objects as another image
of its split but one relation or one attribute differs, so a bag-of-objects model cannot
tell the two apart while a relation-aware one can.

Scenes. Each image has distinct object classes (so captions are unambiguous). Relations form
a forest: object ``c`` is related to at most one earlier object ``p < c``, and its box is
placed relative to ``p``'s box by the predicate, so boxes agree with every spatial predicate
(``left of``: the subject ends left of where the object starts; ``above`` / ``below``
likewise vertically; ``on top of``: the subject's bottom edge lies in the top quarter of the
object and its centre above it; ``next to``: vertically overlapping and horizontally within a
quarter of the narrower width). Action predicates (``holding``, ``riding``, ``watching``)
only take plausible subject / object kinds. The layout is finally scaled per axis into the
image, which keeps all of these relations.

Regions. Region ``i < n_objects`` is object ``i`` of the visual graph; the next
``n_relations`` regions are the relations in graph order, boxed on the union of the pair;
the remaining regions are background with random boxes. Every class, attribute and predicate
has a random prototype with unit-variance elements; an object region is its class prototype
plus ``attribute_weight`` times its attributes' prototypes plus Gaussian noise, a relation
region is ``proto(predicate) + 0.5 * (proto(subject class) - proto(object class))`` plus
noise, and a background region is unit-variance noise. Features are synthesised in chunks of
images straight into a memory-mapped ``.npy``, so a split never has to fit in memory.

Settings (``WorldConfig.setting``). ``"easy"`` (the default, what the demo recipes use) is
the above. ``"hard"`` shows a relation only where a real detector would: in the boxes and
in the visual scene graph. There are no relation regions (regions after the objects are
background); the union-box features of ``{split}_ims_rels.npy`` are the mean of the two
object regions (both objects' appearance, no predicate, the same either way round); and a
twin has its base image's region features bit for bit (an attribute twin differs only in
the changed object's attribute prototype, same noise) and its base's background boxes,
while its objects are laid out anew for the changed relation. So a model that reads only
region features (VSE++, SGRAF) gets the same image encoding for the two images of a
relation twin: it scores them alike (ties count half in :mod:`sgfused.twins`) and sits at
50% by construction; the attribute twins stay visible to it (the control). Boxes (MPSM,
CMSEI) and scene graphs (SGFN, SGM, CMSEI) carry the relation.

Captions. Lowercase alphabetic words separated by single spaces (so every tokenizer agrees
with ``caption.split()``), built from a few templates over a subset of the scene ("a red dog
to the left of a small car", "there is a man holding a blue cup", "the cat is below the big
tree", "a photo of ...", two relations joined by "and", or a plain list of objects). Their
gold graphs give a plausible dependency tree (determiners and adjectives depend on their
noun, the predicate's head word on the subject noun, the object noun on the predicate head)
and objects, attributes and relations over token positions. Both images of a twin pair get
captions that all mention what differs.

Determinism: the same arguments give the same bytes (numpy ``Generator(PCG64)`` streams
spawned from ``seed``); the scenes do not depend on ``feature_dim``.
"""

from __future__ import annotations

import json
import os
import time
from bisect import bisect_right
from dataclasses import asdict, dataclass, replace
from itertools import accumulate
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from .vocab import Vocabulary

SPLITS = ("train", "dev", "test")
DEFAULT_SPLITS = (0.8, 0.1, 0.1)  # the share of the images in each split
N_REGIONS = 36  # regions per image, as bottom-up features have
SETTINGS = ("easy", "hard")  # see the module docstring, "Settings"
CAPTIONS_PER_IMAGE = 5

Box = tuple[float, float, float, float]

# (name, kind); interleaved so that every prefix mixes the kinds the action predicates need.
CLASS_POOL: tuple[tuple[str, str], ...] = (
    ("man", "person"), ("dog", "animal"), ("horse", "rideable"), ("cup", "thing"),
    ("woman", "person"), ("cat", "animal"), ("bicycle", "rideable"), ("ball", "thing"),
    ("boy", "person"), ("bird", "animal"), ("skateboard", "rideable"), ("table", "thing"),
    ("girl", "person"), ("cow", "animal"), ("motorcycle", "rideable"), ("chair", "thing"),
    ("child", "person"), ("sheep", "animal"), ("elephant", "rideable"), ("bag", "thing"),
    ("player", "person"), ("giraffe", "animal"), ("surfboard", "rideable"), ("umbrella", "thing"),
    ("tree", "thing"), ("car", "thing"), ("kite", "thing"), ("bottle", "thing"),
    ("book", "thing"), ("phone", "thing"), ("lamp", "thing"), ("bench", "thing"),
    ("laptop", "thing"), ("clock", "thing"), ("vase", "thing"), ("bowl", "thing"),
    ("pizza", "thing"), ("banana", "thing"), ("hat", "thing"), ("sign", "thing"),
)  # fmt: skip

# (name, group); a caption puts sizes before colours. The first four hold two of each group.
ATTRIBUTE_POOL: tuple[tuple[str, str], ...] = (
    ("red", "color"), ("small", "size"), ("blue", "color"), ("big", "size"),
    ("green", "color"), ("yellow", "color"), ("black", "color"), ("white", "color"),
    ("tiny", "size"), ("brown", "color"), ("huge", "size"), ("orange", "color"),
    ("pink", "color"), ("gray", "color"),
)  # fmt: skip
_GROUP_ORDER = {"size": 0, "color": 1}


@dataclass(frozen=True)
class Predicate:
    """A relation: its graph name, its caption phrase and how it places boxes.

    ``head`` is the index in ``phrase`` of the head word (``left`` in "to the left of").
    ``place_subject`` / ``place_object`` name how the subject's box sits relative to the
    object's box and vice versa (see :func:`_place`). ``subjects`` / ``objects``: the class
    kinds allowed in each role, ``None`` for any.
    """

    name: str
    phrase: str
    head: int
    place_subject: str
    place_object: str
    subjects: tuple[str, ...] | None = None
    objects: tuple[str, ...] | None = None

    @property
    def spatial(self) -> bool:
        return self.subjects is None and self.objects is None

    @property
    def reversible(self) -> bool:
        """Whether swapping subject and object gives a different scene of the same kinds."""
        return self.spatial and self.place_subject != self.place_object

    def allows(self, subject_kind: str, object_kind: str) -> bool:
        return (self.subjects is None or subject_kind in self.subjects) and (self.objects is None or object_kind in self.objects)


PREDICATES: tuple[Predicate, ...] = (
    Predicate("left of", "to the left of", 2, "left", "right"),
    Predicate("right of", "to the right of", 2, "right", "left"),
    Predicate("above", "above", 0, "above", "below"),
    Predicate("below", "below", 0, "below", "above"),
    Predicate("on top of", "on top of", 0, "on_top", "under"),
    Predicate("next to", "next to", 0, "beside", "beside"),
    Predicate("holding", "holding", 0, "overlap", "overlap", ("person",), ("thing", "animal")),
    Predicate("riding", "riding", 0, "on_top", "under", ("person",), ("rideable",)),
    Predicate("watching", "watching", 0, "near", "near", ("person", "animal")),
)


@dataclass(frozen=True)
class WorldConfig:
    """Parameters of the random world and of its scenes.

    Class and attribute names are the first ``n_classes`` / ``n_attributes`` entries of
    :data:`CLASS_POOL` / :data:`ATTRIBUTE_POOL`; all :data:`PREDICATES` are used.

    - ``n_classes``: object classes (3 .. 40).
    - ``n_attributes``: attributes, colours and sizes (4 .. 14).
    - ``objects_per_image``: inclusive range of objects in an image (at least 2).
    - ``relations_per_image``: inclusive range of relations (at least 1); capped at
      ``objects - 1`` per image since relations form a forest.
    - ``attribute_probability``: chance that an object has an attribute of each group.
    - ``caption_attribute_probability``: chance that a caption names an object's attribute
      (always for the attribute that differs in a twin).
    - ``attribute_weight``: weight of attribute prototypes in an object's region feature.
    - ``noise``: std of the Gaussian noise on object and relation region features
      (prototype elements have std 1).
    - ``distractor_fraction``: fraction of the images of each split that are twins of
      another image of the split (at most half of it).
    - ``setting``: ``"easy"`` (relation regions carry the predicate) or ``"hard"`` (relations
      only in boxes and the visual graph; twins share their region features); module doc.
    """

    n_classes: int = 30
    n_attributes: int = 10
    objects_per_image: tuple[int, int] = (2, 6)
    relations_per_image: tuple[int, int] = (1, 4)
    attribute_probability: float = 0.5
    caption_attribute_probability: float = 0.7
    attribute_weight: float = 0.5
    noise: float = 0.5
    distractor_fraction: float = 0.2
    setting: str = "easy"

    def validate(self, n_regions: int) -> None:
        """Raise ValueError for parameters no world can satisfy."""
        low, high = self.objects_per_image
        rel_low, rel_high = self.relations_per_image
        checks = (
            (3 <= self.n_classes <= len(CLASS_POOL), f"n_classes must be in [3, {len(CLASS_POOL)}]"),
            (4 <= self.n_attributes <= len(ATTRIBUTE_POOL), f"n_attributes must be in [4, {len(ATTRIBUTE_POOL)}]"),
            (2 <= low <= high <= self.n_classes, "objects_per_image must satisfy 2 <= low <= high <= n_classes"),
            (1 <= rel_low <= rel_high, "relations_per_image must satisfy 1 <= low <= high"),
            (high + min(rel_high, high - 1) <= n_regions, f"{n_regions} regions cannot hold the objects and relations"),
            (0.0 <= self.distractor_fraction <= 0.5, "distractor_fraction must be in [0, 0.5]"),
            (self.noise >= 0.0, "noise must be >= 0"),
            (self.setting in SETTINGS, f"setting must be one of {SETTINGS}, got {self.setting!r}"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"WorldConfig: {message}")


@dataclass(frozen=True)
class _World:
    """The names a world uses, with its configuration."""

    config: WorldConfig
    classes: tuple[tuple[str, str], ...]
    attributes: tuple[tuple[str, str], ...]
    predicates: tuple[Predicate, ...] = PREDICATES

    @classmethod
    def from_config(cls, config: WorldConfig) -> "_World":
        return cls(config, CLASS_POOL[: config.n_classes], ATTRIBUTE_POOL[: config.n_attributes])

    @property
    def n_prototypes(self) -> int:
        """Prototype rows: classes, then attributes, then predicates."""
        return len(self.classes) + len(self.attributes) + len(self.predicates)

    def description(self, seed: int, feature_dim: int, n_regions: int, counts: dict[str, int]) -> dict[str, Any]:
        """What ``world.json`` holds."""
        return {
            "seed": seed,
            "feature_dim": feature_dim,
            "n_regions": n_regions,
            "images": counts,
            "captions_per_image": CAPTIONS_PER_IMAGE,
            "config": asdict(self.config),
            "classes": [{"name": n, "kind": k} for n, k in self.classes],
            "attributes": [{"name": n, "group": g} for n, g in self.attributes],
            "predicates": [
                {"name": p.name, "phrase": p.phrase, "head": p.phrase.split()[p.head], "spatial": p.spatial} for p in self.predicates
            ],
            "regions": "objects of the visual graph first, then one region per relation (union box), then background",
        }


class _Draws:
    """Uniform draws taken from a numpy Generator in blocks: scalar Generator calls cost microseconds each."""

    def __init__(self, rng: np.random.Generator, block: int = 8192) -> None:
        self._rng, self._block = rng, block
        self._values: list[float] = []

    def random(self) -> float:
        if not self._values:
            self._values = self._rng.random(self._block).tolist()[::-1]
        return self._values.pop()

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.random()

    def below(self, n: int) -> int:
        return int(self.random() * n)

    def between(self, low: int, high: int) -> int:
        """An integer in ``[low, high]``."""
        return low + self.below(high - low + 1)

    def chance(self, p: float) -> bool:
        return self.random() < p

    def pick(self, items: Sequence[Any]) -> Any:
        return items[self.below(len(items))]

    def sample(self, items: Sequence[Any], k: int) -> list[Any]:
        """``k`` distinct items in random order."""
        pool = list(items)
        for i in range(k):
            j = i + self.below(len(pool) - i)
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:k]


@dataclass
class _Scene:
    """One image: objects (class and attribute indices), relations, layout, and what its captions focus on.

    ``relations``: (subject, predicate, object) with the later object, ``max(subject, object)``,
    placed relative to the earlier one. ``key_relations``: the relations a caption is built
    around; ``shown``: an object whose attributes every caption names (-1: none);
    ``focused``: a twin pair member, whose captions must all mention what differs.
    """

    labels: list[int]
    attributes: list[list[int]]
    relations: list[tuple[int, int, int]]
    size: tuple[int, int]
    boxes: list[Box]
    key_relations: list[int]
    shown: int = -1
    focused: bool = False


# -- layout ---------------------------------------------------------------------------------------------------

_SIZE = (0.12, 0.35)  # box side in the unit layout space
_GAP = (0.02, 0.15)  # gap between boxes placed side by side
_IMAGE_WIDTH, _IMAGE_HEIGHT = (400, 640), (300, 640)
_MARGIN = 0.02  # of the image side


def _centred(cx: float, cy: float, w: float, h: float) -> Box:
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def _place(how: str, parent: Box, draws: _Draws) -> Box:
    """A new box placed ``how`` relative to ``parent`` (the ``place_*`` names of :class:`Predicate`)."""
    w, h = draws.uniform(*_SIZE), draws.uniform(*_SIZE)
    px1, py1, px2, py2 = parent
    pw, ph = px2 - px1, py2 - py1
    cx, cy = draws.uniform(px1, px2), draws.uniform(py1, py2)  # a centre within the parent's extent
    gap = draws.uniform(*_GAP)
    if how == "left":
        return (px1 - gap - w, cy - h / 2, px1 - gap, cy + h / 2)
    if how == "right":
        return (px2 + gap, cy - h / 2, px2 + gap + w, cy + h / 2)
    if how == "above":
        return (cx - w / 2, py1 - gap - h, cx + w / 2, py1 - gap)
    if how == "below":
        return (cx - w / 2, py2 + gap, cx + w / 2, py2 + gap + h)
    if how == "on_top":  # bottom edge within the parent's top 10-20 %
        bottom = py1 + draws.uniform(0.1, 0.2) * ph
        return (cx - w / 2, bottom - h, cx + w / 2, bottom)
    if how == "under":  # the parent is on top of the new box
        top = py2 - draws.uniform(0.1, 0.2) * h
        left = (px1 + px2) / 2 - draws.uniform(0.2, 0.8) * w
        return (left, top, left + w, top + h)
    if how == "beside":  # side by side, overlapping or apart by at most a fifth of the narrower width
        offset = draws.uniform(-0.2, 0.2) * min(w, pw)
        left = px2 + offset if draws.chance(0.5) else px1 - offset - w
        return (left, cy - h / 2, left + w, cy + h / 2)
    if how == "overlap":
        return _centred((px1 + px2) / 2 + draws.uniform(-0.3, 0.3) * pw, (py1 + py2) / 2 + draws.uniform(-0.3, 0.3) * ph, w, h)
    if how == "near":
        return _centred(cx + draws.uniform(-1, 1) * (pw + w), cy + draws.uniform(-1, 1) * (ph + h), w, h)
    raise ValueError(f"unknown placement {how!r}")


def _layout(world: _World, labels_count: int, relations: list[tuple[int, int, int]], draws: _Draws) -> list[Box]:
    """Boxes in the unit layout space: unrelated objects anywhere, related ones placed by their predicate."""
    anchored = {max(s, o): (s, p, o) for s, p, o in relations}
    boxes: list[Box] = []
    for i in range(labels_count):
        if i not in anchored:
            boxes.append(_centred(draws.random(), draws.random(), draws.uniform(*_SIZE), draws.uniform(*_SIZE)))
            continue
        s, p, o = anchored[i]
        predicate = world.predicates[p]
        how, parent = (predicate.place_subject, o) if i == s else (predicate.place_object, s)
        boxes.append(_place(how, boxes[parent], draws))
    return boxes


def _fit(boxes: list[Box], size: tuple[int, int], draws: _Draws) -> list[Box]:
    """``boxes`` scaled per axis (never enlarged past the unit layout size) and shifted into the image, in pixels."""
    fitted = np.array(boxes, dtype=np.float64)
    for axis, side in enumerate(size):
        low, high = fitted[:, axis].min(), fitted[:, axis + 2].max()
        room = side * (1 - 2 * _MARGIN)
        scale = room / max(high - low, 1.0)
        shift = side * _MARGIN + draws.uniform(0.0, room - (high - low) * scale)
        fitted[:, [axis, axis + 2]] = (fitted[:, [axis, axis + 2]] - low) * scale + shift
    return [tuple(b) for b in np.round(fitted, 1).tolist()]


def _arrange(world: _World, scene: _Scene, draws: _Draws) -> _Scene:
    """``scene`` with boxes laid out for its relations in its image size."""
    return replace(scene, boxes=_fit(_layout(world, len(scene.labels), scene.relations, draws), scene.size, draws))


# -- scenes and their twins -------------------------------------------------------------------------------------


def _object_attributes(world: _World, draws: _Draws) -> list[int]:
    """Attribute indices of one object: at most one per group, sizes first."""
    chosen = []
    for group in sorted(_GROUP_ORDER, key=_GROUP_ORDER.get):
        members = [a for a, (_, g) in enumerate(world.attributes) if g == group]
        if draws.chance(world.config.attribute_probability):
            chosen.append(draws.pick(members))
    return chosen


def _relation(world: _World, labels: list[int], child: int, parent: int, draws: _Draws) -> tuple[int, int, int]:
    """A random (subject, predicate, object) between two objects, either way round, kinds permitting."""
    options = [
        (s, p, o)
        for s, o in ((child, parent), (parent, child))
        for p, predicate in enumerate(world.predicates)
        if predicate.allows(world.classes[labels[s]][1], world.classes[labels[o]][1])
    ]
    return draws.pick(options)


def _scene(world: _World, draws: _Draws) -> _Scene:
    """A random scene laid out in a random image size."""
    config = world.config
    n = draws.between(*config.objects_per_image)
    labels = draws.sample(range(len(world.classes)), n)
    attributes = [_object_attributes(world, draws) for _ in range(n)]
    n_relations = min(draws.between(*config.relations_per_image), n - 1)
    children = sorted(draws.sample(range(1, n), n_relations))
    relations = [_relation(world, labels, c, draws.below(c), draws) for c in children]
    size = (draws.between(*_IMAGE_WIDTH), draws.between(*_IMAGE_HEIGHT))
    return _arrange(world, _Scene(labels, attributes, relations, size, [], list(range(len(relations)))), draws)


def _changed_relation(world: _World, scene: _Scene, reverse: bool, draws: _Draws) -> tuple[_Scene, dict[str, Any]]:
    """A twin with one relation's predicate changed, or (``reverse``) its subject and object swapped."""
    names = [p.name for p in world.predicates]
    eligible = [k for k, (_, p, _) in enumerate(scene.relations) if world.predicates[p].reversible] if reverse else range(len(scene.relations))
    k = draws.pick(list(eligible))
    s, p, o = scene.relations[k]
    if reverse:
        new = (o, p, s)
    else:
        kinds = world.classes[scene.labels[s]][1], world.classes[scene.labels[o]][1]
        new = (s, draws.pick([q for q, pred in enumerate(world.predicates) if q != p and pred.allows(*kinds)]), o)
    relations = [new if j == k else r for j, r in enumerate(scene.relations)]
    change = {"differs": "direction" if reverse else "predicate", "relation": k, "before": [s, names[p], o], "after": [new[0], names[new[1]], new[2]]}
    return replace(scene, relations=relations, key_relations=[k], focused=True), change


def _changed_attribute(world: _World, scene: _Scene, draws: _Draws) -> tuple[_Scene, _Scene, dict[str, Any]]:
    """(base, twin, change): one object's attribute differs; the base gains an attribute if the object had none."""
    i = draws.pick(sorted({x for s, _, o in scene.relations for x in (s, o)}))
    if not scene.attributes[i]:
        attributes = [list(a) for a in scene.attributes]
        attributes[i] = [draws.below(len(world.attributes))]
        scene = replace(scene, attributes=attributes)
    slot = draws.below(len(scene.attributes[i]))
    old = scene.attributes[i][slot]
    group = world.attributes[old][1]
    new = draws.pick([a for a, (_, g) in enumerate(world.attributes) if g == group and a != old])
    attributes = [list(a) for a in scene.attributes]
    attributes[i][slot] = new
    keys = [k for k, (s, _, o) in enumerate(scene.relations) if i in (s, o)]
    base = replace(scene, key_relations=keys, shown=i, focused=True)
    change = {"differs": "attribute", "object": i, "before": world.attributes[old][0], "after": world.attributes[new][0]}
    return base, replace(base, attributes=attributes), change


def _twin(world: _World, scene: _Scene, draws: _Draws) -> tuple[_Scene, _Scene, dict[str, Any]]:
    """(base, twin, change): the base refocused on what differs, and its twin laid out anew."""
    kinds = ["predicate", "attribute"]
    if any(world.predicates[p].reversible for _, p, _ in scene.relations):
        kinds.append("direction")
    kind = draws.pick(kinds)
    if kind == "attribute":
        base, twin, change = _changed_attribute(world, scene, draws)
    else:
        twin, change = _changed_relation(world, scene, kind == "direction", draws)
        base = replace(scene, key_relations=twin.key_relations, focused=True)
    return base, _arrange(world, twin, draws), change


def _split_scenes(world: _World, n: int, draws: _Draws, order: np.ndarray) -> tuple[list[_Scene], list[dict[str, Any]]]:
    """``n`` scenes, a fraction of them twins of others, in the order ``order`` (a permutation of ``range(n)``)."""
    n_twins = int(round(world.config.distractor_fraction * n))
    scenes = [_scene(world, draws) for _ in range(n - n_twins)]
    changes = []
    for b in range(n_twins):
        scenes[b], twin, change = _twin(world, scenes[b], draws)
        scenes.append(twin)
        changes.append(change)
    position = np.argsort(order).tolist()  # position[j]: where scene j ends up
    distractors = [
        {"image": position[n - n_twins + b], "twin_of": position[b], **change} for b, change in enumerate(changes)
    ]
    return [scenes[j] for j in order.tolist()], sorted(distractors, key=lambda d: d["image"])


# -- captions -------------------------------------------------------------------------------------------------


class _Caption:
    """A caption under construction: its words and its gold graph over word positions."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.heads: list[int] = []
        self.objects: list[int] = []
        self.attributes: list[list[int]] = []
        self.relations: list[list[int]] = []

    def word(self, text: str) -> int:
        """Append a word (a root until attached); its position."""
        self.tokens.append(text)
        self.heads.append(-1)
        return len(self.tokens) - 1

    def attach(self, dependent: int, head: int) -> None:
        self.heads[dependent] = head

    def noun_phrase(self, determiner: str, adjectives: list[str], noun: str) -> int:
        """Determiner, adjectives and noun, all depending on the noun; the noun's position."""
        if determiner == "a" and (adjectives or [noun])[0][0] in "aeiou":
            determiner = "an"
        modifiers = [self.word(determiner)] + [self.word(a) for a in adjectives]
        position = self.word(noun)
        for m in modifiers:
            self.attach(m, position)
        self.objects.append(position)
        self.attributes.extend([position, m] for m in modifiers[1:])
        return position

    def phrase(self, predicate: Predicate) -> int:
        """The predicate's words, depending on its head word; the head's position."""
        positions = [self.word(w) for w in predicate.phrase.split()]
        head = positions[predicate.head]
        for p in positions:
            if p != head:
                self.attach(p, head)
        return head

    def graph(self) -> dict[str, list]:
        return {"tokens": self.tokens, "heads": self.heads, "objects": self.objects, "attributes": self.attributes, "relations": self.relations}


class _Captioner:
    """Writes the captions of one scene, each with its gold graph."""

    TEMPLATES = ("relation", "there", "copula", "photo", "two", "list")
    WEIGHTS = (0.3, 0.15, 0.2, 0.1, 0.15, 0.1)

    def __init__(self, world: _World, scene: _Scene, draws: _Draws) -> None:
        self.world, self.scene, self.draws = world, scene, draws

    def caption(self) -> _Caption:
        cap = _Caption()
        template = self._template()
        first = self.draws.pick(self.scene.key_relations)
        if template == "relation":
            self._clause(cap, first)
        elif template == "there":
            there, verb = cap.word("there"), cap.word("is")
            cap.attach(there, verb)
            cap.attach(self._clause(cap, first), verb)
        elif template == "copula":
            self._clause(cap, first, copula=True)
        elif template == "photo":
            article, photo, of = cap.word("a"), cap.word("photo"), cap.word("of")
            subject = self._clause(cap, first)
            cap.attach(article, photo)
            cap.attach(of, subject)
            cap.attach(subject, photo)
        elif template == "two":
            subject = self._clause(cap, first)
            conjunction = cap.word("and")
            second = self._clause(cap, self.draws.pick([k for k in range(len(self.scene.relations)) if k != first]))
            cap.attach(conjunction, second)
            cap.attach(second, subject)
        else:
            self._list(cap)
        return cap

    def _template(self) -> str:
        """A template the scene supports: no plain list when focused, two relations only when there are two."""
        excluded = {"list"} if self.scene.focused else set()
        if len(self.scene.relations) < 2:
            excluded.add("two")
        cumulative = list(accumulate(w if t not in excluded else 0.0 for t, w in zip(self.TEMPLATES, self.WEIGHTS)))
        chosen = bisect_right(cumulative, self.draws.random() * cumulative[-1])
        return self.TEMPLATES[min(chosen, len(self.TEMPLATES) - 1)]

    def _noun_phrase(self, cap: _Caption, i: int) -> int:
        show = self.scene.shown == i
        p = self.world.config.caption_attribute_probability
        adjectives = [self.world.attributes[a][0] for a in self.scene.attributes[i] if show or self.draws.chance(p)]
        return cap.noun_phrase(self.draws.pick(("a", "the")), adjectives, self.world.classes[self.scene.labels[i]][0])

    def _clause(self, cap: _Caption, k: int, copula: bool = False) -> int:
        """"<subject> [is] <predicate> <object>" for relation ``k``; the subject noun's position.

        Without a copula the predicate head depends on the subject noun (the clause's root);
        with one, the subject and "is" depend on the predicate head (the root).
        """
        s, p, o = self.scene.relations[k]
        subject = self._noun_phrase(cap, s)
        verb = cap.word("is") if copula else -1
        head = cap.phrase(self.world.predicates[p])
        obj = self._noun_phrase(cap, o)
        cap.attach(obj, head)
        cap.relations.append([subject, head, obj])
        if copula:
            cap.attach(subject, head)
            cap.attach(verb, head)
        else:
            cap.attach(head, subject)
        return subject

    def _list(self, cap: _Caption) -> None:
        """"<object> and <object> [and <object>]": each "and" depends on the next noun, later nouns on the first."""
        count = min(len(self.scene.labels), self.draws.between(2, 3))
        nouns = []
        for i in self.draws.sample(range(len(self.scene.labels)), count):
            conjunction = cap.word("and") if nouns else -1
            nouns.append(self._noun_phrase(cap, i))
            if conjunction >= 0:
                cap.attach(conjunction, nouns[-1])
                cap.attach(nouns[-1], nouns[0])

    def captions(self, count: int, attempts: int = 4) -> list[_Caption]:
        """``count`` captions, redrawing a few times to avoid repeating one."""
        result: list[_Caption] = []
        seen: set[str] = set()
        while len(result) < count:
            for _ in range(attempts):
                cap = self.caption()
                if " ".join(cap.tokens) not in seen:
                    break
            seen.add(" ".join(cap.tokens))
            result.append(cap)
        return result


# -- features, boxes and files --------------------------------------------------------------------------------


def _visual_graph(world: _World, scene: _Scene) -> dict[str, list]:
    return {
        "labels": [world.classes[c][0] for c in scene.labels],
        "bbox": [list(b) for b in scene.boxes],
        "rels": [[s, world.predicates[p].name, o] for s, p, o in scene.relations],
        "attrs": [[i, world.attributes[a][0]] for i, attrs in enumerate(scene.attributes) for a in attrs],
    }


def _union(a: Box, b: Box) -> Box:
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


def _region_boxes(scenes: list[_Scene], n_regions: int, rng: np.random.Generator, relation_regions: bool = True) -> np.ndarray:
    """(N, n_regions, 4) float32 pixel boxes: objects, relation unions (``relation_regions``), then random background boxes."""
    sizes = np.array([s.size for s in scenes], dtype=np.float64)[:, None, :]
    corner = rng.random((len(scenes), n_regions, 2)) * 0.8 * sizes
    extent = (0.1 + 0.5 * rng.random((len(scenes), n_regions, 2))) * sizes
    boxes = np.round(np.concatenate([corner, np.minimum(corner + extent, sizes)], axis=2), 1)
    for b, scene in enumerate(scenes):
        unions = [_union(scene.boxes[s], scene.boxes[o]) for s, _, o in scene.relations] if relation_regions else []
        structured = scene.boxes + unions
        boxes[b, : len(structured)] = structured
    return boxes.astype(np.float32)


def _feature_recipe(world: _World, scenes: list[_Scene]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sparse prototype weights of the structured regions, as (image, region, prototype, weight) arrays, and their count per image."""
    n_classes, n_attributes = len(world.classes), len(world.attributes)
    entries: list[tuple[int, int, int, float]] = []
    used = np.zeros(len(scenes), dtype=np.int64)
    for b, scene in enumerate(scenes):
        for i, (label, attrs) in enumerate(zip(scene.labels, scene.attributes)):
            entries.append((b, i, label, 1.0))
            entries.extend((b, i, n_classes + a, world.config.attribute_weight) for a in attrs)
        if world.config.setting == "hard":  # no relation regions (module doc, "Settings")
            used[b] = len(scene.labels)
            continue
        for k, (s, p, o) in enumerate(scene.relations):
            region = len(scene.labels) + k
            entries.extend([(b, region, n_classes + n_attributes + p, 1.0), (b, region, scene.labels[s], 0.5), (b, region, scene.labels[o], -0.5)])
        used[b] = len(scene.labels) + len(scene.relations)
    image, region, proto, weight = (np.array(column) for column in zip(*entries))
    return image, region, proto, weight.astype(np.float32), used


def _write_features(
    path: Path, world: _World, scenes: list[_Scene], prototypes: np.ndarray, rng: np.random.Generator, n_regions: int, bar: tqdm, chunk: int = 256
) -> None:
    """``{split}_ims.npy`` written chunk by chunk into a memory map: prototype mixtures plus noise."""
    image, region, proto, weight, used = _feature_recipe(world, scenes)
    n, (k, dim) = len(scenes), prototypes.shape
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, n_regions, dim))
    buffer = np.empty((chunk, n_regions, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        lo, hi = np.searchsorted(image, [start, stop])
        mix = np.zeros((stop - start, n_regions, k), dtype=np.float32)
        np.add.at(mix, (image[lo:hi] - start, region[lo:hi], proto[lo:hi]), weight[lo:hi])
        noise_std = np.where(np.arange(n_regions) < used[start:stop, None], world.config.noise, 1.0).astype(np.float32)
        features = buffer[: stop - start]
        rng.standard_normal(out=features, dtype=np.float32)
        features *= noise_std[..., None]
        features += (mix.reshape(-1, k) @ prototypes).reshape(features.shape)
        out[start:stop] = features
        bar.update(stop - start)
    out.flush()
    del out


def _write_relation_features(path: Path, features_path: Path, scenes: list[_Scene], config: WorldConfig, chunk: int = 256) -> None:
    """``{split}_ims_rels.npy``: each relation's union-box region (region ``n_objects + r``) copied from the features."""
    width = min(config.relations_per_image[1], config.objects_per_image[1] - 1)
    features = np.load(features_path, mmap_mode="r")
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(scenes), width, features.shape[2]))
    for start in range(0, len(scenes), chunk):
        block = np.zeros((min(chunk, len(scenes) - start), width, features.shape[2]), dtype=np.float32)
        for b, scene in enumerate(scenes[start : start + chunk]):
            if config.setting == "hard":  # what the pair's union box shows: both objects, no predicate
                ends = np.array([[s, o] for s, _, o in scene.relations]).reshape(-1, 2)
                block[b, : len(scene.relations)] = (features[start + b, ends[:, 0]] + features[start + b, ends[:, 1]]) / 2
                continue
            first = len(scene.labels)
            block[b, : len(scene.relations)] = features[start + b, first : first + len(scene.relations)]
        out[start : start + len(block)] = block
    out.flush()
    del out


def _share_twin_features(features_path: Path, world: _World, distractors: list[dict[str, Any]], prototypes: np.ndarray) -> None:
    """Hard setting: every twin gets its base image's region features.

    An attribute twin's changed object keeps the base's noise, with the new attribute's
    prototype in place of the old one; every other region is the base's, bit for bit.
    """
    features = np.load(features_path, mmap_mode="r+")
    names = [name for name, _ in world.attributes]
    for record in distractors:
        twin, base = record["image"], record["twin_of"]
        features[twin] = features[base]
        if record["differs"] == "attribute":
            i, old, new = record["object"], names.index(record["before"]), names.index(record["after"])
            shift = world.config.attribute_weight * (prototypes[len(world.classes) + new] - prototypes[len(world.classes) + old])
            features[twin, i] += shift.astype(np.float32)
    features.flush()
    del features


def _dump_json(path: Path, value: Any, indent: int | None = None) -> None:
    """Write ``value`` as json (``json.dumps`` rather than ``json.dump``: only the former uses the C encoder)."""
    path.write_text(json.dumps(value, indent=indent, separators=None if indent else (",", ":")), encoding="utf-8")


def _split_counts(n_images: int, splits: Sequence[float]) -> dict[str, int]:
    if len(splits) != 3 or min(splits) < 0 or abs(sum(splits) - 1.0) > 1e-6:
        raise ValueError(f"splits must be three non-negative fractions summing to 1, got {tuple(splits)}")
    train, dev = int(round(n_images * splits[0])), int(round(n_images * splits[1]))
    counts = dict(zip(SPLITS, (train, dev, n_images - train - dev)))
    if min(counts.values()) < 1:
        raise ValueError(f"{n_images} images leave a split empty with fractions {tuple(splits)}: {counts}")
    return counts


def _write_split(
    out: Path, split: str, world: _World, n: int, seeds: np.random.SeedSequence, prototypes: np.ndarray, n_regions: int, bar: tqdm
) -> tuple[list[str], int]:
    """Every file of one split; its captions and its number of distractor twins."""
    scene_seed, order_seed, box_seed, feature_seed = seeds.spawn(4)
    draws = _Draws(np.random.Generator(np.random.PCG64(scene_seed)))
    order = np.random.Generator(np.random.PCG64(order_seed)).permutation(n)
    scenes, distractors = _split_scenes(world, n, draws, order)
    captions = [cap for scene in scenes for cap in _Captioner(world, scene, draws).captions(CAPTIONS_PER_IMAGE)]
    texts = [" ".join(cap.tokens) for cap in captions]
    (out / f"{split}_caps.txt").write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    _dump_json(out / f"{split}_caps_graphs.json", [cap.graph() for cap in captions])
    _dump_json(out / f"{split}_ims_graphs.json", [_visual_graph(world, s) for s in scenes])
    _dump_json(out / f"{split}_distractors.json", distractors, indent=1)
    np.save(out / f"{split}_ims_size.npy", np.array([s.size for s in scenes], dtype=np.float32))
    hard = world.config.setting == "hard"
    boxes = _region_boxes(scenes, n_regions, np.random.Generator(np.random.PCG64(box_seed)), relation_regions=not hard)
    if hard:  # a twin's background boxes are its base's: only the objects' layout differs
        for record in distractors:
            first = len(scenes[record["image"]].labels)
            boxes[record["image"], first:] = boxes[record["twin_of"], first:]
    np.save(out / f"{split}_ims_bbx.npy", boxes)
    feature_rng = np.random.Generator(np.random.PCG64(feature_seed))
    _write_features(out / f"{split}_ims.npy", world, scenes, prototypes, feature_rng, n_regions, bar)
    if hard:
        _share_twin_features(out / f"{split}_ims.npy", world, distractors, prototypes)
    _write_relation_features(out / f"{split}_ims_rels.npy", out / f"{split}_ims.npy", scenes, world.config)
    return texts, len(distractors)


def holds_dataset(out_dir: str | os.PathLike[str], n_images: int, seed: int, feature_dim: int,
                  world: WorldConfig | None = None) -> bool:
    """Whether ``out_dir`` holds the finished dataset :func:`generate` would write with these arguments
    (and its default regions and splits, as ``sgfused data synth`` writes it).

    ``world.json`` is written last (and removed first), so it marks a finished run; its seed, sizes,
    split counts and world configuration must all be these, and every split's features and captions
    must be there. The same arguments give the same bytes, so such a folder need not be rewritten.
    """
    n_regions, splits = N_REGIONS, DEFAULT_SPLITS
    out = Path(out_dir)
    try:
        recorded = json.loads((out / "world.json").read_text())
    except (OSError, ValueError):
        return False
    expected = {"seed": seed, "feature_dim": feature_dim, "n_regions": n_regions, "images": _split_counts(n_images, splits),
                "config": json.loads(json.dumps(asdict(world or WorldConfig())))}
    files = [out / f"{split}_{kind}" for split in SPLITS for kind in ("ims.npy", "caps.txt")]
    return all(recorded.get(key) == value for key, value in expected.items()) and all(f.is_file() for f in files)


def generate(
    out_dir: str | os.PathLike[str],
    n_images: int,
    seed: int = 0,
    *,
    feature_dim: int = 2048,
    n_regions: int = N_REGIONS,
    splits: Sequence[float] = DEFAULT_SPLITS,
    world: WorldConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write a synthetic dataset of ``n_images`` images (split ``splits`` into train/dev/test) to ``out_dir``.

    Returns a summary: images, captions and distractor twins per split, vocabulary size,
    output folder and the seconds it took. See the module docstring for the files.
    """
    started = time.perf_counter()
    config = world or WorldConfig()
    config.validate(n_regions)
    if feature_dim < 1:
        raise ValueError(f"feature_dim must be >= 1, got {feature_dim}")
    counts = _split_counts(n_images, splits)
    the_world = _World.from_config(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "world.json").unlink(missing_ok=True)  # written last: its presence marks a finished dataset
    world_seed, *split_seeds = np.random.SeedSequence(seed).spawn(1 + len(SPLITS))
    prototypes = np.random.Generator(np.random.PCG64(world_seed)).standard_normal((the_world.n_prototypes, feature_dim), dtype=np.float32)
    texts: dict[str, list[str]] = {}
    distractors: dict[str, int] = {}
    with tqdm(total=n_images, desc="synthetic images", unit="img", disable=not progress) as bar:
        for split, split_seed in zip(SPLITS, split_seeds):
            texts[split], distractors[split] = _write_split(out, split, the_world, counts[split], split_seed, prototypes, n_regions, bar)
    vocab = Vocabulary.build(texts["train"] + texts["dev"], threshold=1)
    vocab.save(out / "vocab.json")
    _dump_json(out / "world.json", the_world.description(seed, feature_dim, n_regions, counts), indent=2)
    return {
        "out_dir": str(out),
        "images": counts,
        "captions": {split: len(texts[split]) for split in SPLITS},
        "distractors": distractors,
        "vocab_size": len(vocab),
        "seconds": round(time.perf_counter() - started, 2),
    }
