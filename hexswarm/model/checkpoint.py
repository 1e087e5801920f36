"""Read tensor slices from a HF checkpoint directory without loading the whole model.

safetensors files (single or sharded with an index) are opened lazily and each
rank reads only the rows/columns it owns through `get_slice`.  `pytorch_model*.bin`
is a fallback, read with `torch.load(weights_only=True, mmap=True)` so no code
in the file can run and untouched tensors stay on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hexswarm.errors import UserError


class CheckpointReader:
    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise UserError(f"model directory {self.dir} does not exist")
        self._where: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        self._bin: dict[Path, dict] = {}
        self._index_files()

    def _index_files(self) -> None:
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise UserError(f"{index} is corrupt: {e}") from None
            self._where = {name: self.dir / f for name, f in weight_map.items()}
            for f in set(self._where.values()):
                if not f.is_file():
                    raise UserError(f"checkpoint file {f} named in {index.name} is missing")
        elif single.is_file():
            self._where = {name: single for name in self._safe(single).keys()}
        else:
            bins = sorted(self.dir.glob("pytorch_model*.bin"))
            if not bins:
                raise UserError(f"no model.safetensors, safetensors index or pytorch_model*.bin in {self.dir}")
            for f in bins:
                for name in self._bin_state(f):
                    self._where[name] = f

    def _safe(self, path: Path):
        handle = self._open.get(path)
        if handle is None:
            from safetensors import safe_open

            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as e:
                raise UserError(f"checkpoint file {path} is corrupt: {e}") from None
            self._open[path] = handle
        return handle

    def _bin_state(self, path: Path) -> dict:
        state = self._bin.get(path)
        if state is None:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise UserError(f"checkpoint file {path} is corrupt: {e}") from None
            self._bin[path] = state
        return state

    def names(self) -> list[str]:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def shape(self, name: str) -> list[int]:
        path = self._where_or_fail(name)
        if path.suffix == ".bin":
            return list(self._bin_state(path)[name].shape)
        return list(self._safe(path).get_slice(name).get_shape())

    def _where_or_fail(self, name: str) -> Path:
        try:
            return self._where[name]
        except KeyError:
            raise UserError(f"checkpoint in {self.dir} lacks tensor {name}") from None

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The tensor, or only [start:stop) along `dim`, read from disk."""
        path = self._where_or_fail(name)
        try:
            if path.suffix == ".bin":
                t = self._bin_state(path)[name]
                if dim is not None:
                    t = t.narrow(dim, start, (stop if stop is not None else t.shape[dim]) - start)
                return t.clone()
            sl = self._safe(path).get_slice(name)
            if dim is None:
                return sl[:]
            index = [slice(None)] * len(sl.get_shape())
            index[dim] = slice(start, stop)
            return sl[tuple(index)]
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot read tensor {name} from {path}: {e}") from None
