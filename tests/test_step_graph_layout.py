"""The layout of a mixed CUDA-graph step (hexswarm/model/cuda_graphs.py), checked on the host: which graph a
step replays, and the padded metadata its kernels read.  The replay itself needs a GPU
(tools/gpu_check.py compares it with the eager step)."""

from __future__ import annotations

import torch

from hexswarm.model.attention import CHUNK_BLOCK_M
from hexswarm.model.cuda_graphs import MIXED_MAX_SEGMENTS, StepGraphRunner, _MixedShape
from hexswarm.model.shard import TensorShard
from hexswarm.model.stage import StageModel, StagePart
from hexswarm.model.tiny import TinySpec, make_tiny_llama
from hexswarm.model.config import LlamaConfig


def _runner(tmp_path, max_batch: int = 40) -> StepGraphRunner:
    cfg = LlamaConfig.from_dir(make_tiny_llama(tmp_path / "m", TinySpec(layers=2)))
    part = StagePart(0, 2, TensorShard.for_rank(cfg, 1, 0), with_embedding=True, with_head=True)
    model = StageModel(cfg, part, torch.float32, torch.device("cpu"))
    runner = model.step_graphs(model.new_kv_cache(max_batch, 256))
    assert runner.mixed_shape([(0, 5, 1), (1, 0, 9)]) is None  # no graphs off CUDA: every mixed step runs eagerly
    runner.use_graphs = True  # the shape choice alone (nothing is captured here)
    return runner


def test_a_mixed_step_replays_the_smallest_graph_that_holds_it(tmp_path):
    runner = _runner(tmp_path)
    assert runner.mixed_decode == [0, 4, 8, 16, 24, 32, 40]  # the slot count closes the list
    s = runner.mixed_shape([(0, 5, 1)] * 5 + [(7, 0, 100), (8, 0, 30)])
    assert (s.D, s.T) == (8, 192)
    s = runner.mixed_shape([(3, 0, 64)])
    assert (s.D, s.T) == (0, 64)
    s = runner.mixed_shape([(0, 5, 1)] * 33 + [(7, 0, 512)])
    assert (s.D, s.T) == (40, 512)
    assert runner.mixed_shape([(0, 5, 1)] * 3) is None  # decode only: the decode graphs take it
    assert runner.mixed_shape([(1, 0, 400), (2, 0, 113)]) is None  # 513 prompt tokens: eager
    chunks = [(i, 0, 2) for i in range(MIXED_MAX_SEGMENTS + 1)]
    assert runner.mixed_shape(chunks) is None and runner.mixed_shape(chunks[:-1]) is not None


def test_the_padded_metadata_points_every_padding_token_at_the_scratch_slot():
    scratch = 99
    shape = _MixedShape(4, 192)
    rows = [(5, 10, 1), (6, 20, 1), (7, 0, 130), (8, 40, 3)]  # two decode rows, a prompt, a later chunk
    meta = torch.tensor(shape.host_meta(rows, scratch))
    tok_slot, tok_pos, work, last = shape.split(meta)
    assert shape.N == 196 and tok_slot.numel() == 196 and work.shape == (4, shape.W) and last.numel() == shape.R
    assert shape.W % 2 == 0 and shape.W >= 192 // CHUNK_BLOCK_M + MIXED_MAX_SEGMENTS
    assert tok_slot[:4].tolist() == [5, 6, scratch, scratch] and tok_pos[:4].tolist() == [10, 20, 0, 0]
    assert tok_slot[4:134].eq(7).all() and tok_pos[4:134].tolist() == list(range(130))
    assert tok_slot[134:137].tolist() == [8] * 3 and tok_pos[134:137].tolist() == [40, 41, 42]
    assert tok_slot[137:].eq(scratch).all() and tok_pos[137:].eq(0).all()
    # chunk attention's work items: (first token row, rows, slot, first position), 64 rows at most each
    items = [tuple(col) for col in work.t().tolist() if col[1] > 0]
    assert items == [(4, 64, 7, 0), (68, 64, 7, 64), (132, 2, 7, 128), (134, 3, 8, 40)]
    assert all(col[1] == 0 for col in work.t().tolist()[len(items):])  # padding items hold no rows
    # each row's last token: the logits the step returns, in row order
    assert last[:4].tolist() == [0, 1, 133, 136] and last[4:].eq(0).all()
