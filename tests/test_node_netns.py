"""The chain acceptance check with every node in its own network namespace (root only).

Topology: one namespace holds a bridge; each node namespace has one end of a
veth pair with an address in 198.18.77.0/24 (the RFC 2544 benchmarking range),
the other end on the bridge. These addresses exist only inside the test
namespaces; tables are read from inside node A's namespace. Everything is
deleted afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from netutil import REPO, NodeProcess, check_chain, write_config

pytestmark = pytest.mark.slow
SUBNET = "198.18.77"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Namespaces:
    def __init__(self, count: int):
        tag = uuid.uuid4().hex[:6]
        self.bridge_ns = f"hxbr{tag}"
        self.node_ns = [f"hxn{tag}{i}" for i in range(count)]
        self.made: list[str] = []
        self.tag = tag

    def create(self) -> None:
        _ip("netns", "add", self.bridge_ns)
        self.made.append(self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        for i, ns in enumerate(self.node_ns):
            _ip("netns", "add", ns)
            self.made.append(ns)
            inner, outer = f"hx{self.tag}{i}a", f"hx{self.tag}{i}b"
            _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "netns", self.bridge_ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", self.bridge_ns, "link", "set", outer, "master", "br0")
            _ip("-n", self.bridge_ns, "link", "set", outer, "up")

    def address(self, i: int) -> str:
        return f"{SUBNET}.{10 + i}"

    def delete(self) -> None:
        for ns in reversed(self.made):  # deleting a namespace deletes its veth ends
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


@pytest.fixture
def namespaces():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    spaces = Namespaces(4)
    try:
        spaces.create()
    except (subprocess.CalledProcessError, FileNotFoundError, subprocess.TimeoutExpired) as e:
        spaces.delete()
        detail = getattr(e, "stderr", b"") or b""
        pytest.skip(f"cannot make network namespaces: {e} {detail.decode(errors='replace').strip()}")
    yield spaces
    spaces.delete()


def test_chain_in_namespaces(tmp_path, namespaces):
    nodes = [
        NodeProcess(
            write_config(tmp_path, name),
            ip=namespaces.address(i),
            port=4001,
            prefix=["ip", "netns", "exec", namespaces.node_ns[i]],
        )
        for i, name in enumerate("ABCD")
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}

    def query_from_a(addrs: list[str]) -> dict:
        run = subprocess.run(
            ["ip", "netns", "exec", namespaces.node_ns[0], sys.executable, str(REPO / "tests" / "netutil.py"), "query", *addrs],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        return json.loads(run.stdout) if run.returncode == 0 else {a: {"error": run.stderr[-300:]} for a in addrs}

    try:
        check_chain(nodes, query_from_a)
    finally:
        for n in nodes:
            n.kill()
