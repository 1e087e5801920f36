"""A checkpoint being fetched from peers, on local disk: verified blocks, then safetensors files.

Layout of the cache folder (one per model fingerprint):

- ``manifest.msgpack``: the manifest the fetch follows (see manifest.py);
- ``blocks/<hex digest>``: blocks received and verified, kept across restarts (an interrupted fetch
  resumes from them; each is hashed again before use, a damaged one is dropped);
- the side files (config.json, tokenizer ...) and, per layer, ``layer-<i>.safetensors`` (other
  tensors: ``tensor-<name>.safetensors``) with ``model.safetensors.index.json``: a normal indexed HF
  checkpoint, so `CheckpointReader` loads it like any other.  A file is written (atomically) only
  from verified blocks; its blocks are deleted afterwards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hexswarm.model.manifest import LAYER, digest, tensor_bytes

INDEX = "model.safetensors.index.json"
MANIFEST_FILE = "manifest.msgpack"
TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def group_file(name: str) -> str:
    """The cache file a tensor is written to: one per layer, one per other tensor."""
    m = LAYER.match(name)
    return f"layer-{int(m.group(1)):05d}.safetensors" if m else f"tensor-{name}.safetensors"


class WeightCache:
    def __init__(self, root: Path, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest
        self.blocks_dir = self.root / "blocks"
        self.blocks_dir.mkdir(parents=True, exist_ok=True)
        self._verified: set[bytes] = set()

    def save_manifest(self, body: bytes) -> None:
        _write_atomic(self.root / MANIFEST_FILE, body)

    # ---- blocks ----------------------------------------------------------------------------
    def _block_path(self, d: bytes) -> Path:
        return self.blocks_dir / d.hex()

    def has_block(self, d: bytes) -> bool:
        """A verified copy of block `d` is on disk (one left by an earlier run is hashed first)."""
        if d in self._verified:
            return True
        p = self._block_path(d)
        if not p.is_file():
            return False
        if digest(p.read_bytes()) != d:
            p.unlink(missing_ok=True)  # torn or damaged: fetched again
            return False
        self._verified.add(d)
        return True

    def put_block(self, d: bytes, data: bytes) -> bool:
        """Keep `data` as block `d`; False (nothing written) when it does not hash to `d`."""
        if digest(data) != d:
            return False
        _write_atomic(self._block_path(d), data)
        self._verified.add(d)
        return True

    def _read_blocks(self, blocks: list[bytes]) -> bytes:
        return b"".join(self._block_path(d).read_bytes() for d in blocks)

    # ---- what is still needed --------------------------------------------------------------
    def index(self) -> dict[str, str]:
        try:
            return json.loads((self.root / INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError):
            return {}

    def missing_tensors(self, names: list[str]) -> list[str]:
        have = self.index()
        return [n for n in names if not (n in have and (self.root / have[n]).is_file())]

    def missing_files(self) -> list[str]:
        return [n for n in self.manifest["files"] if not (self.root / n).is_file()]

    def blocks_of(self, files: list[str], tensors: list[str]) -> list[tuple[bytes, int]]:
        """(digest, size) of each distinct block of these files and tensors, in order."""
        bs = self.manifest["block_size"]
        seen: dict[bytes, int] = {}
        for what, names in (("files", files), ("tensors", tensors)):
            for name in names:
                entry = self.manifest[what][name]
                size = entry["size"] if what == "files" else tensor_bytes(entry)
                for i, d in enumerate(entry["blocks"]):
                    seen.setdefault(d, min(bs, size - i * bs))
        return list(seen.items())

    # ---- assembly --------------------------------------------------------------------------
    def write_files(self) -> None:
        for name in self.missing_files():
            _write_atomic(self.root / name, self._read_blocks(self.manifest["files"][name]["blocks"]))

    def write_tensors(self, names: list[str]) -> None:
        """Write these tensors (every block verified on disk) into their group files and the index,
        then drop blocks no other missing tensor needs."""
        import torch
        from safetensors.torch import save_file

        groups: dict[str, list[str]] = {}
        for name in self.missing_tensors(names):
            groups.setdefault(group_file(name), []).append(name)
        weight_map = self.index()
        for fname, members in sorted(groups.items()):
            path = self.root / fname
            tensors = {}
            if path.is_file():  # a group written earlier with other members keeps them
                from safetensors.torch import load_file

                tensors.update(load_file(path))
            for name in members:
                meta = self.manifest["tensors"][name]
                raw = bytearray(self._read_blocks(meta["blocks"]))
                dtype = getattr(torch, TORCH_DTYPES[meta["dtype"]])
                t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
                tensors[name] = t.reshape(meta["shape"])
            tmp = path.with_name(path.name + ".part")
            save_file(tensors, str(tmp))
            os.replace(tmp, path)
            weight_map.update({n: fname for n in tensors})
            _write_atomic(self.root / INDEX, json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1).encode())
        self._drop_unneeded_blocks()

    def _drop_unneeded_blocks(self) -> None:
        still = {d for n in self.missing_tensors(list(self.manifest["tensors"]))
                 for d in self.manifest["tensors"][n]["blocks"]}
        for p in self.blocks_dir.iterdir():
            try:
                d = bytes.fromhex(p.name)
            except ValueError:
                p.unlink(missing_ok=True)  # a .part left by a crash
                continue
            if d not in still:
                p.unlink(missing_ok=True)
                self._verified.discard(d)


def load_saved_manifest(root: Path, max_bytes: int) -> bytes | None:
    """The manifest body an earlier run saved here, if any."""
    p = Path(root) / MANIFEST_FILE
    try:
        body = p.read_bytes()
    except OSError:
        return None
    return body if len(body) <= max_bytes else None

