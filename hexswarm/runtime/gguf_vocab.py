"""A `tokenizers.Tokenizer` built from a GGUF file's vocabulary metadata.

A GGUF has no tokenizer.json: it stores the tokens, their types and the BPE merges under
`tokenizer.ggml.*`.  This builds the tokenizer transformers builds from the same metadata
(`integrations/gguf/gguf_tokenizer_mapping.py`: byte-level BPE with GPT-2's pre-tokenizer,
control tokens added as special tokens, user-defined ones as added tokens), with the
`tokenizers` library only: transformers is not a runtime dependency.
"""

from __future__ import annotations

from functools import lru_cache

from hexswarm.errors import UserError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types

# llama.cpp pre-tokenizer names whose split differs from GPT-2's (as transformers maps them)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {name: _LLAMA3_SPLIT for name in
                        ("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe")}


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (the byte-level BPE alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    spelled, n = {}, 0
    for b in range(256):
        if b in keep:
            spelled[b] = chr(b)
        else:
            spelled[b] = chr(256 + n)
            n += 1
    return spelled


def tokenizer_from_gguf(ckpt):
    """The tokenizers.Tokenizer a GGUFCheckpoint's metadata describes."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = ckpt.meta("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(f"{ckpt.path}: GGUF tokenizer model {kind!r} is not supported (hexswarm reads byte-level BPE, 'gpt2')")
    tokens = ckpt.meta("tokenizer.ggml.tokens") or []
    merges = ckpt.meta("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise UserError(f"{ckpt.path}: GGUF metadata lacks the tokenizer vocabulary or merges")
    types = ckpt.meta("tokenizer.ggml.token_type") or []
    alphabet = set(byte_alphabet().values())
    spelling = byte_alphabet()
    vocab = {}
    for i, t in enumerate(tokens):
        if not set(t) <= alphabet:  # a token stored as raw text: respell it in the byte alphabet
            t = "".join(spelling[b] for b in t.encode("utf-8"))
        vocab.setdefault(t, i)
    tok = Tokenizer(models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges], dropout=None, unk_token=None,
                               continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                               byte_fallback=False))
    split = PRE_TOKENIZER_SPLITS.get(ckpt.meta("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # control tokens spelled outside the byte alphabet are llama.cpp mislabels (transformers skips them too)
    special = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
               if ty == CONTROL and set(t) <= alphabet]
    if special:
        tok.add_special_tokens(special)
    plain = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types)
             if ty == USER_DEFINED and t in vocab]
    if plain:
        tok.add_tokens(plain)
    return tok
