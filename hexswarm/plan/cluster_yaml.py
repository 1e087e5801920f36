"""Cluster YAML files (examples in ``node_configs/clusters/``).

    name: case-study
    gpu_kinds:                 # optional: kinds missing from the built-in catalog, or overrides
      MyGPU: {memory_gib: 24, tflops: 100, mem_bw_gbyte_s: 900}
      H100: {calibration: {decode: [[1, 0.00568], [32, 0.0070]], context: 160,   # measured engine speed on
                           prefill_tokens_per_s: 20000, prompt: 128}}           # a kind (plan/calibration.py)
    network:
      intra_region: {latency_ms: 0.5, gbit_s: 10}
      inter_region: {latency_ms: 10, gbit_s: 1}
      region_pairs: [{between: [us, eu], latency_ms: 40, gbit_s: 0.5}]   # optional
      host_pairs: [{between: [a, b], latency_ms: 0.1, gbit_s: 25}]       # optional
    hosts:
      - name: box-a
        region: us
        gpus: {A6000: 4}                          # kind: count
        intra: {latency_us: 10, gbyte_s: 25}      # optional GPU-GPU link inside the host
        count: 2                                  # optional: box-a-0, box-a-1

A link gives ``latency_ms`` or ``latency_us``, and ``gbit_s`` or ``gbyte_s``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from hexswarm.errors import UserError
from hexswarm.plan.calibration import CalibrationError, parse_calibration
from hexswarm.plan.cluster import DEFAULT_INTRA_HOST, GIB, GPU_CATALOG, Cluster, GpuKind, Host, Link, cluster_from_hosts


def _link(d: Mapping[str, Any], where: str) -> Link:
    if not isinstance(d, Mapping):
        raise UserError(f"{where}: expected a mapping with latency and bandwidth, got {d!r}")
    if "latency_ms" in d:
        lat = float(d["latency_ms"]) * 1e-3
    elif "latency_us" in d:
        lat = float(d["latency_us"]) * 1e-6
    else:
        raise UserError(f"{where}: give latency_ms or latency_us")
    if "gbit_s" in d:
        bw = float(d["gbit_s"]) * 1e9 / 8
    elif "gbyte_s" in d:
        bw = float(d["gbyte_s"]) * 1e9
    else:
        raise UserError(f"{where}: give gbit_s or gbyte_s")
    if bw <= 0 or lat < 0:
        raise UserError(f"{where}: latency must be >= 0 and bandwidth > 0")
    return Link(lat, bw)


def _kinds(d: Mapping[str, Any] | None) -> dict[str, GpuKind]:
    """The catalogue plus the file's kinds; a kind may give only a ``calibration`` (on a catalogue kind)."""
    kinds = dict(GPU_CATALOG)
    for name, spec in (d or {}).items():
        base = GPU_CATALOG.get(str(name))
        try:
            if not isinstance(spec, Mapping):
                raise TypeError(f"expected a mapping, got {spec!r}")
            calibration = parse_calibration(spec["calibration"]) if spec.get("calibration") else None
            if base is not None and not {"memory_gib", "tflops", "mem_bw_gbyte_s"} & set(spec):
                kinds[str(name)] = replace(base, calibration=calibration)
                continue
            kinds[str(name)] = GpuKind(
                name=str(name),
                memory_bytes=int(float(spec["memory_gib"]) * GIB),
                tflops=float(spec["tflops"]),
                mem_bw_Bps=float(spec["mem_bw_gbyte_s"]) * 1e9,
                calibration=calibration,
            )
        except CalibrationError as e:
            raise UserError(f"gpu_kinds.{name}.calibration: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"gpu_kinds.{name}: need memory_gib, tflops, mem_bw_gbyte_s ({e})") from None
    return kinds


def _pairs(entries: Any, where: str) -> dict[tuple[str, str], Link]:
    out: dict[tuple[str, str], Link] = {}
    for k, e in enumerate(entries or []):
        between = e.get("between") if isinstance(e, Mapping) else None
        if not (isinstance(between, list) and len(between) == 2):
            raise UserError(f"{where}[{k}]: needs between: [a, b]")
        out[(str(between[0]), str(between[1]))] = _link(e, f"{where}[{k}]")
    return out


def cluster_from_yaml_dict(doc: Mapping[str, Any], default_name: str = "cluster") -> Cluster:
    if not isinstance(doc, Mapping) or "hosts" not in doc:
        raise UserError("cluster file needs a top-level 'hosts' list")
    kinds = _kinds(doc.get("gpu_kinds"))
    net = doc.get("network") or {}
    intra_region = _link(net.get("intra_region", {"latency_ms": 0.5, "gbit_s": 10}), "network.intra_region")
    inter_region = _link(net.get("inter_region", {"latency_ms": 10, "gbit_s": 1}), "network.inter_region")
    hosts: list[Host] = []
    for k, h in enumerate(doc["hosts"] or []):
        where = f"hosts[{k}]"
        if not isinstance(h, Mapping) or "name" not in h or "gpus" not in h:
            raise UserError(f"{where}: needs name and gpus")
        gpus: list[GpuKind] = []
        for kind, count in dict(h["gpus"]).items():
            if str(kind) not in kinds:
                raise UserError(f"{where}: unknown GPU kind {kind!r}: add it under gpu_kinds (known: {', '.join(kinds)})")
            gpus += [kinds[str(kind)]] * int(count)
        if not gpus:
            raise UserError(f"{where}: has no GPUs")
        intra = _link(h["intra"], f"{where}.intra") if "intra" in h else DEFAULT_INTRA_HOST
        count = int(h.get("count", 1))
        names = [str(h["name"])] if count == 1 else [f"{h['name']}-{i}" for i in range(count)]
        for name in names:
            hosts.append(Host(name=name, gpus=tuple(gpus), region=str(h.get("region", "default")), intra=intra))
    return cluster_from_hosts(
        hosts,
        _pairs(net.get("region_pairs"), "network.region_pairs"),
        intra_region=intra_region,
        inter_region=inter_region,
        overrides=_pairs(net.get("host_pairs"), "network.host_pairs"),
        name=str(doc.get("name", default_name)),
    )


def load_cluster_yaml(path: str | Path) -> Cluster:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"cluster file {p} does not exist")
    try:
        doc = yaml.safe_load(p.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None
    return cluster_from_yaml_dict(doc, default_name=p.stem)
