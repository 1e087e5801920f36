"""Wire encoding: msgpack messages whose tensors travel as (dtype, shape, raw bytes).

No pickle anywhere: a tensor is a msgpack ext value (code 1) holding
``[dtype_name, shape, data]``; decoding checks the dtype against an allowlist
and the byte count against the shape before a tensor is built.
Frames on a stream are a 4-byte big-endian length followed by the message.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from hexswarm.errors import ProtocolError

TENSOR_EXT = 1
FRAME_HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 64 * 1024 * 1024

# dtype name -> bytes per element; only these may cross the wire.
_DTYPE_SIZES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "uint8": 1,
    "bool": 1,
}
MAX_TENSOR_DIMS = 8


def _torch():
    import torch

    return torch


def _encode_tensor(t) -> msgpack.ExtType:
    torch = _torch()
    name = str(t.dtype).removeprefix("torch.")
    if name not in _DTYPE_SIZES:
        raise ProtocolError(f"dtype {name} cannot be sent")
    t = t.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return msgpack.ExtType(TENSOR_EXT, msgpack.packb([name, list(t.shape), raw], use_bin_type=True))


def _default(obj: Any):
    if type(obj).__module__.startswith("torch") and hasattr(obj, "dtype") and hasattr(obj, "shape"):
        return _encode_tensor(obj)
    raise ProtocolError(f"cannot encode {type(obj).__name__}")


def tensor_nbytes(name: Any, shape: Any) -> int:
    """Bytes of a tensor of dtype `name` and `shape`; ProtocolError unless both are allowed."""
    if name not in _DTYPE_SIZES:
        raise ProtocolError(f"dtype {name!r} not allowed")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_TENSOR_DIMS
        or not all(isinstance(d, int) and 0 <= d < 2**31 for d in shape)
    ):
        raise ProtocolError(f"bad tensor shape {shape!r}")
    count = 1
    for d in shape:
        count *= d
    return count * _DTYPE_SIZES[name]


def decode_tensor(payload: bytes):
    try:
        name, shape, raw = msgpack.unpackb(payload, raw=False)
    except Exception as e:
        raise ProtocolError(f"bad tensor payload: {e}") from None
    nbytes = tensor_nbytes(name, shape)
    if not isinstance(raw, bytes):
        raise ProtocolError("tensor data is not bytes")
    if nbytes != len(raw):
        raise ProtocolError(f"tensor of shape {shape} {name} cannot hold {len(raw)} bytes")
    torch = _torch()
    dtype = getattr(torch, name)
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)


def _ext_hook(code: int, data: bytes):
    if code == TENSOR_EXT:
        return decode_tensor(data)
    raise ProtocolError(f"unknown ext type {code}")


def _no_ext(code: int, data: bytes):
    raise ProtocolError(f"ext type {code} where no tensor belongs")


def encode(obj: Any) -> bytes:
    """Encode a message (dicts, lists, str, bytes, numbers, torch tensors)."""
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def decode(data: bytes, max_size: int = DEFAULT_MAX_FRAME, tensors: bool = False) -> Any:
    """Decode one message; any malformed input raises ProtocolError.  Tensors are taken only where a
    protocol carries them (`tensors=True`: pipeline frames, engine and TP channels); anywhere else a
    tensor is refused here, so no handler meets one where it expects a number, a string or a list
    (a tensor in a submit frame reached `bool(...)` and raised past the parser: chaos run, 2026-11-26)."""
    if len(data) > max_size:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {max_size}-byte limit")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            ext_hook=_ext_hook if tensors else _no_ext,
            strict_map_key=False,
        )
    except ProtocolError:
        raise
    except Exception as e:
        raise ProtocolError(f"malformed message: {type(e).__name__}: {e}") from None


def frame(obj: Any, max_size: int = DEFAULT_MAX_FRAME) -> bytes:
    """A length-prefixed frame for a stream."""
    body = encode(obj)
    if len(body) > max_size:
        raise ProtocolError(f"message of {len(body)} bytes exceeds the {max_size}-byte limit")
    return FRAME_HEADER.pack(len(body)) + body


def frame_length(header: bytes, max_size: int = DEFAULT_MAX_FRAME) -> int:
    """Parse and bound-check a frame header."""
    if len(header) != FRAME_HEADER.size:
        raise ProtocolError("truncated frame header")
    (n,) = FRAME_HEADER.unpack(header)
    if n > max_size:
        raise ProtocolError(f"frame of {n} bytes exceeds the {max_size}-byte limit")
    return n
