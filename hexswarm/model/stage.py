"""The part of a Llama model one rank runs: a contiguous layer range at one TP shard,
plus the embedding (first-stage leader) and final norm + lm_head (last-stage leader)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hexswarm.model.config import LlamaConfig
from hexswarm.model.kv_cache import KVCache
from hexswarm.model.layers import (AllReduce, DecoderLayerShard, RMSNorm, StepMeta, add_rmsnorm, cos_sin,
                                   fast_kernels_for, inverse_frequencies, leading_decode_rows)
from hexswarm.model.quant import QuantLinear, int8_rows_for, quantize as quantize_weight
from hexswarm.model.quant_format import GROUP, QUANT_MODES, check_mode
from hexswarm.model.shard import TensorShard

# the dtypes a stage serves in, by the names configs and the CLI use
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class StagePart:
    """What one rank holds: layers [layer_start, layer_end) at `shard`, with or without ends."""

    layer_start: int
    layer_end: int
    shard: TensorShard
    with_embedding: bool
    with_head: bool

    @property
    def n_layers(self) -> int:
        return self.layer_end - self.layer_start


class StageModel(nn.Module):
    def __init__(self, cfg: LlamaConfig, part: StagePart, dtype: torch.dtype, device: torch.device,
                 quantized: bool = False):
        """quantized: the layers' projection weights start as placeholders that the loader
        fills with QuantLinear (or dense) weights, so no dense copy is ever allocated."""
        super().__init__()
        self.cfg = cfg
        self.part = part
        self.dtype = dtype
        self.device = device
        self.layers = nn.ModuleList(
            DecoderLayerShard(cfg, part.shard, dtype, device, weights_device="meta" if quantized else None)
            for _ in range(part.n_layers)
        )
        self.embedding = (
            nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device), requires_grad=False)
            if part.with_embedding
            else None
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device) if part.with_head else None
        self.lm_head = (
            nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device), requires_grad=False)
            if part.with_head
            else None
        )
        self.register_buffer("inv_freq", inverse_frequencies(cfg).to(device), persistent=False)

    # CUDA path (Triton kernels, graph-capturable decode); False forces the plain-torch path
    fast_kernels: bool = True

    def new_kv_cache(self, max_batch: int, max_seq_len: int, n_tokens: int | None = None) -> KVCache:
        """n_tokens: the paged pool's capacity (default max_batch x max_seq_len)."""
        return KVCache(self.part.n_layers, max_batch, max_seq_len, self.part.shard.n_kv_heads, self.cfg.head_dim,
                       self.dtype, self.device, n_tokens=n_tokens)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embedding)

    def uses_fast_path(self, x: torch.Tensor) -> bool:
        return self.fast_kernels and fast_kernels_for(x)

    def forward(
        self,
        x: torch.Tensor,
        kv: KVCache,
        slots: list[int],
        start: list[int],
        all_reduce: AllReduce | None = None,
    ) -> torch.Tensor:
        """Run this rank's layers on x [B, T, H]; row b is slot slots[b] at positions start[b]+[0,T)."""
        B, T, H = x.shape
        rows = [(int(s), int(p), T) for s, p in zip(slots, start)]
        return self.forward_rows(x.reshape(B * T, H), kv, rows, all_reduce).view(B, T, H)

    def forward_rows(
        self, x: torch.Tensor, kv: KVCache, rows: list[tuple[int, int, int]], all_reduce: AllReduce | None = None
    ) -> torch.Tensor:
        """A ragged step: x [N, H] holds the new tokens of `rows` (slot, start, length) back to back
        (one-token decode rows first, for the fast path).  Returns the hidden states [N, H]."""
        kv.prepare(rows)
        if self.uses_fast_path(x):
            return self.forward_fast(x, kv, StepMeta.for_rows(rows, x.device), all_reduce)
        out = torch.empty_like(x)
        n_decode = leading_decode_rows(rows)
        # plain torch runs uniform batches: the decode rows together, each longer row alone
        groups = [(0, rows[:n_decode])] if n_decode else []
        offset = n_decode
        for row in rows[n_decode:]:
            groups.append((offset, [row]))
            offset += row[2]
        for offset, group in groups:
            B, T = len(group), group[0][2]
            xs = x[offset : offset + B * T].view(B, T, -1)
            h = self._forward_reference(xs, kv, [r[0] for r in group], [r[1] for r in group], all_reduce)
            out[offset : offset + B * T] = h.reshape(B * T, -1)
        return out

    def _forward_reference(self, x: torch.Tensor, kv: KVCache, slots: list[int], start: list[int],
                           all_reduce: AllReduce | None) -> torch.Tensor:
        """Plain torch on a uniform batch x [B, T, H] (the arithmetic of transformers)."""
        B, T, _ = x.shape
        fresh = T > 1 and not any(start)
        start_t = torch.tensor(start, dtype=torch.long, device=x.device)
        positions = start_t[:, None] + torch.arange(T, device=x.device)[None, :]
        cos, sin = cos_sin(self.inv_freq, positions, x.dtype)
        total = start_t + T
        slot_t = torch.tensor(slots, dtype=torch.long, device=x.device)
        where = kv.positions(slot_t[:, None], positions)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv, i, slot_t, where, start_t, total, fresh, all_reduce, start_host=start)
        return x

    def rope_tables(self, n_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of positions [0, n) at the first half of head_dim, float32 holding the
        model-dtype values transformers uses; cached, grown on demand (outside any graph)."""
        have = getattr(self, "_rope", None)
        if have is None or have[0].shape[0] < n_positions:
            n = max(n_positions, self.cfg.max_position_embeddings)
            pos = torch.arange(n, device=self.inv_freq.device)
            cos, sin = cos_sin(self.inv_freq, pos, self.dtype)
            half = self.cfg.head_dim // 2
            self._rope = (cos[:, :half].float().contiguous(), sin[:, :half].float().contiguous())
        return self._rope

    def forward_fast(self, x: torch.Tensor, kv: KVCache, meta: StepMeta, all_reduce: AllReduce | None = None):
        """The CUDA path on per-step device tensors: no host reads, no per-layer set-up,
        so a decode step can be captured in a CUDA graph.  x: [N, H] -> [N, H]."""
        rope = self.rope_tables(kv.max_seq_len)
        resid = x.clone()  # updated in place, layer by layer
        if not len(self.layers):
            return resid
        first = self.layers[0].input_norm
        rows = resid.shape[0]
        q8 = int8_rows_for(self.layers[0].qkv_weight, rows, resid.dtype)  # for a "dp4a" QKV projection
        h = add_rmsnorm(resid, None, first.weight, first.eps, q8)
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            nxt = self.layers[i + 1].input_norm if i + 1 < n else None
            next_q8 = int8_rows_for(self.layers[i + 1].qkv_weight, rows, resid.dtype) if nxt is not None else None
            h = layer.forward_fast(resid, h, rope, kv, i, meta, all_reduce, nxt, q8, next_q8)
            q8 = next_q8
        return resid

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head; float32 logits."""
        if self.uses_fast_path(h):
            h = add_rmsnorm(h.contiguous(), None, self.norm.weight, self.norm.eps)
        else:
            h = self.norm(h)
        return F.linear(h, self.lm_head).float()

    def step_graphs(self, kv: KVCache, all_reduce: AllReduce | None = None, use_graphs: bool | None = None):
        """A step runner that captures one CUDA graph per step shape (see cuda_graphs)."""
        from hexswarm.model.cuda_graphs import StepGraphRunner

        return StepGraphRunner(self, kv, all_reduce=all_reduce, use_graphs=use_graphs)


def _progress(total_bytes: int, enabled: bool):
    """A rich progress bar for big loads; a no-op otherwise."""
    if not enabled or total_bytes < (256 << 20):
        return None
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("loading shard"), BarColumn(), DownloadColumn(), TimeRemainingColumn(), transient=True
    )


