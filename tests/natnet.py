"""Network namespaces for the NAT tests (root only): a public segment and NATed private LANs.

Topology (all addresses exist only inside these namespaces; deleted afterwards)::

    public bridge 198.18.77.0/24 (RFC 2544 benchmarking range)
      ├─ pub<i>      198.18.77.(10+i)       public hosts (relays)
      └─ rt<j>       198.18.77.(50+j) ── 10.<j+1>.0.1/24 ── lan<j> 10.<j+1>.0.2 (default via the router)

Each router masquerades what leaves its public side (iptables MASQUERADE) and has no route to the
other LANs, so a LAN host reaches another LAN only through a public host.  A router answers a SYN
that no mapping expects with a reset (Linux's default), or with `drop_unsolicited` drops it, as most
home routers' firewalls do: only then can two peers behind such routers punch a TCP hole.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest

PUBLIC = "198.18.77"


def _run(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, timeout=15)


class NatNet:
    def __init__(self, public_hosts: int, lans: int, drop_unsolicited: bool = False):
        self.drop_unsolicited = drop_unsolicited
        self.tag = uuid.uuid4().hex[:5]
        self.bridge = f"hxb{self.tag}"
        self.public = [f"hxp{self.tag}{i}" for i in range(public_hosts)]
        self.routers = [f"hxr{self.tag}{j}" for j in range(lans)]
        self.lans = [f"hxl{self.tag}{j}" for j in range(lans)]
        self._made: list[str] = []
        self._links = 0

    def public_ip(self, i: int) -> str:
        return f"{PUBLIC}.{10 + i}"

    def lan_ip(self, j: int) -> str:
        return f"10.{j + 1}.0.2"

    def router_public_ip(self, j: int) -> str:
        return f"{PUBLIC}.{50 + j}"

    def _ns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._made.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def _veth(self, a_ns: str, b_ns: str) -> tuple[str, str]:
        self._links += 1
        a, b = f"hx{self.tag}{self._links}a", f"hx{self.tag}{self._links}b"
        _run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        _run("ip", "link", "set", a, "netns", a_ns)
        _run("ip", "link", "set", b, "netns", b_ns)
        return a, b

    def _on_public(self, ns: str, ip: str) -> str:
        inner, outer = self._veth(ns, self.bridge)
        _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", inner)
        _run("ip", "-n", ns, "link", "set", inner, "up")
        _run("ip", "-n", self.bridge, "link", "set", outer, "master", "br0")
        _run("ip", "-n", self.bridge, "link", "set", outer, "up")
        return inner

    def create(self) -> "NatNet":
        self._ns(self.bridge)
        _run("ip", "-n", self.bridge, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.bridge, "link", "set", "br0", "up")
        for i, ns in enumerate(self.public):
            self._ns(ns)
            self._on_public(ns, self.public_ip(i))
        for j, (router, lan) in enumerate(zip(self.routers, self.lans)):
            self._ns(router)
            self._ns(lan)
            wan = self._on_public(router, self.router_public_ip(j))
            r_lan, l_lan = self._veth(router, lan)
            _run("ip", "-n", router, "addr", "add", f"10.{j + 1}.0.1/24", "dev", r_lan)
            _run("ip", "-n", router, "link", "set", r_lan, "up")
            _run("ip", "-n", lan, "addr", "add", f"{self.lan_ip(j)}/24", "dev", l_lan)
            _run("ip", "-n", lan, "link", "set", l_lan, "up")
            _run("ip", "-n", lan, "route", "add", "default", "via", f"10.{j + 1}.0.1")
            _run("ip", "netns", "exec", router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
            _run("ip", "netns", "exec", router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", wan,
                 "-j", "MASQUERADE")
            if self.drop_unsolicited:
                _run("ip", "netns", "exec", router, "iptables", "-A", "INPUT", "-i", wan, "-p", "tcp",
                     "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP")
        return self

    def exec_prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def delete(self) -> None:
        for ns in reversed(self._made):  # a namespace takes its veth ends with it
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=15)


def nat_net(public_hosts: int, lans: int, drop_unsolicited: bool = False):
    """A created NatNet, or pytest.skip with the reason this machine cannot make one."""
    if os.geteuid() != 0:
        pytest.skip("NAT namespaces need root (ip netns, iptables)")
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            pytest.skip(f"NAT namespaces need the `{tool}` command")
    net = NatNet(public_hosts, lans, drop_unsolicited)
    try:
        return net.create()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        net.delete()
        detail = (getattr(e, "stderr", b"") or b"").decode(errors="replace").strip()
        pytest.skip(f"cannot make NAT namespaces: {e} {detail}")
