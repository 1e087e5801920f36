"""Token ids -> text, one token at a time, at constant cost per token.

Decoding the whole output again for every new token costs O(n) per token, O(n^2) per request.
`IncrementalDetokenizer` decodes only a short window of recent tokens (the technique of vLLM's
detokenizer and transformers' TextStreamer):

* `prefix_offset..read_offset` are tokens whose text was already emitted; they are decoded again as
  context, because a window's text is not the concatenation of its tokens' texts (SentencePiece
  decoders strip the first token's leading space; byte tokens only form a character together).
* `read_offset..` are tokens not yet emitted.  New text = decode(prefix..end) minus decode(prefix..read).
* Text that ends in U+FFFD may be an incomplete UTF-8 character whose remaining bytes come with the next
  tokens: it is held back until a later token completes it, or until `flush()` at the end.
* Byte-fallback tokens (`<0xE4>`, SentencePiece Llama tokenizers) are decoded run by run: a run of them that
  is not valid UTF-8 as a whole becomes one U+FFFD per byte, even the bytes of characters complete so far.
  So a trailing run that is still valid is held back until a token that is not a byte ends it (or the run
  turns invalid, which is final).  The window then spans that run: real outputs have runs of a few bytes.

The concatenation of every `push` and the final `flush` equals `tokenizer.decode(all tokens)`
(tests/test_detokenize.py checks this with hypothesis over random token sequences).
"""

from __future__ import annotations

import re

REPLACEMENT = "\ufffd"
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# Pending tokens beyond which a run of U+FFFD is committed up to its last character (see `push`):
# a UTF-8 character is at most 4 bytes, so a longer run is invalid bytes, not one character in flight.
MAX_PENDING = 8


def byte_tokens(tokenizer) -> frozenset[int]:
    """Ids of the tokenizer's byte-fallback tokens (<0x..>), found once per tokenizer: a scan of the
    vocabulary per request cost a busy entry node milliseconds of its event loop each time."""
    found = getattr(tokenizer, "_byte_tokens", None)
    if found is None:
        vocab = tokenizer.vocab() if hasattr(tokenizer, "vocab") else {}
        found = frozenset(i for piece, i in vocab.items() if BYTE_TOKEN.fullmatch(piece))
        try:
            tokenizer._byte_tokens = found
        except AttributeError:  # a tokenizer that takes no attributes: scanned each time
            pass
    return found


class IncrementalDetokenizer:
    """`push(token_id)` returns the text that token adds (possibly ""); `flush()` the held-back rest.

    `tokenizer` has `decode(ids) -> str` (hexswarm's TextTokenizer, or anything alike)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.byte_tokens = byte_tokens(tokenizer)
        self._silent_cache: dict[int, bool] = {}
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text_len = 0  # characters emitted so far (callers use it to line up with final texts)

    def _window(self, start: int, stop: int | None = None) -> str:
        return self.tokenizer.decode(self.tokens[start:stop]) if start < (stop or len(self.tokens)) else ""

    def push(self, token_id: int) -> str:
        self.tokens.append(int(token_id))
        if self._in_valid_byte_run():
            return ""
        prefix_text = self._window(self.prefix_offset, self.read_offset)
        new_text = self._window(self.prefix_offset)
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            return self._commit(new_text[len(prefix_text):], len(self.tokens))
        if len(self.tokens) - self.read_offset > MAX_PENDING:
            # A long run of invalid bytes: without this the window (and the cost per token) would grow
            # with the run.  Every character of a decode but the last is final once a later character
            # follows it, so the text up to one token back is safe to emit when it is a proper prefix.
            stop = len(self.tokens) - 1
            head = self._window(self.prefix_offset, stop)
            if len(prefix_text) < len(head) < len(new_text) and new_text.startswith(head):
                return self._commit(head[len(prefix_text):], stop)
        return ""

    def _in_valid_byte_run(self) -> bool:
        """True while the tokens end in a run of byte tokens whose bytes are valid UTF-8 so far.
        Tokens that decode to nothing (skipped special tokens) do not end a run: the decoder never sees them."""
        if not self.byte_tokens:
            return False
        end = len(self.tokens)
        while end > self.read_offset and self._silent(self.tokens[end - 1]):
            end -= 1
        if end == self.read_offset or self.tokens[end - 1] not in self.byte_tokens:
            return False
        start = end - 1
        while start > self.read_offset and (self.tokens[start - 1] in self.byte_tokens
                                            or self._silent(self.tokens[start - 1])):
            start -= 1
        return REPLACEMENT not in self._window(start)

    def _silent(self, token: int) -> bool:
        silent = self._silent_cache.get(token)
        if silent is None:
            silent = self._silent_cache[token] = token not in self.byte_tokens and self.tokenizer.decode([token]) == ""
        return silent

    def _commit(self, text: str, stop: int) -> str:
        self.prefix_offset, self.read_offset = self.read_offset, stop
        self.text_len += len(text)
        return text

    def flush(self) -> str:
        """The text held back at the end (an incomplete character, shown as U+FFFD as decode shows it)."""
        prefix_text = self._window(self.prefix_offset, self.read_offset)
        new_text = self._window(self.prefix_offset)
        if len(new_text) <= len(prefix_text):
            return ""
        return self._commit(new_text[len(prefix_text):], len(self.tokens))