def load_stage(
    reader,
    cfg: LlamaConfig,
    part: StagePart,
    dtype: torch.dtype | None,
    device: torch.device,
    show_progress: bool = False,
    quantize: str | None = None,
) -> StageModel:
    """Build the stage and fill it with only this rank's slices of the checkpoint.

    reader: a CheckpointReader or a GGUFCheckpoint (see source.open_checkpoint).
    dtype None: bfloat16 on CUDA, float32 elsewhere.
    quantize: None serves the checkpoint as it is: a GGUF's Q8_0/Q4_0/Q4_1 projection weights
    stay quantized on CUDA and are dequantized elsewhere; "int8"/"int4" keep those blocks on any
    device and quantize every other projection weight; "none" loads everything dense.
    Embedding, norms and lm_head are always dense."""
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    mode = check_mode(quantize)
    keep_blocks = hasattr(reader, "read_quant") and (mode in QUANT_MODES or (mode is None and device.type == "cuda"))
    quantized = keep_blocks or mode in QUANT_MODES
    model = StageModel(cfg, part, dtype, device, quantized=quantized)
    hd = cfg.head_dim
    s = part.shard
    q0, q1 = s.q_heads[0] * hd, s.q_heads[1] * hd
    k0, k1 = s.kv_heads[0] * hd, s.kv_heads[1] * hd
    f0, f1 = s.ffn
    # (destination, [(checkpoint name, dim, start, stop)]) in load order; several sources
    # are concatenated along dim 0 (fused projections).  A destination is a tensor to copy
    # into, or (layer, projection name) for weights that may load quantized.
    jobs: list[tuple[object, list[tuple[str, int | None, int, int | None]]]] = []

    def projection(layer, name: str):
        return (layer, name) if quantized else getattr(layer, name)

    for i, layer in enumerate(model.layers):
        p = f"model.layers.{part.layer_start + i}."
        a, m = p + "self_attn.", p + "mlp."
        jobs += [
            (layer.input_norm.weight, [(p + "input_layernorm.weight", None, 0, None)]),
            (layer.post_norm.weight, [(p + "post_attention_layernorm.weight", None, 0, None)]),
            (projection(layer, "qkv_weight"),
             [(a + "q_proj.weight", 0, q0, q1), (a + "k_proj.weight", 0, k0, k1), (a + "v_proj.weight", 0, k0, k1)]),
            (projection(layer, "o_weight"), [(a + "o_proj.weight", 1, q0, q1)]),
            (projection(layer, "gate_up_weight"), [(m + "gate_proj.weight", 0, f0, f1), (m + "up_proj.weight", 0, f0, f1)]),
            (projection(layer, "down_weight"), [(m + "down_proj.weight", 1, f0, f1)]),
        ]
        if layer.qkv_bias is not None:
            jobs += [
                (layer.qkv_bias, [(a + "q_proj.bias", 0, q0, q1), (a + "k_proj.bias", 0, k0, k1), (a + "v_proj.bias", 0, k0, k1)]),
                (layer.o_bias, [(a + "o_proj.bias", None, 0, None)]),
            ]
        if layer.gate_up_bias is not None:
            jobs += [
                (layer.gate_up_bias, [(m + "gate_proj.bias", 0, f0, f1), (m + "up_proj.bias", 0, f0, f1)]),
                (layer.down_bias, [(m + "down_proj.bias", None, 0, None)]),
            ]
    if model.embedding is not None:
        jobs.append((model.embedding, [("model.embed_tokens.weight", None, 0, None)]))
    if model.lm_head is not None:
        head_name = "lm_head.weight"
        if cfg.tie_word_embeddings or not reader.has(head_name):
            head_name = "model.embed_tokens.weight"
        jobs.append((model.norm.weight, [("model.norm.weight", None, 0, None)]))
        jobs.append((model.lm_head, [(head_name, None, 0, None)]))

    def shape_of(dest) -> tuple[int, ...]:
        return tuple((getattr(*dest) if isinstance(dest, tuple) else dest).shape)

    def dense_bytes(dest) -> int:
        return math.prod(shape_of(dest)) * dtype.itemsize

    total = sum(dense_bytes(dest) for dest, _ in jobs)
    bar = _progress(total, show_progress)
    task = bar.add_task("load", total=total) if bar else None
    if bar:
        bar.start()
    try:
        with torch.no_grad():
            for dest, sources in jobs:
                if isinstance(dest, tuple):
                    layer, name = dest
                    layer.set_projection(name, _load_projection(reader, sources, shape_of(dest), dtype, device,
                                                                keep_blocks, mode))
                else:
                    dest.copy_(_read_dense(reader, sources, shape_of(dest)).to(dtype))
                if bar:
                    bar.advance(task, dense_bytes(dest))
    finally:
        if bar:
            bar.stop()
    return model


