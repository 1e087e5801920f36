"""GPU handoff between engine processes (runtime/gpu_handoff.py): a ring exported by one process
is read by another on the same GPU, slot by slot, ordered by the interprocess events.  Needs CUDA;
the CPU suite checks the host path of the same links in test_local_link.py."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA IPC)")


def _reader(conn) -> None:
    from hexswarm.runtime.gpu_handoff import HandoffIn

    exported = conn.recv()
    ring = HandoffIn(exported, torch.device("cuda", 0))
    while True:
        ref = conn.recv()
        if ref is None:
            return
        x = ring.handoff(ref).take()
        conn.send(x.float().sum(dim=-1).cpu().tolist())


def test_a_ring_slot_is_read_by_another_process_after_the_writer_s_kernels():
    from hexswarm.runtime.gpu_handoff import HandoffOut, device_uuid

    assert device_uuid("cuda:0") and device_uuid("cpu") is None
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_reader, args=(child,), daemon=True)
    proc.start()
    try:
        like = torch.zeros(4, 64, dtype=torch.bfloat16, device="cuda")
        ring = HandoffOut(like, capacity=8, depth=2)
        assert ring.fits(like) and not ring.fits(torch.zeros(9, 64, dtype=torch.bfloat16, device="cuda"))
        assert not ring.fits(torch.zeros(4, 64, device="cuda"))  # another dtype
        parent.send(ring.export())
        for step in range(6):
            # a slow kernel before the write: the reader must see the written values, not stale ones
            a = torch.randn(2048, 2048, device="cuda")
            for _ in range(20):
                a = a @ a / 64
            x = torch.full((3 + step % 2, 64), float(step + 1), device="cuda").to(torch.bfloat16) + 0 * a[0, :64].to(torch.bfloat16)
            ref = ring.put(x)
            assert ref == [step % 2, x.shape[0]]
            parent.send(ref)
            sums = parent.recv()
            assert sums == [64.0 * (step + 1)] * x.shape[0]
    finally:
        parent.send(None)
        proc.join(10)
