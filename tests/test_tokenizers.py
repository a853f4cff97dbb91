"""Tokenizers: lossless round trips (hypothesis), special tokens, unknown characters,
deterministic BPE training, JSON save/load."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nn.tokenizers import (BOS_ID, CHUNK_PATTERN, EOS_ID, MASK_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID,
                           BPETokenizer, CharTokenizer, load_tokenizer)

TEXT = ("Return the number of items in the container.  If the container is empty, "
        "return 0.\n\n    >>> len([1, 2, 3])\n    3\nThe __len__ method returns an int, "
        "e.g. len('héllo') == 5 — naïve café.\t\n") * 3

texts = st.text(max_size=60)
docs = st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=6)


@given(docs, st.integers(261, 330))
@settings(max_examples=40)
def test_bpe_round_trips_the_texts_it_was_trained_on(corpus, vocab):
    tok = BPETokenizer.train(corpus, vocab, min_frequency=1)
    for t in corpus:
        ids = tok.encode(t)
        assert all(5 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == t
    assert tok.vocab_size <= vocab


@given(texts)
@settings(max_examples=60)
def test_bpe_round_trips_any_text_even_unseen_characters(text):
    tok = _trained_bpe()
    assert tok.decode(tok.encode(text)) == text
    assert UNK_ID not in tok.encode(text)          # byte fallback, never <unk>


@given(docs)
@settings(max_examples=40)
def test_char_tokenizer_round_trips_its_alphabet(corpus):
    tok = CharTokenizer.train(corpus)
    for t in corpus:
        assert tok.decode(tok.encode(t)) == t
        assert len(tok.encode(t)) == len(t)


_BPE: list = []


def _trained_bpe() -> BPETokenizer:
    if not _BPE:
        _BPE.append(BPETokenizer.train([TEXT], 300))
    return _BPE[0]


def test_bpe_merges_frequent_pairs_and_compresses():
    tok = _trained_bpe()
    assert tok.vocab_size == 300
    ids = tok.encode(TEXT)
    assert len(ids) < 0.6 * len(TEXT.encode())           # 39 merges: 0.55
    assert " the" in {tok.token(i) for i in range(261, 300)}
    assert tok.decode(ids) == TEXT


def test_bpe_training_is_deterministic_and_ties_break_by_smaller_ids():
    docs = ["ab", "cd", "ab cd", "x"]
    a = BPETokenizer.train(docs, 264, min_frequency=1)
    assert a.merges == BPETokenizer.train(docs[::-1], 264, min_frequency=1).merges
    byte = lambda c: ord(c) + 5          # noqa: E731
    # (a, b) and (c, d) both occur twice, (" ", c) once: the smaller ids win the tie
    assert a.merges[:2] == [(byte("a"), byte("b")), (byte("c"), byte("d"))]
    assert BPETokenizer.train([TEXT], 320).merges == BPETokenizer.train([TEXT], 320).merges


def test_bpe_respects_min_frequency_and_validates_vocab_size():
    tok = BPETokenizer.train(["abc"], 400, min_frequency=2)
    assert tok.vocab_size == 261                       # no pair occurs twice
    with pytest.raises(ValueError, match=">= 261"):
        BPETokenizer.train(["abc"], 100)
    with pytest.raises(ValueError, match="not yet defined"):
        BPETokenizer([(5, 400)])


def test_merges_never_cross_chunks():
    tok = BPETokenizer.train(["a.b a.b a.b a.b"], 280, min_frequency=1)
    assert all(not (tok.token(i).endswith(".") and len(tok.token(i)) > 1 and tok.token(i)[0].isalpha())
               for i in range(261, tok.vocab_size))
    import re
    for t in ["x_y = f(3.14)  # note", "  \n\t ", "é²_9"]:
        assert "".join(re.findall(CHUNK_PATTERN, t)) == t


def test_special_tokens_have_fixed_ids_and_are_never_made_from_text():
    for tok in (CharTokenizer.train(["<mask> hello"]), _trained_bpe()):
        assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)
        assert [tok.token(i) for i in range(5)] == list(SPECIAL_TOKENS)
        ids = tok.encode("<mask>", add_bos=True, add_eos=True)
        assert ids[0] == BOS_ID and ids[-1] == EOS_ID and MASK_ID not in ids
        assert tok.decode(ids) == "<mask>"
        assert tok.decode([BOS_ID, PAD_ID, MASK_ID, EOS_ID]) == ""
        assert tok.decode([BOS_ID, MASK_ID], skip_special=False) == "<bos><mask>"
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.decode([tok.vocab_size])
        with pytest.raises(TypeError, match="expected str"):
            tok.encode(b"bytes")


def test_char_tokenizer_maps_unknown_characters_to_unk():
    tok = CharTokenizer.train(["abc "])
    ids = tok.encode("cab z!")
    assert ids.count(UNK_ID) == 2
    assert tok.decode(ids) == "cab \ufffd\ufffd"
    assert tok.decode(ids, skip_special=False) == "cab <unk><unk>"


def test_bpe_decodes_a_broken_utf8_sequence_with_replacement():
    tok = _trained_bpe()
    ids = tok.encode("€")                 # three bytes, never seen in training
    assert len(ids) == 3
    assert tok.decode(ids[:1]) == "\ufffd"


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_load_round_trip(tmp_path, kind):
    tok = CharTokenizer.train([TEXT]) if kind == "char" else _trained_bpe()
    path = tmp_path / "tok.json"
    tok.save(path)
    data = json.loads(path.read_text())
    assert data["type"] == kind and data["special_tokens"] == list(SPECIAL_TOKENS)
    again = load_tokenizer(path)
    assert type(again) is type(tok) and again.vocab_size == tok.vocab_size
    assert again.encode(TEXT) == tok.encode(TEXT)
    assert type(tok).load(path).vocab_size == tok.vocab_size
    other = CharTokenizer if kind == "bpe" else BPETokenizer
    with pytest.raises(ValueError, match="not a"):
        other.load(path)
    (tmp_path / "bad.json").write_text('{"type": "wordpiece"}')
    with pytest.raises(ValueError, match="not a tokenizer file"):
        load_tokenizer(tmp_path / "bad.json")


def test_char_tokenizer_saves_awkward_characters(tmp_path):
    tok = CharTokenizer.train(['"\\\n\x00\ud800é'])
    tok.save(tmp_path / "t.json")
    again = load_tokenizer(tmp_path / "t.json")
    assert again.chars == tok.chars


def test_encode_batch_pads_and_truncates():
    tok = CharTokenizer.train(["abcd"])
    arr = tok.encode_batch(["ab", "abcd", ""], add_eos=True)
    assert arr.dtype == np.int64 and arr.shape == (3, 5)
    assert arr[0].tolist() == tok.encode("ab", add_eos=True) + [PAD_ID, PAD_ID]
    assert arr[2].tolist() == [EOS_ID] + [PAD_ID] * 4
    assert tok.encode_batch(["abcd"], length=2).tolist() == [tok.encode("ab")]