def _read_dense(reader, sources, shape: tuple[int, ...]) -> torch.Tensor:
    parts = [reader.read(name, dim, a, b) for name, dim, a, b in sources]
    value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    _check_shape(tuple(value.shape), shape, sources)
    return value


def _check_shape(got: tuple[int, ...], want: tuple[int, ...], sources) -> None:
    if got != want:
        from hexswarm.errors import UserError

        names = ", ".join(n for n, *_ in sources)
        raise UserError(f"checkpoint tensor {names} has shape {list(got)}, expected {list(want)} from the model config")


def _load_projection(reader, sources, shape, dtype, device, keep_blocks: bool, mode: str | None):
    """A projection weight as a QuantLinear (the file's blocks, or quantized here) or dense."""
    if keep_blocks:
        parts = [reader.read_quant(name, dim, a, b) for name, dim, a, b in sources]
        if all(q is not None for q in parts):
            q = QuantLinear.cat(parts)
            if q is not None:
                _check_shape((q.out_features, q.in_features), shape, sources)
                return q.to(device).for_backend()
    dense = _read_dense(reader, sources, shape).to(device)  # quantized on the device: fast on a GPU
    if mode in QUANT_MODES and dense.shape[1] % GROUP == 0:
        return quantize_weight(dense, mode).for_backend()
    return dense.to(dtype)
