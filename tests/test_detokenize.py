"""IncrementalDetokenizer (hexswarm/runtime/detokenize.py): streamed pieces add up to decode(all tokens)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hexswarm.model.config import LlamaConfig
from hexswarm.runtime.detokenize import MAX_PENDING, IncrementalDetokenizer
from hexswarm.runtime.tokenizer import TextTokenizer


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model):
    return TextTokenizer(tiny_model, LlamaConfig.from_dir(tiny_model))


def streamed(tokenizer, ids: list[int]) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(t) for t in ids]
    return pieces, detok.flush()


def _check(tokenizer, ids):
    pieces, tail = streamed(tokenizer, ids)
    assert "".join(pieces) + tail == tokenizer.decode(ids), ids




@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_token_sequences_decode_to_the_same_text(tiny_tokenizer, data):
    vocab = tiny_tokenizer._tok.get_vocab_size()
    ids = data.draw(st.lists(st.integers(0, vocab - 1), max_size=60))
    _check(tiny_tokenizer, ids)


def _byte_ids(tokenizer, text: str) -> list[int]:
    """The tiny tokenizer is byte-level: one token per byte of `text`."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = "".join(ch for ch, _ in ByteLevel(add_prefix_space=False).pre_tokenize_str(text))
    return [tokenizer._tok.token_to_id(ch) for ch in alphabet]


def test_multibyte_characters_are_held_back_until_complete(tiny_tokenizer):
    ids = _byte_ids(tiny_tokenizer, "a中b")  # a, E4, B8, AD, b
    assert len(ids) == 5
    pieces, tail = streamed(tiny_tokenizer, ids)
    assert pieces == ["a", "", "", "中", "b"] and tail == ""


def test_an_incomplete_character_at_the_end_comes_out_of_flush(tiny_tokenizer):
    ids = _byte_ids(tiny_tokenizer, "ab中")[:-1]  # the last byte of 中 never comes
    pieces, tail = streamed(tiny_tokenizer, ids)
    assert "".join(pieces) == "ab" and tail == tiny_tokenizer.decode(ids)[2:] and tail.startswith("\ufffd")


def test_a_long_run_of_invalid_bytes_keeps_the_window_short(tiny_tokenizer):
    lone = _byte_ids(tiny_tokenizer, "中")[1]  # a continuation byte alone: invalid UTF-8
    ids = [lone] * 100
    detok = IncrementalDetokenizer(tiny_tokenizer)
    for t in ids:
        detok.push(t)
        assert len(detok.tokens) - detok.prefix_offset <= 2 * MAX_PENDING + 2
    assert "".join([]) + detok.flush() is not None
    pieces, tail = streamed(tiny_tokenizer, ids)
    assert "".join(pieces) + tail == tiny_tokenizer.decode(ids)


def _byte_fallback_tokenizer():
    """A Llama-style SentencePiece tokenizer: <0xNN> byte tokens, '▁' for spaces, first space stripped."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", "▁the", "▁hello", "a", "b", "lo", "▁中", "文", ",", "▁world"]:
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])

    class Wrapped:
        def vocab(self):
            return tok.get_vocab()

        def decode(self, ids):
            return tok.decode(ids, skip_special_tokens=True)

    return Wrapped(), len(vocab)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_byte_fallback_and_leading_space_tokenizer(data):
    tokenizer, vocab = _byte_fallback_tokenizer()
    # bias towards byte tokens of multi-byte characters and the '▁' pieces
    special = list(range(3, 3 + 256)) + list(range(259, vocab)) * 8
    ids = data.draw(st.lists(st.sampled_from(special) | st.integers(0, vocab - 1), max_size=40))
    _check(tokenizer, ids)


def test_byte_fallback_pieces_hold_back_and_keep_inner_spaces():
    tokenizer, vocab = _byte_fallback_tokenizer()
    ids = [259 + 1, 3 + 0xE4, 3 + 0xB8, 3 + 0xAD, 259 + 9]  # ▁the, 中 as 3 bytes, ▁world
    pieces, tail = streamed(tokenizer, ids)
    # the run of byte tokens could still turn invalid (then all of it is U+FFFD): held until ▁world ends it
    assert pieces == ["the", "", "", "", "中 world"] and tail == ""
    assert "".join(pieces) == tokenizer.decode(ids)
