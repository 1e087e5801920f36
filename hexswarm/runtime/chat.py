"""A checkpoint's chat template, rendered in jinja2's immutable sandbox as transformers
renders it (`apply_chat_template(..., add_generation_prompt=True)`).

The template comes from a GGUF's `tokenizer.chat_template` metadata or a HF folder's
tokenizer_config.json (`chat_template`), chat_template.jinja or chat_template.json.
Used by `hexswarm submit --chat`; api/http_api.py renders the same way for
/v1/chat/completions (its `ChatTemplate` reads HF folders only)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from hexswarm.errors import UserError


class ChatTemplate:
    def __init__(self, source: str | None, bos: str | None, eos: str | None):
        self.source = source
        self.bos = bos or ""
        self.eos = eos or ""
        self._compiled = None

    @classmethod
    def for_model(cls, model: str | Path) -> "ChatTemplate":
        from hexswarm.model.source import load_config
        from hexswarm.runtime.tokenizer import TextTokenizer

        tok = TextTokenizer(model, load_config(model))
        source = tok.chat_template
        d = Path(model)
        if source is None and d.is_dir() and (d / "chat_template.jinja").is_file():
            source = (d / "chat_template.jinja").read_text()
        if source is None and d.is_dir() and (d / "chat_template.json").is_file():
            try:
                source = json.loads((d / "chat_template.json").read_text()).get("chat_template")
            except (OSError, ValueError, AttributeError):
                source = None
        if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default") or next(iter(named.values()), None)
        source = source if isinstance(source, str) and source else None
        return cls(source, tok.bos_text, tok.eos_text)

    def _template(self):
        if self._compiled is None:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str):
                raise TemplateError(message)

            def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
                return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                  sort_keys=sort_keys)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
            self._compiled = env.from_string(self.source)
        return self._compiled

    def render(self, messages: list[dict]) -> str:
        """The prompt text for `messages` ([{"role", "content"}]), ending with the assistant's turn."""
        if self.source is None:
            raise UserError("this model's checkpoint has no chat template; send the prompt without --chat")
        from jinja2 import TemplateError

        try:
            return self._template().render(messages=messages, add_generation_prompt=True, bos_token=self.bos,
                                           eos_token=self.eos, tools=None, documents=None)
        except TemplateError as e:
            raise UserError(f"the chat template refused these messages: {e}") from None
