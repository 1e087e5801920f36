"""Stage engines that share one GPU hand their step results over on the GPU itself.

Over a local link (runtime/local_link.py) a `forward` message otherwise carries its activations
through the host: the sender waits for its GPU (`out.cpu()`), writes the bytes, and the receiver
copies them back; the tokens come back the same way, and the GPU idles while the hosts pass the
token around (+1.4 ms per extra stage at batch 1 on an H100, docs/BENCHMARKS.md).  Here the
sender copies its output into a ring of buffers it shares with the receiver by CUDA IPC and
records an interprocess event; the message says only which ring slot and how many rows.  The
receiver makes its stream wait on that event and reads the slot, so neither host waits for the
GPU: each stage enqueues its work and passes the message on while the GPU is still busy with the
stage before, and the GPU runs the stages back to back.

Used only where the receiver is another process on the same physical GPU (CUDA IPC cannot open a
handle in the process that made it) and the step fits the ring; anything else goes through the
host as before.

Ring slots are safe to reuse: stage 0 has at most `depth` steps in flight and writes slot
k % depth only after its stream has waited on the last stage's event of step k - depth, and every
stage records its own event after it has read its input, so that wait covers every reader.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def device_uuid(device: torch.device | str) -> str | None:
    """The physical GPU's identity (the same in every process, whatever CUDA_VISIBLE_DEVICES says)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return str(torch.cuda.get_device_properties(device).uuid)


class HandoffOut:
    """The sender's ring: `depth` buffers of `capacity` rows, each with an interprocess event."""

    def __init__(self, like: torch.Tensor, capacity: int, depth: int):
        self.device = like.device
        self.capacity = capacity
        self.buffers = [torch.empty((capacity,) + tuple(like.shape[1:]), dtype=like.dtype, device=like.device)
                        for _ in range(depth)]
        self.events = [torch.cuda.Event(interprocess=True) for _ in range(depth)]
        for ev in self.events:
            ev.record(torch.cuda.current_stream(self.device))  # an IPC event gets its handle once it exists
        self._next = 0

    def export(self) -> dict:
        """What the receiver needs to open the ring (msgpack-able)."""
        torch.cuda.synchronize(self.device)  # the buffers exist before anyone maps them
        return {"dtype": str(self.buffers[0].dtype).removeprefix("torch."), "shape": list(self.buffers[0].shape),
                "buffers": [list(b.untyped_storage()._share_cuda_()) for b in self.buffers],
                "events": [ev.ipc_handle() for ev in self.events]}

    def fits(self, t: torch.Tensor) -> bool:
        ref = self.buffers[0]
        return (t.device == self.device and t.dtype == ref.dtype and t.dim() == ref.dim()
                and t.shape[1:] == ref.shape[1:] and t.shape[0] <= self.capacity)

    def put(self, t: torch.Tensor) -> list[int]:
        """Copy t into the next slot (on this thread's stream) and record its event; [slot, rows]."""
        slot = self._next
        self._next = (slot + 1) % len(self.buffers)
        n = t.shape[0]
        if n:
            self.buffers[slot][:n].copy_(t)
        self.events[slot].record(torch.cuda.current_stream(self.device))
        return [slot, n]


class HandoffIn:
    """The receiver's view of a sender's ring."""

    def __init__(self, exported: dict, device: torch.device):
        dtype = getattr(torch, exported["dtype"])
        shape = [int(s) for s in exported["shape"]]
        self.buffers = []
        with torch.cuda.device(device):
            for fields in exported["buffers"]:
                storage = torch.UntypedStorage._new_shared_cuda(*fields)
                typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)
                self.buffers.append(torch._utils._rebuild_tensor(typed, 0, shape, _contiguous_strides(shape)))
            self.events = [torch.cuda.Event.from_ipc_handle(device, h) for h in exported["events"]]
        self.capacity = shape[0]

    def valid(self, ref) -> bool:
        return (isinstance(ref, list) and len(ref) == 2 and all(type(v) is int for v in ref)
                and 0 <= ref[0] < len(self.buffers) and 0 <= ref[1] <= self.capacity)

    def handoff(self, ref: list[int]) -> Handoff:
        return Handoff(self, ref[0], ref[1])


class Handoff:
    """One message's rows in a sender's ring; `take()` (on the consuming thread) orders this
    thread's stream after the sender's writes and returns a view of them.  Read the view before
    the step ends: the sender reuses the slot after it."""

    def __init__(self, ring: HandoffIn, slot: int, n: int):
        self.ring, self.slot, self.n = ring, slot, n

    def take(self) -> torch.Tensor:
        buf = self.ring.buffers[self.slot]
        torch.cuda.current_stream(buf.device).wait_event(self.ring.events[self.slot])
        return buf[:self.n]

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n,) + tuple(self.ring.buffers[self.slot].shape[1:])


def _contiguous_strides(shape: list[int]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))
