"""The checkpoint's own tokenizer (`tokenizer.json`, or a GGUF's vocabulary), with its BOS/EOS conventions."""

from __future__ import annotations

import json
from pathlib import Path

from hexswarm.errors import UserError
from hexswarm.model.config import LlamaConfig


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    return d if isinstance(d, dict) else {}


def _token_text(value) -> str | None:
    # tokenizer_config may hold "</s>" or {"content": "</s>", ...}
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class TextTokenizer:
    """The tokenizer of a HF folder (tokenizer.json + tokenizer_config.json) or of a GGUF
    file (built from its metadata, see gguf_vocab.py), with BOS/EOS and the chat template."""

    def __init__(self, model_dir: str | Path, cfg: LlamaConfig):
        from hexswarm.model.gguf import find_gguf

        gguf_path = find_gguf(model_dir)
        if gguf_path is not None:
            self._from_gguf(gguf_path, cfg)
        else:
            self._from_folder(Path(model_dir), cfg)

    def _from_gguf(self, path: Path, cfg: LlamaConfig) -> None:
        from hexswarm.model.gguf import open_gguf
        from hexswarm.runtime.gguf_vocab import tokenizer_from_gguf

        ckpt = open_gguf(path)
        self._tok = tokenizer_from_gguf(ckpt)
        self.chat_template = ckpt.chat_template
        self.bos_id = cfg.bos_token_id
        self.add_bos = bool(ckpt.meta("tokenizer.ggml.add_bos_token", False))
        self.eos_ids = frozenset(cfg.eos_token_ids)
        self.bos_text = self._tok.id_to_token(self.bos_id) if self.bos_id is not None else None
        self.eos_text = self._tok.id_to_token(cfg.eos_token_ids[0]) if cfg.eos_token_ids else None

    def _from_folder(self, d: Path, cfg: LlamaConfig) -> None:
        from tokenizers import Tokenizer

        path = d / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{path} is missing (hexswarm reads the fast tokenizer file)")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:
            raise UserError(f"{path} is corrupt: {e}") from None
        tcfg = _read_json(d / "tokenizer_config.json")
        gen = _read_json(d / "generation_config.json")
        self.chat_template = tcfg.get("chat_template")
        bos_text = _token_text(tcfg.get("bos_token"))
        self.bos_id = cfg.bos_token_id
        if self.bos_id is None and bos_text is not None:
            self.bos_id = self._tok.token_to_id(bos_text)
        self.add_bos = bool(tcfg.get("add_bos_token", False))
        eos: set[int] = set(cfg.eos_token_ids)
        g = gen.get("eos_token_id")
        eos.update(g if isinstance(g, list) else ([g] if isinstance(g, int) else []))
        eos_text = _token_text(tcfg.get("eos_token"))
        if eos_text is not None and self._tok.token_to_id(eos_text) is not None:
            eos.add(self._tok.token_to_id(eos_text))
        self.eos_ids = frozenset(eos)
        self.bos_text, self.eos_text = bos_text, eos_text

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=True).ids
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def vocab(self) -> dict[str, int]:
        """Token string -> id (the detokenizer looks for byte-fallback tokens in it)."""
        return self._tok.get_vocab(with_added_tokens=True)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)
