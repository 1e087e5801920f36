"""What the planner needs to know about a Llama-family model: shapes and real
(GQA + SwiGLU) parameter counts, from a HF ``config.json`` or a built-in name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hexswarm.errors import UserError
from hexswarm.model.config import LlamaConfig  # torch-free config parser shared with the runtime

# The config.json fields that matter for planning, as published on the HF hub.
_LLAMA2 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu"}
_LLAMA3 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
           "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "hidden_act": "silu", "rope_theta": 500000.0}
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-2-7b": {**_LLAMA2, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32},
    "llama-2-13b": {**_LLAMA2, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                    "num_attention_heads": 40, "num_key_value_heads": 40},
    "llama-2-70b": {**_LLAMA2, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8},
    "llama-3-8b": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8},
    "llama-3-70b": {**_LLAMA3, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8},
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bytes_per_param: int = 2  # fp16 / bf16
    # bytes per layer weight when the layers are served quantized (scales included); None: bytes_per_param
    layer_bytes_per_param: float | None = None

    @classmethod
    def from_config(cls, cfg: LlamaConfig, name: str = "model") -> "ModelSpec":
        return cls(
            name=name,
            num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            vocab_size=cfg.vocab_size,
            tie_word_embeddings=cfg.tie_word_embeddings,
            attention_bias=cfg.attention_bias,
            mlp_bias=cfg.mlp_bias,
        )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def params_per_layer(self) -> int:
        """q, k, v, o projections (GQA), gate/up/down (SwiGLU), two RMSNorm weights."""
        h, f = self.hidden_size, self.intermediate_size
        attn = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size + h
        mlp = 3 * h * f + (2 * f + h if self.mlp_bias else 0)
        return attn + mlp + 2 * h

    @property
    def layer_weight_bytes(self) -> float:
        """Bytes of one layer's weights as served (quantized or not)."""
        bpp = self.bytes_per_param if self.layer_bytes_per_param is None else self.layer_bytes_per_param
        return self.params_per_layer * bpp

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        """Final norm + lm_head (the runtime keeps a separate lm_head copy even when tied)."""
        return self.hidden_size + self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        """Parameter count as published (tied embeddings counted once)."""
        head = self.hidden_size if self.tie_word_embeddings else self.head_params
        return self.num_layers * self.params_per_layer + self.embedding_params + head

    @property
    def weight_bytes(self) -> int:
        """Bytes the runtime holds: every layer, embedding on the first stage, lm_head on the last."""
        return int(self.num_layers * self.layer_weight_bytes
                   + (self.embedding_params + self.head_params) * self.bytes_per_param)

    def kv_bytes_per_token_per_layer(self, tp: int = 1) -> int:
        """K and V of one token in one layer on one GPU of a TP group of ``tp``
        (KV heads are split when tp divides them, else each GPU keeps one replicated head)."""
        return 2 * self.kv_heads_per_gpu(tp) * self.head_dim * self.bytes_per_param

    def kv_heads_per_gpu(self, tp: int) -> int:
        return self.num_kv_heads // tp if self.num_kv_heads % tp == 0 else 1

    def valid_tp(self, tp: int) -> bool:
        """Same rule as the runtime's shard check: TP splits the query heads and
        the FFN, and either splits or replicates the KV heads."""
        kv = self.num_kv_heads
        return (
            tp >= 1
            and self.num_heads % tp == 0
            and (kv % tp == 0 or tp % kv == 0)
            and self.intermediate_size % tp == 0
        )


def model_spec_from_dict(d: dict[str, Any], name: str = "model") -> ModelSpec:
    return ModelSpec.from_config(LlamaConfig.from_dict(d), name=name)


def load_model_spec(name_or_dir: str | Path, layer_bytes_per_param: float | None = None) -> ModelSpec:
    """A built-in name (``llama-2-70b``), a directory with ``config.json``, a ``config.json`` path,
    or a GGUF file (its layers counted at the bytes they are served in, unless given)."""
    from dataclasses import replace

    key = str(name_or_dir).strip().lower()
    if key in BUILTIN_CONFIGS:
        return replace(model_spec_from_dict(BUILTIN_CONFIGS[key], name=key), layer_bytes_per_param=layer_bytes_per_param)
    path = Path(name_or_dir)
    if path.is_file() and path.name.endswith(".json"):
        path = path.parent
    if path.is_dir() or path.suffix == ".gguf":
        from hexswarm.model.gguf import find_gguf, open_gguf

        gguf_path = find_gguf(path)
        if layer_bytes_per_param is None and gguf_path is not None:
            layer_bytes_per_param = open_gguf(gguf_path).served_layer_bytes_per_param()
        spec = ModelSpec.from_config(LlamaConfig.from_dir(path), name=path.stem if gguf_path else path.name)
        return replace(spec, layer_bytes_per_param=layer_bytes_per_param)
    raise UserError(
        f"unknown model {name_or_dir!r}: give a directory with config.json or one of {', '.join(BUILTIN_CONFIGS)}"
    )
