"""Caption tokenizer and word vocabulary, compatible with the SCAN / VSE++ / SGRAF vocab files.

Those projects built their vocabularies with ``nltk.tokenize.word_tokenize(caption.lower())``
and released them as json (``{"word2idx": ..., "idx2word": ..., "idx": n}``). To reuse
their files and checkpoints the ids of a caption must come out the same, so
:func:`tokenize` reproduces NLTK's treebank splitting for caption-like English text
without needing NLTK or its downloaded punkt data, and :class:`Vocabulary` reads and
writes the same json layout.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Iterable, Sequence

from .._files import read_json

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)  # ids 0, 1, 2, 3

# Abbreviations whose period stays attached mid-text (NLTK's punkt model knows these).
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs"})


def _rules(*rules: tuple[str, str]) -> tuple[tuple[re.Pattern[str], str], ...]:
    """Compiled (pattern, replacement) pairs."""
    return tuple((re.compile(pattern), replacement) for pattern, replacement in rules)


# Applied in order to " " + text + " ", before sentence-final periods are split off.
_PUNCTUATION = _rules(
    # Double quotes become `` when they open (text start, after a space or a bracket) and '' otherwise.
    (r"(^|[\s(\[{<])(\"|'')", r"\1 `` "),
    (r"\"|''", " '' "),
    (r"`+|[«“‘„»”’]", r" \g<0> "),
    # A single quote opening a word ("'stop'"), unless it starts a clitic ("'s", "'re" ...).
    (r"(?<!\w)'(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)", "' "),
    # Characters that are always a token of their own (incl. en / em dashes).
    (r"[;@#$%&?!*()\[\]{}<>\u2012-\u2015]|--|\.{2,}", r" \g<0> "),
    # Commas and colons split off unless a digit follows ("1,000", "10:30").
    (r"[,:](?!\d)", r" \g<0> "),
)
# Applied after the periods: word endings.
_ENDINGS = _rules(
    # A single quote ending a word ("dogs' toys").
    (r"(?<=[^'\s])'(?=\s|$)", " ' "),
    # Clitics: do|n't, dog|'s, they|'re ...
    (r"(?<=[^'\s])(n't|'s|'m|'d|'ll|'re|'ve)(?=\s|$)", r" \1"),
)
# Captions of plain words, commas and a final period (most of them) split directly, same result.
_PLAIN = re.compile(r"[a-z ,]*\.?\s*")
# A word-final period (a space or the end of the text follows) may end a sentence.
_PERIOD = re.compile(r"(?<=[^.\s])\.(?=\s|$)")


def _is_abbreviation(text: str, period: int) -> bool:
    """Whether the period at ``text[period]`` closes an abbreviation or an initial ("st.", "j.", "u.s.")."""
    word = text[text.rfind(" ", 0, period) + 1 : period]
    return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()) or "." in word


def _split_periods(text: str) -> str:
    """Split sentence-final periods off their word; the last one of the text always splits."""
    end = len(text.rstrip(" ')]}>»”’"))  # closing brackets and quotes may follow the last period

    def split(match: re.Match[str]) -> str:
        keep = match.end() < end and _is_abbreviation(text, match.start())
        return "." if keep else " . "

    return _PERIOD.sub(split, text)


def tokenize(text: str) -> list[str]:
    """Lowercase ``text`` and split it into words and punctuation like ``nltk.word_tokenize``.

    Matches NLTK's (treebank) tokenizer on caption-like English: punctuation is its own
    token (``"dog."`` -> ``dog .``; ``, ; : ! ? ( ) ...`` split, but ``1,000`` and ``10:30``
    stay whole), clitics split (``don't`` -> ``do n't``, ``dog's`` -> ``dog 's``), hyphenated
    words, slashes and inner apostrophes stay whole (``t-shirt``, ``and/or``, ``o'clock``),
    double quotes become ``\\`\\``` / ``''``. Periods end a word when a space or the end of text
    follows, except after a few common abbreviations, single letters and dotted words
    (``st.``, ``j.``, ``u.s.``) which keep theirs unless they end the text.

    Differs from NLTK in rare cases only: NLTK's learned punkt abbreviation list is replaced
    by the small fixed one above; NLTK's splitting of ``cannot``, ``gonna``, ``wanna``,
    ``gotta``, ``gimme``, ``lemme`` and ``'tis``/``'twas`` is not done (so that lowercase
    alphabetic words are never split: for such text ``tokenize(s) == s.split()``). Opening
    single quotes split off as in NLTK >= 3.8 (``'stop'`` -> ``' stop '``); older NLTK, used
    for the released vocabularies, kept most of them attached (``'stop``).
    """
    text = text.lower()
    if _PLAIN.fullmatch(text):
        return text.replace(",", " , ").replace(".", " . ").split()
    text = " " + text + " "
    for pattern, replacement in _PUNCTUATION:
        text = pattern.sub(replacement, text)
    text = _split_periods(" ".join(text.split()))
    for pattern, replacement in _ENDINGS:
        text = pattern.sub(replacement, text)
    return text.split()


class VocabularyError(ValueError):
    """A vocabulary file or word list that does not have the expected layout."""


class Vocabulary:
    """Bidirectional word <-> id map with ``<pad>``=0, ``<start>``=1, ``<end>``=2, ``<unk>``=3."""

    def __init__(self, words: Sequence[str] = ()) -> None:
        """A vocabulary of the four special tokens followed by ``words`` (ids 4, 5, ... in order)."""
        self.word2idx: dict[str, int] = {}
        self.idx2word: dict[int, str] = {}
        for word in (*SPECIAL_TOKENS, *words):
            if word in self.word2idx:
                raise VocabularyError(f"Vocabulary: duplicate word {word!r}")
            self.word2idx[word] = len(self.idx2word)
            self.idx2word[len(self.idx2word)] = word

    def __len__(self) -> int:
        return len(self.word2idx)

    def __call__(self, word: str) -> int:
        """The id of ``word`` (3 = ``<unk>`` for unknown words)."""
        return self.word2idx.get(word, 3)

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words)"

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Ids of ``tokens`` wrapped in ``<start>`` ... ``<end>``."""
        return [1, *(self.word2idx.get(token, 3) for token in tokens), 2]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words of ``ids``, dropping ``<pad>``, ``<start>`` and ``<end>`` (unknown ids raise KeyError)."""
        return [self.idx2word[int(i)] for i in ids if int(i) > 2]

    @classmethod
    def build(cls, captions: Iterable[str], threshold: int = 4) -> "Vocabulary":
        """The words of :func:`tokenize`-d ``captions`` seen at least ``threshold`` times.

        Word ids are deterministic: by descending count, ties in alphabetical order.
        """
        if threshold < 1:
            raise ValueError(f"Vocabulary.build: threshold must be >= 1, got {threshold}")
        counts = Counter(token for caption in captions for token in tokenize(caption))
        kept = sorted((w for w, c in counts.items() if c >= threshold and w not in SPECIAL_TOKENS), key=lambda w: (-counts[w], w))
        return cls(kept)

    def to_dict(self) -> dict:
        """The SCAN json layout ``{"word2idx": {...}, "idx2word": {"0": ...}, "idx": n}`` (what checkpoints carry)."""
        return {"word2idx": self.word2idx, "idx2word": {str(i): w for i, w in self.idx2word.items()}, "idx": len(self)}

    @classmethod
    def from_dict(cls, layout: dict, source: str = "checkpoint") -> "Vocabulary":
        """The inverse of :meth:`to_dict`, with the same checks as :meth:`load`."""
        return cls._from_layout(layout, source)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` as json."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, ensure_ascii=False)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Vocabulary":
        """Read a vocabulary json written by :meth:`save` or released with SCAN / SGRAF."""
        return cls._from_layout(read_json(path, "vocabulary", VocabularyError), os.fspath(path))

    @classmethod
    def _from_layout(cls, layout: object, source: str) -> "Vocabulary":
        """Check the json layout (keys, ids 0..n-1, both maps agree, special tokens) and build from it."""
        if not isinstance(layout, dict) or not {"word2idx", "idx2word"} <= layout.keys():
            got = sorted(layout) if isinstance(layout, dict) else type(layout).__name__
            raise VocabularyError(f"vocabulary file {source!r}: expected a json object with 'word2idx' and 'idx2word', got {got}")
        word2idx, idx2word = layout["word2idx"], layout["idx2word"]
        if not isinstance(word2idx, dict) or not isinstance(idx2word, dict):
            raise VocabularyError(f"vocabulary file {source!r}: 'word2idx' and 'idx2word' must be json objects")
        try:
            words = {int(i): w for i, w in idx2word.items()}
        except ValueError:
            raise VocabularyError(f"vocabulary file {source!r}: 'idx2word' keys must be integers") from None
        n = len(word2idx)
        if sorted(words) != list(range(n)) or any(word2idx.get(w) != i for i, w in words.items()):
            raise VocabularyError(
                f"vocabulary file {source!r}: 'word2idx' ({n} words) and 'idx2word' ({len(idx2word)} ids) "
                "must be inverse maps over ids 0..n-1"
            )
        if "idx" in layout and layout["idx"] != n:
            raise VocabularyError(f"vocabulary file {source!r}: 'idx' is {layout['idx']!r}, expected the word count {n}")
        specials = tuple(words.get(i) for i in range(4))
        if specials != SPECIAL_TOKENS:
            raise VocabularyError(f"vocabulary file {source!r}: ids 0-3 must be {list(SPECIAL_TOKENS)}, got {list(specials)}")
        return cls([words[i] for i in range(4, n)])
