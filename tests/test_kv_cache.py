"""The paged KV cache: block bookkeeping, and served tokens equal to `generate` when requests
must wait for blocks (a pool smaller than slots x max_seq_len)."""

from __future__ import annotations

import pytest
import torch

from hexswarm.model.kv_cache import BLOCK, KVCache, KVCacheFull, blocks_for
from hexswarm.runtime.local_pipeline import LocalPipeline
from hexswarm.runtime.offline import GenerateJob, generate
from hexswarm.runtime.sampling import SamplingParams
from hexswarm.runtime.stage_engine import EngineSettings


def small_cache(n_tokens: int, max_batch: int = 4, max_seq_len: int = 128) -> KVCache:
    return KVCache(n_layers=1, max_batch=max_batch, max_seq_len=max_seq_len,
                   n_kv_heads=2, head_dim=4, dtype=torch.float32,
                   device="cpu", n_tokens=n_tokens)


def test_blocks_follow_rows_and_go_back():
    kv = small_cache(6 * BLOCK)
    assert kv.n_blocks == 6 and kv.free_blocks() == 6
    kv.prepare([(0, 0, 20), (1, 0, 5)])  # 2 blocks + 1 block
    assert (kv.held_blocks(0), kv.held_blocks(1), kv.free_blocks()) == (2, 1, 3)
    kv.prepare([(1, 5, 1)] * 1 + [(0, 20, 1)])  # decode rows inside held blocks: nothing new
    assert kv.free_blocks() == 3
    kv.prepare([(1, BLOCK, 1)])  # slot 1 crosses into its second block
    assert kv.held_blocks(1) == 2
    # the table maps each held block; unassigned entries point at the scratch block 0
    table = kv.table.tolist()
    assert all(b > 0 for b in table[0][:2] + table[1][:2]) and table[2] == [0] * kv.max_blocks
    assert len({*table[0][:2], *table[1][:2]}) == 4
    kv.release([0])
    assert kv.held_blocks(0) == 0 and kv.free_blocks() == 4 and kv.table[0].tolist() == [0] * kv.max_blocks


def test_a_new_occupant_starts_afresh_and_a_stale_row_takes_nothing():
    kv = small_cache(4 * BLOCK)
    kv.prepare([(2, 0, 40)])  # 3 blocks
    kv.prepare([(2, 0, 3)])  # a new request in slot 2 (start 0): the old blocks go back first
    assert kv.held_blocks(2) == 1 and kv.free_blocks() == 3
    kv.release([2])
    kv.prepare([(2, 70, 1)])  # a row launched before the release: no blocks, writes the scratch block
    assert kv.held_blocks(2) == 0 and kv.free_blocks() == 4
    assert int(kv.positions(torch.tensor([2]), torch.tensor([70]))) == 70 % BLOCK  # block 0


def test_full_pool_raises_a_clear_error():
    kv = small_cache(2 * BLOCK)
    kv.prepare([(0, 0, 2 * BLOCK)])
    with pytest.raises(KVCacheFull, match="kv_tokens"):
        kv.prepare([(1, 0, 1)])
    assert kv.held_blocks(1) == 0  # nothing half-taken


def test_scattered_blocks_read_back_in_position_order():
    kv = small_cache(8 * BLOCK)
    for pos in range(0, 3 * BLOCK, BLOCK):  # two slots growing in turn: their blocks interleave
        kv.prepare([(0, pos, BLOCK), (1, pos, BLOCK)])
    slots = torch.tensor([0, 1])
    pos = torch.arange(3 * BLOCK)
    values = torch.arange(2 * 3 * BLOCK, dtype=torch.float32).view(2, 3 * BLOCK, 1, 1).expand(2, 3 * BLOCK, 2, 4)
    kv.write(0, kv.positions(slots[:, None], pos[None, :]), values, -values)
    k, v = kv.gather(0, slots, 3 * BLOCK)
    assert torch.equal(k, values) and torch.equal(v, -values)


PROMPTS = ["Once upon a time", "The quick brown fox", "0123456789", "Hello", "A prompt that is longer than the rest"]


@pytest.mark.parametrize("layout,settings", [
    ([(1, 4)], EngineSettings()),
    ([(1, 2), (1, 2)], EngineSettings(max_step_tokens=8, micro_batches=2)),
])
def test_requests_wait_for_blocks_and_decode_as_generate(tiny_model, layout, settings):
    """A pool of 96 positions holds two of these requests at a time: the rest wait for blocks
    freed by finished ones (and downstream stages free them on stage 0's word)."""
    params = [SamplingParams(), SamplingParams(temperature=0.8, top_k=20, seed=3)]
    refs = {f"r{i}": generate(GenerateJob(str(tiny_model), p, max_new_tokens=12, sampling=params[i % 2]))["tokens"]
            for i, p in enumerate(PROMPTS)}
    pipe = LocalPipeline(tiny_model, layout, max_batch=8, max_seq_len=128, settings=settings, kv_tokens=96)
    try:
        needs = [blocks_for(len(pipe.tokenizer.encode(p)) + 12) for p in PROMPTS]
        assert sum(needs) > 96 // BLOCK >= max(needs)  # not all at once, each alone
        for i, p in enumerate(PROMPTS):
            pipe.start(f"r{i}", p, 12, params[i % 2])
        got = pipe.wait(len(PROMPTS), timeout=120)
        assert {rid: m.get("tokens") for rid, m in got.items()} == refs
        # no stage ever held more than its pool: every block is free or held by the last requests
        for engine in pipe.engines.values():
            kv = engine.host.executor.kv
            assert kv.free_blocks() + sum(kv.held_blocks(s) for s in range(kv.max_batch)) == kv.n_blocks
    finally:
        pipe.close()


def test_a_request_larger_than_the_pool_is_refused(tiny_model):
    pipe = LocalPipeline(tiny_model, [(1, 4)], max_batch=4, max_seq_len=128, kv_tokens=32)
    try:
        pipe.start("big", "a prompt of more than thirty-two tokens, surely, with all these words", 40)
        pipe.start("small", "Hi", 4)
        got = pipe.wait(2, timeout=60)
        assert "KV positions" in got["big"]["error"]
        assert len(got["small"]["tokens"]) == 4
    finally:
        pipe.close()
