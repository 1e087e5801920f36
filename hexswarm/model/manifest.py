"""The weights manifest: what a HF safetensors checkpoint holds, as content hashes of fixed-size blocks.

A holder builds it from its checkpoint folder (safetensors headers read directly: no torch, nothing
loaded), peers fetch blocks by their sha256 and check each one, so a holder is trusted for nothing but
the manifest, and the manifest is bound to the swarm's model fingerprint by the hash of config.json
(the fingerprint is that hash's first 16 hex digits, see source.model_fingerprint).

Manifest (a codec map): ``{"model": fingerprint, "block_size": B, "files": {name: {"size", "blocks"}},
"tensors": {name: {"dtype", "shape", "blocks"}}}``; `blocks` are 32-byte sha256 digests of the bytes
cut in B-byte pieces (a tensor's bytes as safetensors lays them out: little-endian, row-major).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hexswarm.errors import ProtocolError, UserError

BLOCK_SIZE = 1 << 20  # 1 MiB: a block is one request/reply frame (well under the 64 MiB frame limit)
MAX_BLOCK_SIZE = 4 << 20
MIN_BLOCK_SIZE = 1 << 10
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# small files beside the weights that a served stage needs (config, tokenizer, chat template)
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "chat_template.jinja")
MAX_FILE_BYTES = 64 << 20
MAX_TENSORS = 1 << 16
MAX_DIMS = 8
MAX_TOTAL_BYTES = 4 << 40  # 4 TiB: larger than any model this serves
SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")  # tensor and file names: no paths, no dotfiles
LAYER = re.compile(r"^model\.layers\.(\d+)\.")
MANIFEST_DOMAIN = b"hexswarm/manifest/1\x00"
MAX_MANIFEST_BYTES = 48 << 20  # ~1.4M block digests: a 1.4 TB checkpoint at 1 MiB blocks


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@dataclass(frozen=True)
class Where:
    """Where a block's bytes lie in a holder's files."""

    path: Path
    offset: int
    length: int


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            return sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index} is corrupt: {e}") from None
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise UserError(f"{model_dir} holds no safetensors checkpoint: only those can be served to peers")


def _header(path: Path) -> tuple[dict, int]:
    """(the safetensors header, where the data starts)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100 << 20:
            raise UserError(f"{path}: safetensors header of {n} bytes")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _cut(path: Path, offset: int, length: int, block_size: int, index: dict[bytes, Where]) -> list[bytes]:
    """Hash [offset, offset+length) of `path` in blocks; record where each block lies."""
    out = []
    with open(path, "rb") as f:
        f.seek(offset)
        for start in range(0, length, block_size):
            n = min(block_size, length - start)
            data = f.read(n)
            if len(data) != n:
                raise UserError(f"{path} is truncated")
            d = digest(data)
            index.setdefault(d, Where(path, offset + start, n))
            out.append(d)
    return out


def build_manifest(model_dir: str | Path, fingerprint: str, block_size: int = BLOCK_SIZE) -> tuple[dict, dict[bytes, Where]]:
    """(the manifest of a safetensors checkpoint folder, digest -> where its bytes lie)."""
    model_dir = Path(model_dir)
    index: dict[bytes, Where] = {}
    files = {}
    for name in SIDE_FILES:
        p = model_dir / name
        if p.is_file() and p.stat().st_size <= MAX_FILE_BYTES:
            files[name] = {"size": p.stat().st_size, "blocks": _cut(p, 0, p.stat().st_size, block_size, index)}
    tensors = {}
    for path in _safetensors_files(model_dir):
        header, base = _header(path)
        for name, meta in sorted(header.items()):
            start, stop = meta["data_offsets"]
            tensors[name] = {"dtype": meta["dtype"], "shape": list(meta["shape"]),
                             "blocks": _cut(path, base + start, stop - start, block_size, index)}
    manifest = {"model": fingerprint, "block_size": block_size, "files": files, "tensors": tensors}
    check_manifest(manifest, fingerprint)  # a holder never hands out what a fetcher would refuse
    return manifest, index


# ---- checks on a manifest from a peer (hostile input) ----------------------------------------------


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise ProtocolError(f"manifest: {what}")


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _blocks(v: Any, size: int, block_size: int, what: str) -> None:
    _need(isinstance(v, list) and len(v) == math.ceil(size / block_size), f"{what}: block count")
    _need(all(isinstance(d, bytes) and len(d) == 32 for d in v), f"{what}: blocks must be 32-byte digests")


def tensor_bytes(meta: dict) -> int:
    return math.prod(meta["shape"]) * DTYPE_BYTES[meta["dtype"]]


def check_manifest(m: Any, fingerprint: str) -> dict:
    """The manifest if it is well formed and bound to `fingerprint`; ProtocolError otherwise."""
    _need(isinstance(m, dict) and set(m) == {"model", "block_size", "files", "tensors"}, "fields")
    _need(m["model"] == fingerprint, "for another model")
    bs = m["block_size"]
    _need(_is_int(bs, MIN_BLOCK_SIZE, MAX_BLOCK_SIZE), "block_size out of range")
    files, tensors = m["files"], m["tensors"]
    _need(isinstance(files, dict) and len(files) <= len(SIDE_FILES), "files")
    for name, meta in files.items():
        _need(name in SIDE_FILES, f"unexpected file {name!r}")
        _need(isinstance(meta, dict) and set(meta) == {"size", "blocks"} and _is_int(meta["size"], 0, MAX_FILE_BYTES),
              f"file {name}")
        _blocks(meta["blocks"], meta["size"], bs, f"file {name}")
    config = files.get("config.json")
    # the binding: the fingerprint is the hash of config.json, which must be one block to be checked here
    _need(config is not None and len(config["blocks"]) == 1 and config["blocks"][0].hex()[:16] == fingerprint,
          "config.json does not hash to the model fingerprint")
    _need(isinstance(tensors, dict) and 0 < len(tensors) <= MAX_TENSORS, "tensors")
    total = 0
    for name, meta in tensors.items():
        _need(isinstance(name, str) and SAFE_NAME.match(name) is not None, "tensor name")
        _need(isinstance(meta, dict) and set(meta) == {"dtype", "shape", "blocks"} and meta["dtype"] in DTYPE_BYTES,
              f"tensor {name}")
        shape = meta["shape"]
        _need(isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_is_int(d, 0, 1 << 40) for d in shape),
              f"tensor {name}: shape")
        size = math.prod(shape) * DTYPE_BYTES[meta["dtype"]]
        total += size
        _need(total <= MAX_TOTAL_BYTES, "larger than any model")
        _blocks(meta["blocks"], size, bs, f"tensor {name}")
    return m


def stage_tensors(names: list[str], layer_start: int, layer_end: int, first: bool, last: bool,
                  tied: bool = False) -> list[str]:
    """The checkpoint tensors a stage of layers [layer_start, layer_end) reads (see stage.load_stage):
    its layers, the embedding on the first stage, everything else (final norm, lm_head, or the tied
    embedding) on the last."""
    out = []
    has_head = "lm_head.weight" in names
    for name in names:
        m = LAYER.match(name)
        if m is not None:
            if layer_start <= int(m.group(1)) < layer_end:
                out.append(name)
        elif "embed_tokens" in name:
            if first or (last and (tied or not has_head)):
                out.append(name)
        elif last:
            out.append(name)
    return out
