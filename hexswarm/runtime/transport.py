"""Messages between ranks of one host over torch.distributed.

Objects are encoded with the wire codec (msgpack + raw tensors, no pickle) and
sent as a length tensor followed by a byte tensor.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from hexswarm.net import codec


def send_obj(obj: Any, dst: int) -> None:
    data = codec.encode(obj)
    dist.send(torch.tensor([len(data)], dtype=torch.int64), dst)
    dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), dst)


def recv_obj(src: int) -> Any:
    n = torch.empty(1, dtype=torch.int64)
    dist.recv(n, src)
    buf = torch.empty(int(n[0]), dtype=torch.uint8)
    dist.recv(buf, src)
    return codec.decode(buf.numpy().tobytes(), max_size=1 << 40, tensors=True)


def broadcast_obj(obj: Any, pg, device: torch.device | str = "cpu") -> Any:
    """Broadcast from the group's local rank 0 (the stage leader) over process group `pg`.

    The leader passes obj; the others pass None and get it.  `pg` is a ProcessGroup: from
    dist.new_group, or built standalone from a store.  The bytes travel as tensors on
    `device`: a CUDA device for an NCCL group (NCCL moves no CPU tensors), CPU for gloo.
    """
    device = torch.device(device)
    if pg.rank() == 0:
        data = codec.encode(obj)
        pg.broadcast(torch.tensor([len(data)], dtype=torch.int64, device=device), 0).wait()
        pg.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device), 0).wait()
        return obj
    n = torch.empty(1, dtype=torch.int64, device=device)
    pg.broadcast(n, 0).wait()
    buf = torch.empty(int(n[0]), dtype=torch.uint8, device=device)
    pg.broadcast(buf, 0).wait()
    return codec.decode(buf.cpu().numpy().tobytes(), max_size=1 << 40, tensors=True)
