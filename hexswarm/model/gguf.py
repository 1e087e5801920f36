"""GGUF checkpoints (llama.cpp's one-file format), read through the `gguf` package.

A GGUF file holds the architecture parameters, the tokenizer and the chat template as
metadata, and the tensors under llama.cpp names (`blk.N.attn_q.weight`), most of them in
block-quantized formats.  `GGUFCheckpoint` gives the same interface as `CheckpointReader`
(`has(name)`, `read(name, dim, start, stop)` under HF names), so `load_stage` reads only
this rank's rows from the memory-mapped file; `read_quant` hands the Q8_0 / Q4_0 / Q4_1
blocks over as they are, for weights served quantized (see `model/quant.py`).

llama.cpp's converter permutes the rows of q_proj and k_proj within each head (its rotary
layout); reading undoes that, as transformers' `_reverse_permute_weights` does.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from hexswarm.errors import UserError

GGUF_SUFFIX = ".gguf"

# HF name suffix inside a layer -> llama.cpp tensor name inside `blk.N.`
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(hf_name: str) -> str | None:
    """llama.cpp's name for a HF Llama tensor name (None: no such tensor in a GGUF)."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    parts = hf_name.split(".", 3)  # model.layers.N.<rest>
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_NAMES:
        return f"blk.{parts[2]}.{_LAYER_NAMES[parts[3]]}"
    return None


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the one .gguf in a folder without
    config.json.  None for a HF checkpoint folder (or anything else)."""
    p = Path(path)
    if p.suffix == GGUF_SUFFIX and not p.is_dir():
        if not p.is_file():
            raise UserError(f"model file {p} does not exist")
        return p
    if p.is_dir() and not (p / "config.json").exists():
        found = sorted(p.glob(f"*{GGUF_SUFFIX}"))
        if len(found) > 1:
            raise UserError(f"{p} holds {len(found)} .gguf files; name one of them with --model")
        return found[0] if found else None
    return None


@lru_cache(maxsize=4)
def open_gguf(path: str | Path) -> "GGUFCheckpoint":
    """One parsed file per process (parsing the vocabulary takes seconds)."""
    return GGUFCheckpoint(Path(path).resolve())


class GGUFCheckpoint:
    def __init__(self, path: Path):
        import gguf

        self.path = path
        try:
            self._r = gguf.GGUFReader(str(path), "r")
        except Exception as e:  # the reader raises ValueError/struct errors/IndexError on bad bytes
            raise UserError(f"{path} is not a readable GGUF file (truncated or corrupt): {_one_line(e)}") from None
        self._tensors = {t.name: t for t in self._r.tensors}
        for t in self._tensors.values():
            if t.data.nbytes != int(t.n_bytes):
                raise UserError(f"{path} is truncated: tensor {t.name} has {t.data.nbytes} of {int(t.n_bytes)} bytes")
        arch = self.meta("general.architecture")
        if arch != "llama":
            raise UserError(f"{path}: GGUF architecture {arch!r} is not supported (hexswarm serves llama)")
        if self.meta("llama.expert_count", 0):
            raise UserError(f"{path}: mixture-of-experts GGUF models are not supported")
        if "rope_freqs.weight" in self._tensors:
            raise UserError(f"{path}: per-frequency rope factors (Llama 3.1 rope scaling in GGUF) are not supported")
        self._heads = (int(self.meta("llama.attention.head_count", 0) or 0),
                       int(self.meta("llama.attention.head_count_kv", 0) or self.meta("llama.attention.head_count", 0) or 0))

    # ---- metadata ------------------------------------------------------------------------
    def meta(self, key: str, default: Any = None) -> Any:
        field = self._r.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:
            raise UserError(f"{self.path}: metadata {key} is unreadable: {_one_line(e)}") from None

    def hf_config(self) -> dict[str, Any]:
        """The metadata as a HF config.json dict (parsed by `LlamaConfig.from_dict`)."""
        p = "llama."

        def need(key: str):
            value = self.meta(p + key)
            if value is None:
                raise UserError(f"{self.path}: GGUF metadata lacks {p + key}")
            return value

        hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
        vocab = self.meta(p + "vocab_size")
        if vocab is None:
            vocab = len(self.meta("tokenizer.ggml.tokens") or [])
        d: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": int(vocab),
            "hidden_size": hidden, "intermediate_size": int(need("feed_forward_length")),
            "num_hidden_layers": int(need("block_count")), "num_attention_heads": heads,
            "num_key_value_heads": int(self.meta(p + "attention.head_count_kv", heads)),
            "head_dim": int(self.meta(p + "attention.key_length", hidden // heads)),
            "rms_norm_eps": float(self.meta(p + "attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(self.meta(p + "rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self.meta(p + "context_length", 2048)),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "attention_bias": "blk.0.attn_q.bias" in self._tensors,
            "mlp_bias": "blk.0.ffn_gate.bias" in self._tensors,
            "hidden_act": "silu",
            "bos_token_id": self.meta("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.meta("tokenizer.ggml.eos_token_id"),
        }
        scaling = self.meta(p + "rope.scaling.type")
        if scaling not in (None, "none"):
            if scaling != "linear":
                raise UserError(f"{self.path}: rope scaling {scaling!r} is not supported")
            d["rope_scaling"] = {"rope_type": "linear", "factor": float(self.meta(p + "rope.scaling.factor", 1.0))}
        return d

    @property
    def chat_template(self) -> str | None:
        t = self.meta("tokenizer.chat_template")
        return t if isinstance(t, str) and t else None

    # ---- tensors (the CheckpointReader interface) ----------------------------------------
    def names(self) -> list[str]:
        return list(self._tensors)

    def has(self, name: str) -> bool:
        g = gguf_name(name)
        return g is not None and g in self._tensors

    def _tensor(self, name: str):
        g = gguf_name(name)
        if g is None or g not in self._tensors:
            raise UserError(f"{self.path} lacks tensor {g or name} (HF {name})")
        return self._tensors[g]

    def shape(self, name: str) -> list[int]:
        return [int(n) for n in reversed(self._tensor(name).shape)]  # GGUF lists the fastest dim first

    def type_name(self, name: str) -> str:
        return self._tensor(name).tensor_type.name

    def served_layer_bytes_per_param(self, dense_bytes: int = 2) -> float:
        """Mean bytes per layer weight on a GPU: kept block formats at their size, the rest
        dequantized to `dense_bytes` (bf16) at load (the planner's memory model)."""
        from hexswarm.model.quant_format import GGUF_KEPT_TYPES

        nbytes = params = 0
        for t in self._tensors.values():
            if t.name.startswith("blk."):
                n = int(t.n_elements)
                params += n
                kept = t.tensor_type.name in GGUF_KEPT_TYPES and len(t.data.shape) == 2
                nbytes += int(t.n_bytes) if kept else n * dense_bytes
        return nbytes / params if params else float(dense_bytes)

    def _row_order(self, name: str, n_rows: int) -> np.ndarray | None:
        """File row of each HF row for q_proj / k_proj (llama.cpp permuted them); None otherwise."""
        if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
            heads = self._heads[0]
        elif name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.k_proj.bias"):
            heads = self._heads[1]
        else:
            return None
        # llama.cpp wrote file = hf.reshape(heads, 2, d/2).swapaxes(1, 2): HF row (h, half, i)
        # sits at file row (h, i, half); the inverse of transformers' reverse permute.
        return np.arange(n_rows).reshape(heads, n_rows // heads // 2, 2).swapaxes(1, 2).reshape(-1)

    def _rows(self, name: str, start: int, stop: int | None) -> tuple[Any, np.ndarray]:
        """(tensor, raw rows [start:stop) in HF row order, as stored)."""
        t = self._tensor(name)
        data = t.data
        n = data.shape[0]
        stop = n if stop is None else stop
        order = self._row_order(name, n)
        return t, (data[start:stop] if order is None else data[order[start:stop]])

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None):
        """The tensor (or [start:stop) along `dim`, HF dims), dequantized to a float32 torch tensor."""
        if dim == 0:
            t, raw = self._rows(name, start, stop)
            return _to_torch(self._dequantize(t, raw, name))
        t, raw = self._rows(name, 0, None)
        dense = self._dequantize(t, raw, name)
        if dim is not None:
            dense = dense[:, start:stop]
        return _to_torch(dense)

    def read_quant(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None):
        """This slice as a `QuantLinear` holding the file's blocks, when its format is one
        served quantized (Q8_0, Q4_0, Q4_1) and the slice falls on block boundaries; else None."""
        from hexswarm.model.quant import GGUF_KEPT_TYPES, QuantLinear

        t = self._tensor(name)
        kind = t.tensor_type.name
        if kind not in GGUF_KEPT_TYPES or len(t.data.shape) != 2:
            return None
        block, type_size = _block_sizes(t.tensor_type)
        if dim == 0 or dim is None:
            _, raw = self._rows(name, start, None if dim is None else stop)
            k = self.shape(name)[1]
        else:
            stop = self.shape(name)[1] if stop is None else stop
            if start % block or stop % block:
                return None
            _, raw = self._rows(name, 0, None)
            raw = raw[:, start // block * type_size: stop // block * type_size]
            k = stop - start
        return QuantLinear.from_gguf_blocks(_to_torch(raw), kind, k)

    def _dequantize(self, t, raw: np.ndarray, name: str) -> np.ndarray:
        import gguf

        try:
            out = gguf.quants.dequantize(raw, t.tensor_type)
        except NotImplementedError:
            raise UserError(f"{self.path}: tensor {t.name} is in quantization type {t.tensor_type.name}, "
                            "which hexswarm cannot read") from None
        return out.astype(np.float32, copy=False)


def _to_torch(a: np.ndarray):
    """A torch tensor owning a writable copy when `a` is a read-only view of the mapped file."""
    import torch

    if not (a.flags.writeable and a.flags.c_contiguous):
        a = np.array(a, order="C")
    return torch.from_numpy(a)


def _block_sizes(qtype) -> tuple[int, int]:
    import gguf

    return gguf.GGML_QUANT_SIZES[qtype]


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
