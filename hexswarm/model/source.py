"""What `--model` names: a HF checkpoint folder or a GGUF file (or a folder holding one).

Every place that takes a model path goes through here for the config, the tensor reader,
the chat template and the fingerprint, so both kinds are accepted everywhere."""

from __future__ import annotations

import hashlib
from pathlib import Path

from hexswarm.model.config import LlamaConfig
from hexswarm.model.gguf import find_gguf, open_gguf


def load_config(model: str | Path) -> LlamaConfig:
    return LlamaConfig.from_dir(model)  # from_dir reads GGUF metadata for a GGUF model


def open_checkpoint(model: str | Path):
    """A tensor reader with `has(name)` and `read(name, dim, start, stop)` under HF names
    (GGUF readers add `read_quant`)."""
    gguf_path = find_gguf(model)
    if gguf_path is not None:
        return open_gguf(gguf_path)
    from hexswarm.model.checkpoint import CheckpointReader

    return CheckpointReader(model)


def model_fingerprint(model: str | Path) -> str:
    """Peers serve the same model when these agree: sha256 of config.json for a HF folder
    (byte-identical configs), of the whole file for a GGUF (its metadata and weights are
    one file; hashed in 1 MiB reads, cached per process)."""
    gguf_path = find_gguf(model)
    if gguf_path is None:
        return hashlib.sha256((Path(model) / "config.json").read_bytes()).hexdigest()[:16]
    return _file_digest(str(gguf_path.resolve()))


_DIGESTS: dict[str, str] = {}


def _file_digest(path: str) -> str:
    if path not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[path] = h.hexdigest()[:16]
    return _DIGESTS[path]


def gguf_chat_template(model: str | Path) -> str | None:
    """The chat template in a GGUF's metadata (None for a HF folder: see tokenizer_config.json)."""
    gguf_path = find_gguf(model)
    return open_gguf(gguf_path).chat_template if gguf_path is not None else None
