"""NodeConfig: one YAML file per host.

Each key is one dataclass field whose metadata names its parser, so a new
key is one line here (plus, if it depends on others, a line in `_check`).
Relative paths are taken from the config file's folder. Unknown keys and bad
values raise UserError naming the key.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hexswarm.errors import UserError

_SWARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ROLES = ("head", "worker", "relay")
DEVICE_KEYS = {"kind", "name", "memory", "tflops", "mem_bw", "count"}


class _BadValue(ValueError):
    """Raised by a parser; the loader adds the key name."""


# --- parsers: (raw YAML value, config folder) -> value ----------------------


def _str_list(what: str) -> Callable[[Any, Path], list[str]]:
    def parse(raw: Any, base: Path) -> list[str]:
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not all(isinstance(x, str) and x for x in raw):
            raise _BadValue(f"expected a list of {what}")
        return list(raw)

    return parse


def _multiaddrs(require_peer_id: bool) -> Callable[[Any, Path], list[str]]:
    as_list = _str_list("multiaddrs")

    def parse(raw: Any, base: Path) -> list[str]:
        from hexswarm.net.host import parse_multiaddr, parse_peer_multiaddr

        addrs = as_list(raw, base)
        for a in addrs:
            try:
                (parse_peer_multiaddr if require_peer_id else parse_multiaddr)(a)
            except UserError as e:
                raise _BadValue(str(e)) from None
        return addrs

    return parse


def _peer_ids(raw: Any, base: Path) -> list[str] | None:
    from hexswarm.net.host import parse_peer_id

    if raw is None:
        return None
    ids = _str_list("PeerIDs")(raw, base)
    for p in ids:
        try:
            parse_peer_id(p)
        except UserError as e:
            raise _BadValue(str(e)) from None
    return ids


def _path(raw: Any, base: Path) -> Path:
    if not isinstance(raw, str) or not raw:
        raise _BadValue("expected a path")
    p = Path(raw).expanduser()
    return p if p.is_absolute() else (base / p)


def _optional_path(raw: Any, base: Path) -> Path | None:
    return None if raw is None else _path(raw, base)


def _swarm_name(raw: Any, base: Path) -> str:
    if not isinstance(raw, str) or not _SWARM_NAME.match(raw):
        raise _BadValue("expected a name of letters, digits, '_', '.', '-' (at most 64)")
    return raw


def _positive(raw: Any, base: Path) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not raw > 0:
        raise _BadValue(f"expected a positive number, got {raw!r}")
    return float(raw)


def _non_negative_int(raw: Any, base: Path) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise _BadValue(f"expected a non-negative integer, got {raw!r}")
    return raw


def _non_negative_int_or_auto(raw: Any, base: Path) -> int | None:
    """A non-negative integer, or 'auto' (stored as None)."""
    return None if raw == "auto" else _non_negative_int(raw, base)


def _roles(raw: Any, base: Path) -> list[str]:
    roles = _str_list("roles")(raw, base)
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise _BadValue(f"unknown role {bad[0]!r}; roles are {', '.join(ROLES)}")
    return roles


def _devices(raw: Any, base: Path) -> str | list[dict]:
    """'auto' or a list of {kind, memory (GiB), tflops (TFLOP/s), mem_bw (GB/s), [name], [count]}."""
    if raw == "auto":
        return "auto"
    if not isinstance(raw, list) or not raw:
        raise _BadValue("expected 'auto' or a non-empty list of devices")
    out = []
    for i, dev in enumerate(raw):
        if not isinstance(dev, dict):
            raise _BadValue(f"device {i}: expected a mapping")
        unknown = set(dev) - DEVICE_KEYS
        if unknown:
            raise _BadValue(f"device {i}: unknown key {sorted(unknown)[0]!r} (keys: {', '.join(sorted(DEVICE_KEYS))})")
        missing = {"kind", "memory", "tflops", "mem_bw"} - set(dev)
        if missing:
            raise _BadValue(f"device {i}: missing {sorted(missing)[0]!r}")
        if not isinstance(dev["kind"], str) or not dev["kind"]:
            raise _BadValue(f"device {i}: kind must be a name such as cuda or cpu")
        parsed = {"kind": dev["kind"], "name": str(dev.get("name", dev["kind"]))}
        for k in ("memory", "tflops", "mem_bw"):
            try:
                parsed[k] = _positive(dev[k], base)
            except _BadValue as e:
                raise _BadValue(f"device {i}: {k}: {e}") from None
        count = dev.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise _BadValue(f"device {i}: count must be a positive integer")
        out.extend(dict(parsed) for _ in range(count))
    return out


def _choice(*allowed: str) -> Callable[[Any, Path], str]:
    def parse(raw: Any, base: Path) -> str:
        if raw not in allowed:
            raise _BadValue(f"expected one of {', '.join(map(str, allowed))}, got {raw!r}")
        return raw

    return parse


def _positive_int(raw: Any, base: Path) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise _BadValue(f"expected a positive integer, got {raw!r}")
    return raw


def _positive_int_or_auto(raw: Any, base: Path) -> int:
    """A positive integer, or 'auto' (stored as 0)."""
    return 0 if raw == "auto" else _positive_int(raw, base)


def _fraction(raw: Any, base: Path) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not 0 < raw <= 1:
        raise _BadValue(f"expected a number in (0, 1], got {raw!r}")
    return float(raw)


def _serve_layout(raw: Any, base: Path) -> dict | None:
    """{hetero_config: [tp, ...], pp_partition: [layers, ...], replicas: n}: pin the layout's shape."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - {"hetero_config", "pp_partition", "replicas"}:
        raise _BadValue("expected {hetero_config: [...], pp_partition: [...], replicas: n}")
    hc, pp = raw.get("hetero_config"), raw.get("pp_partition")
    for name, value in (("hetero_config", hc), ("pp_partition", pp)):
        if not isinstance(value, list) or not value or not all(isinstance(v, int) and v > 0 for v in value):
            raise _BadValue(f"{name} must be a list of positive integers")
    if len(hc) != len(pp):
        raise _BadValue(f"hetero_config has {len(hc)} stages, pp_partition {len(pp)}")
    return {"hetero_config": hc, "pp_partition": pp, "replicas": _positive_int(raw.get("replicas", 1), base)}


