"""`hexswarm doctor`: is this host ready to run a node with this config?

Each check gives one `Check` (status ok / warn / FAIL / unknown, what was found, what to do).  The
local checks (config, key, listen addresses, model files, GPU) need nothing running; the network ones
(bootstrap peers, reachability, relays, clock) dial the bootstrap peers from a short-lived host that
listens where the node would, ask them for their peer table (which carries their wall clock) and
for an AutoNAT dial-back (a hexswarm node dials back from a fresh host, see net/relay.py).
"""

from __future__ import annotations

import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from hexswarm.errors import UserError

OK, WARN, FAIL, UNKNOWN = "ok", "warn", "FAIL", "unknown"
MAX_SKEW_S = 30.0  # records and certificates carry wall-clock times; a larger skew is a problem
NET_TIMEOUT_S = 10.0


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        fix = f" -> {self.fix}" if self.fix and self.status in (FAIL, WARN, UNKNOWN) else ""
        return f"{self.status:<8}{self.name:<13}{self.detail}{fix}"


# ---- local checks --------------------------------------------------------------------------------


def check_key(config) -> Check:
    from hexswarm.net.identity import load_or_create

    path = Path(config.key_file)
    if not path.exists():
        return Check("key", OK, f"{path} does not exist yet: the node creates it on first start (mode 0600)")
    try:
        peer = load_or_create(path).peer_id
    except UserError as e:
        return Check("key", FAIL, str(e), "move it away to start with a new identity, or restore the right file")
    except OSError as e:
        return Check("key", FAIL, f"cannot read {path}: {e.strerror}", "check the file's owner and mode")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        return Check("key", WARN, f"{path} ({peer}) is readable by other users", f"chmod 600 {path}")
    if config.swarm_owner is not None and config.admission_cert is None:
        return Check("key", FAIL, f"{peer}: swarm_owner is set but admission_cert is not",
                     "get a certificate with `hexswarm admit` from the swarm owner")
    return Check("key", OK, f"{path}: PeerID {peer}")


def _tcp_endpoint(addr: str) -> tuple[int, str, int] | None:
    """(family, host, port) of an /ip4|/ip6/.../tcp/... multiaddr."""
    from hexswarm.net.host import parse_multiaddr

    ma = parse_multiaddr(addr)
    protos = [p.name for p in ma.protocols()]
    if "tcp" not in protos:
        return None
    port = int(ma.value_for_protocol("tcp"))
    if "ip4" in protos:
        return socket.AF_INET, ma.value_for_protocol("ip4"), port
    if "ip6" in protos:
        return socket.AF_INET6, ma.value_for_protocol("ip6"), port
    return None


def check_listen(config) -> list[Check]:
    out = []
    for addr in config.listen:
        ep = _tcp_endpoint(addr)
        if ep is None:
            out.append(Check("listen", WARN, f"{addr}: not an IP/TCP address, not checked"))
            continue
        family, ip, port = ep
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((ip, port))
        except OSError as e:
            out.append(Check("listen", FAIL, f"{addr}: cannot bind: {e.strerror}",
                             "is a node already running here? else free the port or change 'listen'"))
            continue
        note = " (a port chosen at start: peers learn it from the record)" if port == 0 else ""
        out.append(Check("listen", OK, f"{addr}: can bind{note}"))
    return out


def check_model(config, replies: dict | None = None) -> Check:
    if config.model_source == "swarm":
        cache = Path(config.model_cache)
        try:
            cache.mkdir(parents=True, exist_ok=True)
            probe = cache / ".doctor"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            return Check("model", FAIL, f"cannot write the weights cache {cache}: {e.strerror}",
                         "set 'model_cache' to a writable folder")
        holders = {p["peer_id"] for r in (replies or {}).values() for p in r.get("peers", [])
                   if p.get("state") == "up" and (p.get("extra") or {}).get("model") == config.model_fingerprint
                   and (p.get("extra") or {}).get("weights")}
        where = f"model {config.model_fingerprint}, fetched from peers into {cache}"
        if not holders:
            return Check("model", WARN if not replies else FAIL, f"{where}: no peer up holds it",
                         "start a node with that checkpoint (`hexswarm peers` shows each peer's model), "
                         "or check model_fingerprint")
        return Check("model", OK, f"{where}: {len(holders)} peer(s) up hold it")
    if config.model is None:
        return Check("model", OK, "no model: this node joins and relays but serves no stages")
    from hexswarm.model.source import load_config, model_fingerprint, open_checkpoint
    from hexswarm.runtime.tokenizer import TextTokenizer

    try:
        cfg = load_config(config.model)
        reader = open_checkpoint(config.model)
        missing = [n for n in ("model.embed_tokens.weight", "model.norm.weight") if not reader.has(n)]
        if missing:
            raise UserError(f"checkpoint in {config.model} lacks {missing[0]}")
        TextTokenizer(str(config.model), cfg)
        fp = model_fingerprint(config.model)
    except UserError as e:
        return Check("model", FAIL, str(e), "point 'model' at a HF checkpoint folder or a .gguf file, or use "
                     "`model: <fingerprint>` to fetch it from peers")
    except Exception as e:  # noqa: BLE001 - a broken file: one line, not a traceback
        return Check("model", FAIL, f"{config.model}: {type(e).__name__}: {e}",
                     "re-download the checkpoint, or use `model: <fingerprint>` to fetch it from peers")
    return Check("model", OK, f"{config.model}: {cfg.num_hidden_layers} layers, fingerprint {fp}")


