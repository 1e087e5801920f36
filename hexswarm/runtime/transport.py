"""Messages between ranks of one host over torch.distributed (gloo for CPU tensors).

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
    return codec.decode(buf.numpy().tobytes(), max_size=1 << 40)


def broadcast_obj(obj: Any, src: int, group) -> Any:
    """The leader (global rank `src`) passes obj; the others pass None and get it."""
    if dist.get_rank() == src:
        data = codec.encode(obj)
        n = torch.tensor([len(data)], dtype=torch.int64)
        dist.broadcast(n, src, group=group)
        dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), src, group=group)
        return obj
    n = torch.empty(1, dtype=torch.int64)
    dist.broadcast(n, src, group=group)
    buf = torch.empty(int(n[0]), dtype=torch.uint8)
    dist.broadcast(buf, src, group=group)
    return codec.decode(buf.numpy().tobytes(), max_size=1 << 40)
