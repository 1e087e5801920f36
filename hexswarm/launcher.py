"""Start a local swarm of node processes on 127.0.0.1: for `make demo`, the
bootstrap scripts, the end-to-end tests and the benchmark tools."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from hexswarm.net.ports import free_port  # noqa: F401 (part of this module's API for tests and tools)

NODE_MAIN = "from hexswarm.cli.app import main; main()"
CPU_DEVICE = {"kind": "cpu", "name": "cpu", "memory": 4, "tflops": 0.05, "mem_bw": 5}
# Short timings keep a local swarm responsive: peers are marked down 2 s after they go silent.
FAST_TIMINGS = {"heartbeat_s": 0.5, "down_after_s": 2.0, "drop_after_s": 60.0, "probe_s": 2.0, "probe_bytes": 16384}


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def write_node_config(folder: Path, name: str, **keys: Any) -> Path:
    """folder/<name>/node.yaml with a CPU device, fast timings and the given keys on top."""
    home = folder / name
    home.mkdir(parents=True, exist_ok=True)
    # calibrate off: every local node shares this machine, so timing the engine in each one measures
    # contention (and slows the start), not a device; a test that wants it passes calibrate=True.
    # bootstrap_timeout_s 120: local nodes start together on one machine, and under load the first one
    # answered no dial for ~50 s while its peers gave up after the default 30 s (a test's node exited)
    data = {"data_dir": str(home), "swarm": "local", "devices": [CPU_DEVICE], "log_level": "info",
            "calibrate": False, "bootstrap_timeout_s": 120.0, **FAST_TIMINGS, **keys}
    path = home / "node.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def peer_id_of(config: Path) -> str:
    """The PeerID of a config's key (created as the node would create it)."""
    from hexswarm.net.identity import load_or_create
    from hexswarm.swarm.config import load_config

    return load_or_create(load_config(config).key_file).peer_id.to_base58()


