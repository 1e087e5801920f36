"""When a generation ends (EOS, a stop string, or the token budget) and its final text."""

from __future__ import annotations

from dataclasses import dataclass, field

from hexswarm.runtime.tokenizer import TextTokenizer


@dataclass
class StopChecker:
    tokenizer: TextTokenizer
    max_new_tokens: int
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # go on past end-of-sequence tokens (a benchmark's exact output length, as vLLM's)

    def finish_reason(self, tokens: list[int]) -> str | None:
        """'eos', 'stop', 'length' or None (go on), after `tokens` were generated."""
        if tokens and not self.ignore_eos and tokens[-1] in self.tokenizer.eos_ids:
            return "eos"
        if self.stop and self._stop_at(self.tokenizer.decode(tokens)) is not None:
            return "stop"
        if len(tokens) >= self.max_new_tokens:
            return "length"
        return None

    def _stop_at(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stop if s) if i >= 0]
        return min(hits) if hits else None

    def text(self, tokens: list[int]) -> str:
        """The output text, cut before the first stop string."""
        text = self.tokenizer.decode(tokens)
        cut = self._stop_at(text) if self.stop else None
        return text if cut is None else text[:cut]