def check_gpu(config) -> Check:
    try:
        import torch
    except ImportError:
        return Check("gpu", FAIL, "torch is not installed", "install hexswarm with its dependencies")
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return Check("gpu", OK, f"{len(names)} CUDA device(s): {', '.join(names)}")
    wants_cuda = config.serve_device == "cuda" or (
        isinstance(config.devices, list) and any(d["kind"] == "cuda" for d in config.devices))
    if wants_cuda:
        return Check("gpu", FAIL, "the config asks for CUDA but torch sees no CUDA device",
                     "check the driver (nvidia-smi) and that torch is a CUDA build, or set serve_device: cpu")
    return Check("gpu", OK if config.model is None and config.model_source == "local" else WARN,
                 "no CUDA device: stages run on the CPU", "fine for tests; a GPU host serves far faster")


# ---- network checks ------------------------------------------------------------------------------


async def network_checks(config) -> tuple[list[Check], dict]:
    """bootstrap, reachability, relays, clock: from a host listening where the node would."""
    import multiaddr
    import trio

    from hexswarm.net import identity as identities
    from hexswarm.net.host import dial, make_host, parse_peer_multiaddr
    from hexswarm.net.protocols import PEERS, RequestError, request

    if not config.bootstrap:
        return [Check("bootstrap", OK, "none configured: this node starts a swarm (others bootstrap through it)"),
                Check("reachability", UNKNOWN, "no peer to dial us back", "check that the listen port is open "
                      "to the peers' networks"),
                Check("relays", UNKNOWN, "no peer to ask"), Check("clock", UNKNOWN, "no peer to compare with")], {}
    # in an owned swarm peers answer only certificate holders: ask as this node
    ident, cert = identities.generate(), None
    if config.swarm_owner is not None and config.admission_cert is not None and Path(config.key_file).exists():
        from hexswarm.net import codec

        try:
            ident = identities.load_or_create(config.key_file)
            cert = codec.decode(Path(config.admission_cert).read_bytes(), 8192)
        except Exception:  # noqa: BLE001 - the key check reports it
            cert = None
    bindable = all(c.status == OK for c in check_listen(config))
    listen = config.listen if bindable else ["/ip4/0.0.0.0/tcp/0"]
    host = make_host(ident)
    replies: dict[str, dict] = {}
    errors: dict[str, str] = {}
    reach = Check("reachability", UNKNOWN, "not asked", "")
    async with host.run([multiaddr.Multiaddr(a) for a in listen]):
        async def ask(addr: str) -> None:
            info = parse_peer_multiaddr(addr, "bootstrap")
            try:
                await dial(host, info, timeout=NET_TIMEOUT_S)
                sent = time.time()
                reply = await request(host, info.peer_id, PEERS, {} if cert is None else {"cert": cert},
                                      timeout=NET_TIMEOUT_S)
                replies[addr] = {**reply, "_rtt": time.time() - sent, "_mid": (sent + time.time()) / 2,
                                 "_peer": info.peer_id}
            except (ConnectionError, RequestError) as e:
                errors[addr] = str(e)

        async with trio.open_nursery() as nursery:
            for a in config.bootstrap:
                nursery.start_soon(ask, a)
        if replies and bindable:
            from hexswarm.net.relay import Reachability, RelayStack

            stack = RelayStack(host, hop=False, hole_punch=False)
            with trio.move_on_after(3 * NET_TIMEOUT_S):
                status = await stack.check_reachability([r["_peer"] for r in replies.values()])
                reach = {Reachability.PUBLIC: Check("reachability", OK, "public: a bootstrap peer dialed us back "
                                                    "(AutoNAT)"),
                         Reachability.PRIVATE: Check("reachability", WARN, "private: no bootstrap peer could dial "
                                                     "us back (AutoNAT)", "fine behind a NAT if a relay is up (see "
                                                     "relays); else open/forward the listen port")}.get(
                    status, Check("reachability", UNKNOWN, "AutoNAT gave no answer", "check again later"))
        elif replies:
            reach = Check("reachability", UNKNOWN, "the listen port is taken, so no dial-back was asked",
                          "while the node runs, `hexswarm peers` shows its reachability")
    return [_bootstrap_check(config, replies, errors), reach, _relays_check(replies, reach),
            _clock_check(replies)], replies


