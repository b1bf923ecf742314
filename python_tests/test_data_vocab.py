"""Tokenizer (NLTK-compatible splitting) and vocabulary (build order, SCAN json files, bad files)."""

import json
import random

import pytest

from sgfused.data.vocab import END, PAD, START, UNK, Vocabulary, VocabularyError, tokenize


@pytest.mark.parametrize(
    "text, tokens",
    [
        ("A dog.", ["a", "dog", "."]),
        ("A Dog runs, jumps; and barks!", ["a", "dog", "runs", ",", "jumps", ";", "and", "barks", "!"]),
        ("I don't know", ["i", "do", "n't", "know"]),
        ("the dog's bone", ["the", "dog", "'s", "bone"]),
        ("they're here, we'll see, i'm ok, you've, he'd", ["they", "'re", "here", ",", "we", "'ll", "see", ",", "i", "'m", "ok", ",", "you", "'ve", ",", "he", "'d"]),
        ("can't won't", ["ca", "n't", "wo", "n't"]),
        ("two dogs' toys", ["two", "dogs", "'", "toys"]),
        ("a man in a t-shirt and/or o'clock", ["a", "man", "in", "a", "t-shirt", "and/or", "o'clock"]),
        ("at 10:30, 1,000 and 3.5 m", ["at", "10:30", ",", "1,000", "and", "3.5", "m"]),
        ("a (red) [big] {x} <y>", ["a", "(", "red", ")", "[", "big", "]", "{", "x", "}", "<", "y", ">"]),
        ('he said "hi there" ok', ["he", "said", "``", "hi", "there", "''", "ok"]),
        ("a sign saying 'stop'.", ["a", "sign", "saying", "'", "stop", "'", "."]),
        ("wait... what? 50% off #1 & @home", ["wait", "...", "what", "?", "50", "%", "off", "#", "1", "&", "@", "home"]),
        ("a dog. a cat.", ["a", "dog", ".", "a", "cat", "."]),
        ("the st. louis arch in the u.s.", ["the", "st.", "louis", "arch", "in", "the", "u.s", "."]),
        ("(at the end.)", ["(", "at", "the", "end", ".", ")"]),
        ("hello -- world", ["hello", "--", "world"]),
        ("  spaced   out  ", ["spaced", "out"]),
        ("", []),
    ],
)
def test_tokenize_cases(text, tokens):
    assert tokenize(text) == tokens


def test_tokenize_equals_split_on_plain_words():
    rng = random.Random(0)
    words = ["a", "dog", "cannot", "gonna", "wanna", "gotta", "lemme", "gimme", "st", "mr", "x", "the", "tshirt"]
    for _ in range(200):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 10)))
        assert tokenize(text) == text.split()


def test_special_tokens_and_call():
    vocab = Vocabulary(["dog", "cat"])
    assert [vocab(w) for w in (PAD, START, END, UNK, "dog", "cat", "zebra")] == [0, 1, 2, 3, 4, 5, 3]
    assert len(vocab) == 6
    assert vocab.idx2word[5] == "cat"


def test_encode_decode():
    vocab = Vocabulary(["a", "dog"])
    ids = vocab.encode(["a", "red", "dog"])
    assert ids == [1, 4, 3, 5, 2]
    assert vocab.decode(ids + [0, 0]) == ["a", UNK, "dog"]


def test_duplicate_words_rejected():
    with pytest.raises(VocabularyError, match="duplicate word 'dog'"):
        Vocabulary(["dog", "cat", "dog"])
    with pytest.raises(VocabularyError, match="duplicate word '<unk>'"):
        Vocabulary([UNK])


def test_build_threshold_and_order():
    captions = ["bb a cc.", "a bb cc.", "a cc. dd", "a bb", "zz zz zz"]
    # counts: a 4, bb 3, cc 3, . 3, zz 3, dd 1
    vocab = Vocabulary.build(captions, threshold=3)
    assert [vocab.idx2word[i] for i in range(4, len(vocab))] == ["a", ".", "bb", "cc", "zz"]
    assert vocab("dd") == 3
    assert len(Vocabulary.build(captions, threshold=4)) == 5
    assert len(Vocabulary.build(captions, threshold=1)) == 10
    with pytest.raises(ValueError, match="threshold must be >= 1, got 0"):
        Vocabulary.build(captions, threshold=0)


def test_save_load_round_trip(tmp_path):
    vocab = Vocabulary.build(["a red dog .", "a red cat", "a café"], threshold=1)
    path = tmp_path / "vocab.json"
    vocab.save(path)
    layout = json.loads(path.read_text(encoding="utf-8"))
    assert set(layout) == {"word2idx", "idx2word", "idx"}
    assert layout["idx"] == len(vocab) == 10
    assert layout["idx2word"]["4"] == "a"
    loaded = Vocabulary.load(path)
    assert loaded.word2idx == vocab.word2idx
    assert loaded.idx2word == vocab.idx2word


def test_load_scan_style_file(tmp_path):
    # Written by hand in the layout of the vocab json files released with SCAN / SGRAF.
    path = tmp_path / "f30k_precomp_vocab.json"
    path.write_text(
        '{"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "two": 4, "young": 5, "guys": 6},'
        ' "idx2word": {"0": "<pad>", "1": "<start>", "2": "<end>", "3": "<unk>", "4": "two", "5": "young", "6": "guys"},'
        ' "idx": 7}'
    )
    vocab = Vocabulary.load(path)
    assert len(vocab) == 7
    assert vocab.encode(tokenize("Two young guys with hats.")) == [1, 4, 5, 6, 3, 3, 3, 2]


def _write(tmp_path, layout) -> str:
    path = tmp_path / "bad_vocab.json"
    path.write_text(json.dumps(layout))
    return str(path)


SPECIALS = {PAD: 0, START: 1, END: 2, UNK: 3}


@pytest.mark.parametrize(
    "layout, message",
    [
        ([1, 2], "expected a json object with 'word2idx' and 'idx2word', got list"),
        ({"word2idx": SPECIALS}, "expected a json object with 'word2idx' and 'idx2word', got \\['word2idx'\\]"),
        ({"word2idx": SPECIALS, "idx2word": ["<pad>"]}, "must be json objects"),
        ({"word2idx": SPECIALS, "idx2word": {"zero": PAD}}, "'idx2word' keys must be integers"),
        ({"word2idx": {**SPECIALS, "dog": 4}, "idx2word": {str(i): w for w, i in SPECIALS.items()}}, "must be inverse maps"),
        ({"word2idx": {**SPECIALS, "dog": 5}, "idx2word": {**{str(i): w for w, i in SPECIALS.items()}, "5": "dog"}}, "ids 0..n-1"),
        ({"word2idx": {**SPECIALS, "dog": 4}, "idx2word": {**{str(i): w for w, i in SPECIALS.items()}, "4": "cat"}}, "inverse maps"),
        ({"word2idx": SPECIALS, "idx2word": {str(i): w for w, i in SPECIALS.items()}, "idx": 9}, "'idx' is 9, expected the word count 4"),
        ({"word2idx": {"a": 0, "b": 1, "c": 2, "d": 3}, "idx2word": {"0": "a", "1": "b", "2": "c", "3": "d"}}, "ids 0-3 must be"),
    ],
)
def test_bad_vocab_files(tmp_path, layout, message):
    path = _write(tmp_path, layout)
    with pytest.raises(VocabularyError, match=message) as info:
        Vocabulary.load(path)
    assert path in str(info.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Vocabulary.load(tmp_path / "nope.json")
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(VocabularyError, match="broken.json.*not readable json"):
        Vocabulary.load(path)
