"""What a host can compute with: GPUs detected with torch (or the CPU), or the config's list.

`devices: auto` reads each CUDA device's name, memory and compute capability
and measures a short matmul TFLOP/s and a copy bandwidth; measurements are
cached in <data_dir>/device_probe.json keyed by device name, capability and
torch version, so restarts do not re-probe. A host without GPUs reports its
CPU as one device (used by tests and CPU serving).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PROBE_CACHE = "device_probe.json"
GIB = 1024**3


@dataclass
class Device:
    kind: str  # "cuda", "cpu", or what the config says
    name: str
    index: int
    memory_gib: float
    tflops: float  # measured (or configured) dense matmul TFLOP/s
    mem_bw_gbs: float  # measured (or configured) memory bandwidth, GB/s
    capability: str | None = None  # CUDA compute capability, "8.0"

    def to_wire(self) -> dict:
        return asdict(self)


def from_config(devices: list[dict]) -> list[Device]:
    return [
        Device(d["kind"], d["name"], i, float(d["memory"]), float(d["tflops"]), float(d["mem_bw"]))
        for i, d in enumerate(devices)
    ]


def _time_it(fn, sync, repeats: int) -> float:
    fn()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def probe(device: str) -> tuple[float, float]:
    """(TFLOP/s, GB/s) from a short matmul and a copy on `device` ("cpu", "cuda:0")."""
    import torch

    dev = torch.device(device)
    is_cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if is_cuda else (lambda: None)
    n = 4096 if is_cuda else 512
    dtype = torch.float16 if is_cuda else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    seconds = _time_it(lambda: torch.mm(a, b), sync, 10 if is_cuda else 3)
    tflops = 2 * n**3 / seconds / 1e12
    nbytes = (256 if is_cuda else 32) * 1024 * 1024
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    seconds = _time_it(lambda: dst.copy_(src), sync, 10 if is_cuda else 3)
    mem_bw = 2 * nbytes / seconds / 1e9  # read + write
    return round(tflops, 3), round(mem_bw, 1)


def _cached_probe(data_dir: Path, key: str, device: str) -> tuple[float, float]:
    path = data_dir / PROBE_CACHE
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return tuple(cache[key])  # type: ignore[return-value]
    log.info("probing %s (cached in %s)", device, path)
    result = probe(device)
    cache[key] = list(result)
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=1))
    os.replace(tmp, path)
    return result


def _cpu_memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError):
        return 0.0


def detect(data_dir: Path) -> list[Device]:
    """CUDA devices, or the CPU when there are none."""
    import torch

    devices = []
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(i)
        capability = f"{props.major}.{props.minor}"
        key = f"cuda|{props.name}|{capability}|{torch.__version__}"
        tflops, mem_bw = _cached_probe(data_dir, key, f"cuda:{i}")
        devices.append(Device("cuda", props.name, i, round(props.total_memory / GIB, 2), tflops, mem_bw, capability))
    if devices:
        return devices
    key = f"cpu|{os.cpu_count()}|{torch.__version__}"
    tflops, mem_bw = _cached_probe(data_dir, key, "cpu")
    return [Device("cpu", f"cpu x{os.cpu_count()}", 0, round(_cpu_memory_gib(), 2), tflops, mem_bw)]


def inventory(devices_setting: str | list[dict], data_dir: Path) -> list[Device]:
    """The devices a node announces, from its `devices` config value."""
    if devices_setting == "auto":
        return detect(data_dir)
    return from_config(devices_setting)  # type: ignore[arg-type]