def _bootstrap_check(config, replies: dict, errors: dict) -> Check:
    wrong = [a for a, r in replies.items() if r.get("swarm") != config.swarm]
    if wrong:
        return Check("bootstrap", FAIL, f"{wrong[0]} is in swarm {replies[wrong[0]].get('swarm')!r}, not "
                     f"{config.swarm!r}", "fix 'swarm' or 'bootstrap'")
    if not replies:
        first = next(iter(errors.items()))
        return Check("bootstrap", FAIL, f"none of {len(errors)} reachable ({first[0]}: {first[1]})",
                     "check the addresses (hexswarm id on that host), that those nodes run, and firewalls")
    up = max(sum(p.get("state") == "up" for p in r.get("peers", [])) for r in replies.values())
    detail = f"{len(replies)} of {len(config.bootstrap)} reachable; their swarm has {up} peers up"
    if errors:
        return Check("bootstrap", WARN, f"{detail}; {next(iter(errors))}: {next(iter(errors.values()))}",
                     "remove or fix the unreachable address")
    return Check("bootstrap", OK, detail)


def _relays_check(replies: dict, reach: Check) -> Check:
    relays = {p["peer_id"] for r in replies.values() for p in r.get("peers", [])
              if p.get("state") == "up" and "relay" in (p.get("roles") or [])}
    if reach.status == OK:
        return Check("relays", OK, f"not needed (public); {len(relays)} relay peer(s) up")
    if relays:
        return Check("relays", OK, f"{len(relays)} relay peer(s) up: this node reserves a slot on each")
    if not replies:
        return Check("relays", UNKNOWN, "no peer to ask", "fix bootstrap first")
    return Check("relays", FAIL if reach.detail.startswith("private") else WARN, "no peer with roles: [relay] is up",
                 "behind a NAT, run a node with `roles: [relay]` on a public address")


def _clock_check(replies: dict) -> Check:
    skews = [r["stats"]["time"] - r["_mid"] for r in replies.values()
             if isinstance(r.get("stats"), dict) and isinstance(r["stats"].get("time"), (int, float))]
    if not skews:
        return Check("clock", UNKNOWN, "no peer reported its clock (older version)")
    worst = max(skews, key=abs)
    if abs(worst) > MAX_SKEW_S:
        return Check("clock", FAIL, f"{worst:+.1f} s off a bootstrap peer's clock",
                     "sync the clock (NTP: timedatectl set-ntp true); records and certificates carry times")
    return Check("clock", OK, f"within {abs(worst):.1f} s of the bootstrap peers")


def run_checks(config_path: Path) -> list[Check]:
    """Every check, in order; a config that does not load is the only one then."""
    import trio

    from hexswarm.swarm.config import load_config

    try:
        config = load_config(config_path)
    except UserError as e:
        return [Check("config", FAIL, str(e), "fix the key named (node_configs/ has examples)")]
    checks = [Check("config", OK, f"{config_path}: swarm {config.swarm!r}, roles {', '.join(config.roles)}")]
    checks.append(check_key(config))
    checks.extend(check_listen(config))
    replies: dict = {}
    try:
        net, replies = trio.run(network_checks, config)
        checks.extend(net)
    except Exception as e:  # noqa: BLE001 - a failure of the probe itself: one line
        from hexswarm.errors import first_leaf

        leaf = first_leaf(e)
        checks.append(Check("network", UNKNOWN, f"the probe failed: {type(leaf).__name__}: {leaf}", "run again"))
    checks.append(check_model(config, replies))
    checks.append(check_gpu(config))
    return checks
