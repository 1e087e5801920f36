"""Each rank reads only its own slices of the checkpoint."""

from __future__ import annotations

import torch

from hexswarm.model.checkpoint import CheckpointReader
from hexswarm.model.config import LlamaConfig
from hexswarm.model.shard import TensorShard
from hexswarm.model.stage import StagePart, load_stage


class RecordingReader(CheckpointReader):
    def __init__(self, d):
        super().__init__(d)
        self.calls = []

    def read(self, name, dim=None, start=0, stop=None):
        self.calls.append((name, dim, start, stop))
        return super().read(name, dim, start, stop)


def test_a_tp_rank_reads_only_its_rows_and_columns(tiny_models):
    d = tiny_models["llama3"]  # sharded files + index, one KV head replicated at TP 2
    cfg = LlamaConfig.from_dir(d)
    reader = RecordingReader(d)
    part = StagePart(1, 3, TensorShard.for_rank(cfg, 2, 1), with_embedding=False, with_head=False)
    model = load_stage(reader, cfg, part, torch.float32, torch.device("cpu"))
    names = {c[0] for c in reader.calls}
    assert not any("layers.0." in n or "layers.3." in n for n in names), "read layers outside the stage"
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" not in names
    hd = cfg.head_dim
    calls = {c[0]: c for c in reader.calls}
    assert calls["model.layers.1.self_attn.q_proj.weight"] == ("model.layers.1.self_attn.q_proj.weight", 0, 2 * hd, 4 * hd)
    assert calls["model.layers.1.self_attn.k_proj.weight"][1:] == (0, 0, hd)  # the one KV head, replicated
    assert calls["model.layers.2.self_attn.o_proj.weight"][1:] == (1, 2 * hd, 4 * hd)
    f = cfg.intermediate_size // 2
    assert calls["model.layers.2.mlp.down_proj.weight"][1:] == (1, f, 2 * f)
    full = [c for c in reader.calls if c[1] is None]
    assert all("layernorm" in c[0] for c in full), full
    # and the slices hold the right numbers
    q_full = CheckpointReader(d).read("model.layers.1.self_attn.q_proj.weight")
    assert torch.equal(model.layers[0].qkv_weight[: 2 * hd], q_full[2 * hd : 4 * hd])


def test_slice_reads_match_full_tensors_for_bin_and_safetensors(tiny_models):
    for key in ("gqa", "bias_bin"):
        r = CheckpointReader(tiny_models[key])
        name = "model.layers.0.mlp.gate_proj.weight"
        full = r.read(name)
        assert torch.equal(r.read(name, 0, 3, 9), full[3:9])
        assert torch.equal(r.read(name, 1, 5, 20), full[:, 5:20])
