"""The Triton decode attention (model/attention.py) on CPU through Triton's interpreter, against a
float64 torch reference: several batch sizes, key-split counts (flash-decoding: the splits' partials
combined by a second kernel), contexts shorter than one split, at and just past split boundaries
and the full cache, GQA and MHA, fp32 and fp16; each launch twice (nothing may carry over).  Its
fused decode path (rotary and the KV store inside: rope=) bit for bit as rotary_store then the kernel.  CI has
no GPU; tools/gpu_serve_check.py checks the kernel on one."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from triton_child import run_check

# (B, n_q, n_kv, D, max_blocks, forced splits or None for the engine's own choice)
CASES = [
    (1, 4, 4, 32, 8, None),    # batch 1: the engine picks many splits
    (1, 4, 2, 32, 16, 32),     # the most splits, GQA
    (3, 4, 1, 16, 6, 4),       # a single KV head, B rounded up in the split choice
    (2, 2, 2, 32, 4, 2),       # MHA, two splits
    (5, 4, 2, 16, 5, 1),       # no split: the program writes the output itself
    (2, 8, 2, 16, 4, 8),       # GQA 4:1
    (1, 2, 1, 16, 24, 2),      # long splits: several key blocks each
]


def _reference(qkv, k_pool, v_pool, table, slot, pos, n_q, n_kv):
    D = k_pool.shape[-1]
    bs = k_pool.shape[1]
    out = []
    for b in range(qkv.shape[0]):
        p = torch.arange(int(pos[b]) + 1)
        blk = table[slot[b], p // bs].long()
        k = k_pool[blk, p % bs].double()  # [n, n_kv, D]
        v = v_pool[blk, p % bs].double()
        q = qkv[b, : n_q * D].double().view(n_q, D)
        g = n_q // n_kv
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # [n, n_q, D]
        s = torch.einsum("hd,nhd->hn", q, k) / D ** 0.5
        out.append(torch.einsum("hn,nhd->hd", s.softmax(-1), v).reshape(-1))
    return torch.stack(out)


def _positions(B, shift, max_len, block_n, splits):
    """B positions (key count - 1): one key, under / at / past one block of keys, at and past every
    split holding a full block, the full cache; rotated by `shift` so each launch mixes them."""
    picks = [1, block_n - 1, block_n, block_n + 1, splits * block_n, splits * block_n + 1, 2 * block_n + 3,
             max_len - 1, max_len]
    picks = [min(max(n, 1), max_len) for n in picks]
    return [picks[(i * 4 + shift) % len(picks)] - 1 for i in range(B)]


def _check() -> dict:
    """Runs in a child process with TRITON_INTERPRET=1 (set before triton is imported)."""
    from hexswarm.model import attention
    from hexswarm.model.kv_cache import BLOCK, rotary_store

    torch.manual_seed(0)
    engine_splits = attention._splits
    res = {}
    for B, n_q, n_kv, D, max_blocks, forced in CASES:
        max_len = max_blocks * BLOCK
        splits = forced or engine_splits(B, n_q, max_len)
        attention._splits = (lambda *a, s=splits: s)
        block_n = 16 if splits >= 8 else (32 if splits > 1 else 64)
        slots = B + 2
        n_blocks = slots * max_blocks + 3
        for dtype in (torch.float32, torch.float16):
            k_pool = torch.randn(n_blocks, BLOCK, n_kv, D).to(dtype)
            v_pool = torch.randn(n_blocks, BLOCK, n_kv, D).to(dtype)
            table = torch.randperm(n_blocks)[: slots * max_blocks].view(slots, max_blocks).to(torch.int32).contiguous()
            slot = torch.randperm(slots)[:B].long().contiguous()
            # every context length of interest across the launches' rows (B rows: B of them each)
            for shift in range(-(-9 // B)):
                pos = torch.tensor(_positions(B, shift, max_len, block_n, splits), dtype=torch.long)
                qkv = (torch.randn(B, (n_q + 2 * n_kv) * D) * 2).to(dtype)
                ref = _reference(qkv, k_pool, v_pool, table, slot, pos, n_q, n_kv)
                for call in range(2):
                    got = attention.decode_attention(qkv, k_pool, v_pool, table, slot, pos, n_q, n_kv).double()
                    err = ((got - ref).abs().max() / ref.abs().max()).item()
                    key = (f"B{B}/q{n_q}kv{n_kv}/D{D}/L{max_len}/s{splits}/{str(dtype)[6:]}"
                           f"/{shift}:pos{pos.tolist()}/call{call}")
                    res[key] = {"err": err}
                # a decode-only step's fused path (rope=): q and k rotated and this step's k, v stored by
                # the attention kernel itself, bit for bit as rotary_store followed by the plain kernel
                half = D // 2
                ang = torch.arange(max_len)[:, None] * torch.rand(half)[None, :]
                cos, sin = ang.cos().to(dtype).float().contiguous(), ang.sin().to(dtype).float().contiguous()
                kp, vp, rotated = k_pool.clone(), v_pool.clone(), qkv.clone()
                rotary_store(rotated, cos, sin, slot, pos, kp, vp, table, n_q, n_kv)
                want = attention.decode_attention(rotated, kp, vp, table, slot, pos, n_q, n_kv)
                kf, vf = k_pool.clone(), v_pool.clone()
                got = attention.decode_attention(qkv, kf, vf, table, slot, pos, n_q, n_kv, rope=(cos, sin))
                res[f"rope/B{B}/q{n_q}kv{n_kv}/D{D}/s{splits}/{str(dtype)[6:]}/{shift}"] = {
                    "out": bool(torch.equal(got, want)), "k": bool(torch.equal(kf, kp)), "v": bool(torch.equal(vf, vp))}
        attention._splits = engine_splits
    return res


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its CPU interpreter)")
def test_decode_attention_matches_reference_in_triton_interpreter():
    res = run_check(__file__, timeout=900)
    fused = {k: v for k, v in res.items() if k.startswith("rope/")}
    plain = {k: v for k, v in res.items() if not k.startswith("rope/")}
    assert len(plain) == sum(-(-9 // c[0]) for c in CASES) * 2 * 2
    tol = {"float32": 1e-5, "float16": 2e-3}  # fp16: the output's rounding (2^-11) plus the inputs'
    bad = {k: v for k, v in plain.items() if not v["err"] < tol[k.split("/")[5]]}
    assert not bad, bad
    assert len(fused) == len(plain) // 2
    bad = {k: v for k, v in fused.items() if not all(v.values())}
    assert not bad, bad


if __name__ == "__main__":
    print(json.dumps(_check()))