class NodeProcess:
    """`hexswarm node --config F` in its own process group (so a kill reaches its TP followers),
    optionally behind a prefix such as `ip netns exec NS`."""

    def __init__(self, config: Path, ip: str = "127.0.0.1", port: int | None = None, prefix: Sequence[str] = (),
                 cwd: Path | None = None):
        self.config = config
        self.ip = ip
        self.port = port  # None: the OS picks one at each start (no race with other processes)
        self.prefix = list(prefix)
        self.cwd = cwd
        self.peer_id = peer_id_of(config)
        self.log_path = config.parent / "node.log"
        self.proc: subprocess.Popen | None = None
        self._log_start = 0

    @property
    def addr(self) -> str:
        """The node's multiaddr; with an OS-picked port, known once wait_listening() returned."""
        if self.port:
            return f"/ip4/{self.ip}/tcp/{self.port}/p2p/{self.peer_id}"
        for line in self.log()[self._log_start:].splitlines():
            if "listening on " in line:
                for addr in line.split("listening on ", 1)[1].split():
                    if addr.startswith(f"/ip4/{self.ip}/"):
                        return addr
        raise RuntimeError("node not listening yet: call wait_listening() first")

    def start(self, bootstrap: Sequence[str] = ()) -> "NodeProcess":
        args = [*self.prefix, sys.executable, "-c", NODE_MAIN, "node", "--config", str(self.config)]
        args += ["--listen", f"/ip4/{self.ip}/tcp/{self.port or 0}"]
        for b in bootstrap:
            args += ["--bootstrap", b]
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd,
                                         start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_listening(self, timeout: float = 60.0) -> "NodeProcess":
        def listening() -> bool:  # in this run's part of the log, not an earlier run's
            return "listening on" in self.log()[self._log_start:] or not self.alive()

        if not wait_for(listening, timeout, 0.1):
            raise TimeoutError(f"node did not start within {timeout} s:\n{self.log()}")
        if not self.alive():
            raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()}")
        return self

    def send_signal(self, sig: int) -> None:
        """Send a signal to the node and its TP followers without waiting."""
        import os

        if self.alive():
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self, sig: int = signal.SIGKILL) -> int | None:
        """Signal the node's process group; wait for it to end unless the signal only pauses or resumes it."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.send_signal(sig)
        if sig in (signal.SIGSTOP, signal.SIGCONT):
            return None
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.send_signal(signal.SIGKILL)
            return self.proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class LocalSwarm:
    """Several serving nodes on loopback, bootstrapped in a chain to the first."""

    def __init__(self, folder: Path, model_dir: Path, devices_per_node: Sequence[int], swarm: str = "local",
                 serve_layout: dict | None = None, extra: dict | None = None, owner=None):
        self.folder = Path(folder)
        # the swarm owner's Identity: each node gets a node certificate from it (swarm_owner set)
        self.owner = owner
        self.model_dir = Path(model_dir)
        self.nodes: list[NodeProcess] = []
        self.serve_layout = serve_layout
        self.swarm = swarm
        self.extra = extra or {}
        # (identity, client certificate) that status queries present: a swarm with an owner answers only those
        self.client: tuple | None = None
        for n in devices_per_node:
            self.add_node(n, start=False)

    def add_node(self, n_devices: int = 1, start: bool = True) -> NodeProcess:
        name = f"node{len(self.nodes)}"
        keys = {"swarm": self.swarm, "model": str(self.model_dir), "roles": ["head", "worker"],
                "devices": [{**CPU_DEVICE, "name": "cpu"} for _ in range(n_devices)], **self.extra}
        if self.serve_layout:
            keys["serve_layout"] = self.serve_layout
        node = NodeProcess(write_node_config(self.folder, name, **keys))
        if self.owner is not None:
            self._certify(node)
        self.nodes.append(node)
        if start:
            node.start([self.nodes[0].addr] if len(self.nodes) > 1 else []).wait_listening()
        return node

    def certificate(self, peer: str, role: str = "node", path: Path | None = None) -> Path:
        """A certificate of this swarm's owner for `peer`, written to `path` (default: under the swarm's folder)."""
        from hexswarm.net import codec
        from hexswarm.net.admission import issue_certificate

        path = path or self.folder / f"{peer}.{role}.cert"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(codec.encode(issue_certificate(self.owner, self.swarm, peer, role)))
        return path

    def _certify(self, node: NodeProcess) -> None:
        cert = self.certificate(node.peer_id, path=node.config.parent / "node.cert")
        data = yaml.safe_load(node.config.read_text())
        data.update(swarm_owner=self.owner.peer_id.to_base58(), admission_cert=str(cert))
        node.config.write_text(yaml.safe_dump(data))

    def start(self) -> "LocalSwarm":
        first, rest = self.nodes[0], self.nodes[1:]
        first.start().wait_listening()  # its OS-picked port is in its log from here on
        for node in rest:
            node.start([first.addr])
        for node in rest:
            node.wait_listening()
        return self

    def status(self, node: NodeProcess, timeout: float = 5.0) -> dict:
        import trio

        from hexswarm.api.status_client import fetch_status

        return trio.run(fetch_status, node.addr, timeout, *(self.client or (None, None)))

    def wait_layout(self, timeout: float = 90.0, min_epoch: int = 1, nodes: Sequence[NodeProcess] | None = None) -> dict:
        """Wait until every live node reports the same committed layout (of at least min_epoch),
        planned from a view of exactly the live nodes."""
        seen: dict = {}

        def agreed() -> bool:
            live = list(nodes or [n for n in self.nodes if n.alive()])
            try:
                sts = [self.status(n) for n in live]
            except Exception:
                return False
            epochs = {(s["layout"] or {}).get("epoch") for s in sts}
            if len(epochs) != 1 or None in epochs or min(epochs) < min_epoch:
                return False
            if set(sts[0]["layout"]["view"]) != {n.peer_id for n in live}:
                return False
            seen.update(sts[0])
            return True

        if not wait_for(agreed, timeout, 0.5):
            logs = "\n".join(f"--- {n.config.parent.name}\n{n.log()[-3000:]}" for n in self.nodes)
            raise TimeoutError(f"no agreed layout within {timeout} s\n{logs}")
        return seen

    def stop(self) -> None:
        for node in self.nodes:  # signal all first, then wait: shutdowns overlap
            node.send_signal(signal.SIGCONT)  # a paused node cannot handle SIGTERM
            node.send_signal(signal.SIGTERM)
        for node in self.nodes:
            node.kill(signal.SIGTERM)