def _optional_peer_id(raw: Any, base: Path) -> str | None:
    if raw is None:
        return None
    ids = _peer_ids([raw], base)
    return ids[0]


def _bool(raw: Any, base: Path) -> bool:
    if not isinstance(raw, bool):
        raise _BadValue(f"expected true or false, got {raw!r}")
    return raw


def _log_level(raw: Any, base: Path) -> str:
    levels = ("debug", "info", "warning", "error")
    if raw not in levels:
        raise _BadValue(f"expected one of {', '.join(levels)}")
    return raw


def _http_listen(raw: Any, base: Path) -> str | None:
    """'host:port' for the HTTP API (IPv6 hosts in brackets: '[::1]:8000'), or null: no HTTP API."""
    if raw is None:
        return None
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})", raw) if isinstance(raw, str) else None
    if m is None or int(m.group(2)) > 65535:
        raise _BadValue(f"expected host:port such as 127.0.0.1:8000, got {raw!r}")
    return raw


def _optional_secret(raw: Any, base: Path) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw or any(c.isspace() for c in raw):
        raise _BadValue("expected a non-empty string without spaces")
    return raw


_FINGERPRINT = re.compile(r"^[0-9a-f]{16}$")


def _optional_fingerprint(raw: Any, base: Path) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not _FINGERPRINT.match(raw):
        raise _BadValue("expected a model fingerprint: 16 lowercase hex digits (`hexswarm peers` shows each peer's)")
    return raw


def _key(parse: Callable[[Any, Path], Any], doc: str) -> dict:
    return {"parse": parse, "doc": doc}


