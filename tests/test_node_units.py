"""Peer table (fake clock), config loading, inventory, and CLI errors, without a network."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from hexswarm.cli.app import main
from hexswarm.errors import UserError
from hexswarm.net import identity
from hexswarm.swarm import inventory
from hexswarm.swarm.config import load_config
from hexswarm.swarm.peer_table import PeerState, PeerTable
from hexswarm.swarm.records import NodeRecord

REPO = Path(__file__).resolve().parents[1]


# --- peer table -------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _rec(peer: str, incarnation: int = 1, seq: int = 1) -> NodeRecord:
    return NodeRecord(peer, b"k" * 32, "s", [], [], [], {}, incarnation, seq, 0.0)


def test_up_down_dropped_and_back():
    clock = FakeClock()
    table = PeerTable(down_after_s=2, drop_after_s=10, clock=clock)
    assert table.observe(_rec("p", seq=1)).new == PeerState.UP
    clock.now += 1.9
    assert table.sweep() == [] and table.get("p").state == PeerState.UP
    clock.now += 0.2
    [change] = table.sweep()
    assert (change.old, change.new) == (PeerState.UP, PeerState.DOWN)
    assert table.sweep() == []  # reported once
    change = table.observe(_rec("p", seq=2))
    assert (change.old, change.new) == (PeerState.DOWN, PeerState.UP)
    clock.now += 10.1
    assert [c.new for c in table.sweep()] == [PeerState.DROPPED]
    assert "p" not in table and len(table) == 0
    # After a restart (new incarnation, seq from 1) the peer is back.
    assert table.observe(_rec("p", incarnation=2, seq=1)).new == PeerState.UP


def test_replays_are_ignored_even_after_drop():
    clock = FakeClock()
    table = PeerTable(2, 10, clock)
    table.observe(_rec("p", seq=5))
    clock.now += 1.5
    assert table.observe(_rec("p", seq=5)) is None and table.observe(_rec("p", seq=4)) is None
    clock.now += 1.0  # silent 2.5 s since seq 5: the replays did not refresh it
    assert [c.new for c in table.sweep()] == [PeerState.DOWN]
    clock.now += 20
    table.sweep()
    assert table.observe(_rec("p", seq=5)) is None and "p" not in table


# --- config -----------------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(text)
    return path


def test_config_defaults_paths_and_devices(tmp_path):
    cfg = load_config(_write(tmp_path, "data_dir: d\ndevices: [{kind: cpu, memory: 8, tflops: 1, mem_bw: 20, count: 2}]\n"))
    assert cfg.data_dir == tmp_path / "d" and cfg.key_file == tmp_path / "d" / "node.key"
    assert len(cfg.devices) == 2 and cfg.devices[0]["memory"] == 8.0
    assert cfg.swarm == "default" and cfg.allow_peers is None


def test_overrides_replace_keys(tmp_path):
    peer = identity.generate().peer_id
    boot = f"/ip4/127.0.0.1/tcp/9/p2p/{peer}"
    cfg = load_config(_write(tmp_path, "listen: [/ip4/0.0.0.0/tcp/1]\n"), {"bootstrap": [boot], "listen": None})
    assert cfg.bootstrap == [boot] and cfg.listen == ["/ip4/0.0.0.0/tcp/1"]


@pytest.mark.parametrize(
    "text, key",
    [
        ("colour: blue\n", "colour"),
        ("heartbeat_s: -1\n", "heartbeat_s"),
        ("heartbeat_s: fast\n", "heartbeat_s"),
        ("listen: [not-a-multiaddr]\n", "listen"),
        ("bootstrap: [/ip4/1.2.3.4/tcp/1]\n", "bootstrap"),
        ("allow_peers: [nobody]\n", "allow_peers"),
        ("swarm: 'a b'\n", "swarm"),
        ("devices: [{kind: cpu, memory: 8}]\n", "devices"),
        ("devices: [{kind: cpu, memory: 8, tflops: 1, mem_bw: 1, colour: red}]\n", "devices"),
        ("devices: some\n", "devices"),
        ("roles: [boss]\n", "roles"),
        ("heartbeat_s: 5\ndown_after_s: 4\n", "down_after_s"),
        ("down_after_s: 5\ndrop_after_s: 5\n", "drop_after_s"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, key):
    with pytest.raises(UserError, match=f"'{key}'"):
        load_config(_write(tmp_path, text))


@pytest.mark.parametrize("name", ["head.yaml", "gpu_worker.yaml", "cpu_test.yaml"])
def test_example_configs_load(name):
    cfg = load_config(REPO / "node_configs" / name)
    assert cfg.listen and cfg.swarm


def test_cli_bad_config_is_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["node", "--config", str(_write(tmp_path, "heartbeat_s: 0\n"))])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: config") and "'heartbeat_s'" in err


def test_cli_missing_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["id", "--config", str(tmp_path / "nope.yaml")])
    assert exit_info.value.code == 2 and "cannot read config" in capsys.readouterr().err


def test_cli_id_prints_peer_id_and_multiaddrs(tmp_path, capsys):
    config = _write(tmp_path, "listen: [/ip4/127.0.0.1/tcp/4123]\ndata_dir: d\n")
    main(["id", "--config", str(config)])
    lines = capsys.readouterr().out.split()
    peer_id = identity.load_or_create(tmp_path / "d" / "node.key").peer_id.to_base58()
    assert lines == [peer_id, f"/ip4/127.0.0.1/tcp/4123/p2p/{peer_id}"]


# --- inventory ------------------------------------------------------------------


def test_explicit_devices():
    devs = inventory.inventory([{"kind": "cuda", "name": "A100", "memory": 80.0, "tflops": 312.0, "mem_bw": 2039.0}], Path("."))
    assert devs[0].to_wire() == {
        "kind": "cuda", "name": "A100", "index": 0, "memory_gib": 80.0, "tflops": 312.0, "mem_bw_gbs": 2039.0, "capability": None
    }


def test_auto_probes_once_and_caches(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(inventory, "probe", lambda device: calls.append(device) or (1.5, 20.0))
    first = inventory.inventory("auto", tmp_path)
    second = inventory.inventory("auto", tmp_path)
    assert first == second and len(calls) == (1 if first[0].kind == "cpu" else len(first))
    assert json.loads((tmp_path / inventory.PROBE_CACHE).read_text())


def test_cpu_probe_measures_something():
    tflops, mem_bw = inventory.probe("cpu")
    assert tflops > 0 and mem_bw > 0
