"""The Llama architecture parameters, read from a HF `config.json` as it is."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hexswarm.errors import UserError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    hidden_act: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str | None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        archs = d.get("architectures") or []
        model_type = d.get("model_type")
        if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise UserError(
                f"unknown architecture {', '.join(archs)}: hexswarm serves {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if not archs and model_type != "llama":
            raise UserError(f"unknown model_type {model_type!r}: hexswarm serves Llama-family checkpoints")

        def need(key: str, kind=int):
            if key not in d:
                raise UserError(f"config.json lacks {key!r}")
            try:
                value = kind(d[key])
            except (TypeError, ValueError):
                raise UserError(f"config.json: {key!r} is not a {kind.__name__}: {d[key]!r}") from None
            if kind is int and value <= 0:
                raise UserError(f"config.json: {key!r} must be positive, got {value}")
            return value

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        kv_heads = int(d.get("num_key_value_heads") or heads)
        head_dim = int(d.get("head_dim") or hidden // heads)
        if heads % kv_heads:
            raise UserError(f"config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise UserError(f"config.json: hidden_act {act!r} is not supported (Llama uses silu)")
        # transformers v5 writes `rope_parameters`; older checkpoints use rope_theta + rope_scaling.
        rope_params = d.get("rope_parameters") or {}
        rope_theta = float(d.get("rope_theta", rope_params.get("rope_theta", 10000.0)))
        rope_scaling = d.get("rope_scaling")
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = dict(rope_params)
        if rope_scaling is not None:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise UserError(f"config.json: rope_scaling type {rope_type!r} is not supported")
            rope_scaling = {**rope_scaling, "rope_type": rope_type}
            if rope_type == "default":
                rope_scaling = None
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            hidden_act=act,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            raw=d,
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "LlamaConfig":
        """From a HF checkpoint folder's config.json, or a GGUF file's metadata (the file,
        or a folder holding exactly one)."""
        from hexswarm.model.gguf import find_gguf, open_gguf

        gguf_path = find_gguf(model_dir)
        if gguf_path is not None:
            return cls.from_dict(open_gguf(gguf_path).hf_config())
        path = Path(model_dir) / "config.json"
        if not Path(model_dir).is_dir():
            raise UserError(f"model directory {model_dir} does not exist")
        if not path.is_file():
            raise UserError(f"{path} is missing")
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise UserError(f"{path} is not a JSON object")
        return cls.from_dict(d)