@dataclass
class NodeConfig:
    listen: list[str] = field(
        default_factory=lambda: ["/ip4/0.0.0.0/tcp/4001"],
        metadata=_key(_multiaddrs(False), "multiaddrs to listen on"),
    )
    key_file: Path | None = field(default=None, metadata=_key(_optional_path, "node key (default <data_dir>/node.key)"))
    bootstrap: list[str] = field(default_factory=list, metadata=_key(_multiaddrs(True), "peers to join through"))
    swarm: str = field(default="default", metadata=_key(_swarm_name, "swarm name; other swarms are ignored"))
    model: Path | None = field(default=None, metadata=_key(_optional_path, "checkpoint folder or .gguf file"))
    model_source: str = field(default="local", metadata=_key(_choice("local", "swarm"), "local: `model` is a checkpoint "
                              "here; swarm: fetch the model_fingerprint's tensors from peers (`model: <fingerprint>` "
                              "is short for both)"))
    model_fingerprint: str | None = field(default=None, metadata=_key(_optional_fingerprint, "the model to fetch from "
                                                                      "peers with model_source: swarm"))
    model_cache: Path | None = field(default=None, metadata=_key(_optional_path, "where fetched weights go (default "
                                                                 "<data_dir>/models/<fingerprint>)"))
    devices: str | list[dict] = field(default="auto", metadata=_key(_devices, "'auto' or a device list"))
    data_dir: Path = field(default=Path("~/.hexswarm"), metadata=_key(_path, "probe cache and default key folder"))
    allow_peers: list[str] | None = field(default=None, metadata=_key(_peer_ids, "PeerID allowlist"))
    roles: list[str] = field(default_factory=lambda: ["worker"], metadata=_key(_roles, "head, worker, relay"))
    heartbeat_s: float = field(default=2.0, metadata=_key(_positive, "inventory heartbeat interval"))
    down_after_s: float = field(default=10.0, metadata=_key(_positive, "silence before a peer is down"))
    drop_after_s: float = field(default=120.0, metadata=_key(_positive, "silence before a peer is dropped"))
    heartbeat_peers: int = field(default=8, metadata=_key(_non_negative_int, "swarm size the three timings above "
                                                            "are for: a node that knows N > this many peers "
                                                            "multiplies them by N / heartbeat_peers (0: never)"))
    bootstrap_timeout_s: float = field(
        default=30.0, metadata=_key(_positive, "give up if no bootstrap answers this long and no peer is known")
    )
    probe_s: float = field(default=5.0, metadata=_key(_positive, "latency probe interval"))
    probe_bytes: int = field(default=256 * 1024, metadata=_key(_non_negative_int, "throughput probe size (0: off)"))
    log_level: str = field(default="info", metadata=_key(_log_level, "debug, info, warning or error"))
    # --- serving (hexswarm.serve.serving) ---
    serve_device: str = field(default="auto", metadata=_key(_choice("auto", "cpu", "cuda"), "where stages run"))
    serve_dtype: str = field(
        default="auto", metadata=_key(_choice("auto", "float32", "bfloat16", "float16"), "weights dtype (auto: bf16 on cuda)")
    )
    max_batch: int = field(default=8, metadata=_key(_positive_int_or_auto, "KV-cache slots: requests in flight per "
                                                   "pipeline ('auto': as many as fit in gpu_memory_fraction)"))
    gpu_memory_fraction: float = field(default=0.9, metadata=_key(_fraction, "share of free GPU memory a stage's "
                                                                  "weights and KV cache may take (auto sizes)"))
    kv_tokens: int = field(default=0, metadata=_key(_positive_int_or_auto, "KV-cache positions per stage, paged in "
                                                    "blocks of 16 and shared by its requests (auto: max_batch x "
                                                    "max_seq_len, at most what fits in gpu_memory_fraction)"))
    max_step_tokens: int = field(default=0, metadata=_key(_positive_int_or_auto, "tokens in one engine step: decode "
                                                          "rows plus prompt chunks (chunked prefill; auto: 2048 on "
                                                          "CUDA, 512 on the CPU)"))
    gather_prompts: bool = field(default=False, metadata=_key(_bool, "a step with new prompts waits for the step on "
                                                          "the GPU so prompts arriving meanwhile join it (fewer, "
                                                          "fuller prefill steps; off, the default: host work stays "
                                                          "overlapped, measured faster on an H100)"))
    freeze_heap: bool = field(default=True, metadata=_key(_bool, "once started and after each stage load or "
                                                      "retirement, exempt the heap alive then from Python's full "
                                                      "collector passes (each one otherwise stalls serving for "
                                                      "~0.1 s; runtime/heap.py)"))
    quantize: str | None = field(default=None, metadata=_key(_choice(None, "none", "int8", "int4"), "weights kept "
                                                             "quantized on the GPU (null: as the checkpoint is)"))
    engine_process: str = field(default="auto", metadata=_key(_choice("auto", "on", "off"), "each stage engine in "
                                                              "its own process (auto: on CUDA, and on a CPU node that "
                                                              "may use 8 CPUs or more)"))
    cpu_threads: int = field(default=0, metadata=_key(_non_negative_int, "torch threads of this node's stage engines "
                                                      "(0: torch's default in the node's own process, half the usable "
                                                      "CPUs, at most 8, in an engine process)"))
    micro_batches: int = field(default=0, metadata=_key(_non_negative_int, "steps in flight on a pipeline (0: one per "
                                                        "stage; 1 where the stages share one GPU)"))
    max_seq_len: int = field(default=2048, metadata=_key(_positive_int, "longest prompt + output served"))
    calibrate: bool = field(
        default=True, metadata=_key(_bool, "time the engine on this device and model at start (cached in data_dir) and "
                                          "announce it to the planner")
    )
    term_s: float = field(default=300.0, metadata=_key(_positive, "head term length; the head rotates each term"))
    serve_layout: dict | None = field(default=None, metadata=_key(_serve_layout, "pin the layout shape (else planned)"))
    swarm_owner: str | None = field(
        default=None, metadata=_key(_optional_peer_id, "PeerID of the swarm owner key: admission certificates required")
    )
    admission_cert: Path | None = field(default=None, metadata=_key(_optional_path, "this node's admission certificate"))
    require_client_cert: bool = field(default=False, metadata=_key(_bool, "submitters must present a client certificate"))
    local_links: bool = field(
        default=True, metadata=_key(_bool, "stage engines on this host hand activations and tokens to each other over "
                                          "Unix sockets of this user, skipping the network")
    )
    direct_data_path: bool = field(
        default=True, metadata=_key(_bool, "pipeline frames over direct AES-GCM TCP keyed over libp2p (else libp2p streams)")
    )
    reachability: str = field(default="auto", metadata=_key(_choice("auto", "public", "private"), "auto: ask peers "
                                                            "(AutoNAT); not public: reserve slots on relays"))
    hole_punch: bool = field(default=True, metadata=_key(_bool, "upgrade relayed connections to direct ones (DCUtR)"))
    max_queue: int = field(default=256, metadata=_key(_positive_int, "requests this node accepts at once as an entry"))
    pipe_idle_s: float = field(default=120.0, metadata=_key(_positive, "a pipeline link unused this long is closed by "
                                                            "its sender (by its receiver after twice that)"))
    dispatch_wait_s: float = field(
        default=30.0, metadata=_key(_positive, "how long a request waits for a live pipeline before it is refused")
    )
    http: str | None = field(default=None, metadata=_key(_http_listen, "host:port of the OpenAI-compatible HTTP API and "
                                                         "/metrics (null: off)"))
    api_token: str | None = field(default=None, metadata=_key(_optional_secret, "bearer token the HTTP API requires "
                                                              "(null: none)"))
    http_workers: int | None = field(default=None, metadata=_key(_non_negative_int_or_auto, "processes that serve "
                                                                "the HTTP API, sharing its socket, so the node's event "
                                                                "loop does no HTTP work (0: the node serves it itself; "
                                                                "auto: 2 on a node serving on CUDA, else 0)"))
    # Where the config came from; not a YAML key.
    source: Path | None = field(default=None, metadata={"internal": True})

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser()
        if self.key_file is None:
            self.key_file = self.data_dir / "node.key"
        if self.model_cache is None and self.model_fingerprint is not None:
            self.model_cache = self.data_dir / "models" / self.model_fingerprint

    @property
    def topic_prefix(self) -> str:
        return f"hexswarm/{self.swarm}"


def config_keys() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(NodeConfig) if not f.metadata.get("internal")]


def _check(cfg: NodeConfig) -> None:
    """Rules that tie keys together."""
    if cfg.require_client_cert and cfg.swarm_owner is None:
        raise UserError("key 'require_client_cert' needs swarm_owner (the key that signs client certificates)")
    if cfg.down_after_s <= cfg.heartbeat_s:
        raise UserError(f"key 'down_after_s' ({cfg.down_after_s:g}) must exceed heartbeat_s ({cfg.heartbeat_s:g})")
    if cfg.model_source == "swarm" and cfg.model_fingerprint is None:
        raise UserError("key 'model_source': swarm needs model_fingerprint (or `model: <fingerprint>`)")
    if cfg.model_source == "swarm" and cfg.model is not None:
        raise UserError("key 'model': a local checkpoint and model_source: swarm exclude each other")
    if cfg.drop_after_s <= cfg.down_after_s:
        raise UserError(f"key 'drop_after_s' ({cfg.drop_after_s:g}) must exceed down_after_s ({cfg.down_after_s:g})")


def config_from_dict(raw: Any, base: Path, source: Path | None = None) -> NodeConfig:
    where = f"config {source}" if source else "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping of keys, got {type(raw).__name__}")
    known = {f.name: f for f in config_keys()}
    values: dict[str, Any] = {}
    model = raw.get("model")
    if isinstance(model, str) and _FINGERPRINT.match(model) and not (base / model).exists():
        # `model: <fingerprint>`: no such checkpoint here, fetch it from peers
        raw = {k: v for k, v in raw.items() if k != "model"}
        raw.setdefault("model_source", "swarm")
        raw.setdefault("model_fingerprint", model)
    for key, value in raw.items():
        if key not in known:
            raise UserError(f"{where}: unknown key {key!r} (known: {', '.join(known)})")
        try:
            values[key] = known[key].metadata["parse"](value, base)
        except _BadValue as e:
            raise UserError(f"{where}: key {key!r}: {e}") from None
    cfg = NodeConfig(**values, source=source)
    try:
        _check(cfg)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return cfg


def load_config(path: Path | str, overrides: dict[str, Any] | None = None) -> NodeConfig:
    """Load a YAML config; `overrides` (e.g. CLI --bootstrap) replace keys before checking."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"cannot read config {path}: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if raw is None:
        raw = {}
    if isinstance(raw, dict) and overrides:
        raw = {**raw, **{k: v for k, v in overrides.items() if v is not None}}
    return config_from_dict(raw, path.resolve().parent, source=path)
