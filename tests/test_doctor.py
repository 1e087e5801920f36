"""`hexswarm doctor`: one line per check, a fix for each failure, exit 1 on a failure, no traceback."""

from __future__ import annotations

import socket

import pytest
import yaml

from conftest import run_cli
from hexswarm.swarm.doctor import FAIL, OK, run_checks
from hexswarm.launcher import NodeProcess, write_node_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def boot(tmp_path_factory):
    """A running relay node (no model) to bootstrap through."""
    node = NodeProcess(write_node_config(tmp_path_factory.mktemp("doctor"), "boot", roles=["relay"]))
    node.start().wait_listening()
    yield node
    node.kill()


def _config(tmp_path, **keys) -> str:
    data = {"listen": ["/ip4/127.0.0.1/tcp/0"], "data_dir": str(tmp_path / "data"),
            "devices": [{"kind": "cpu", "memory": 4, "tflops": 0.05, "mem_bw": 5}], "swarm": "local", **keys}
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _by_name(checks) -> dict:
    return {c.name: c for c in checks}


def test_a_good_config_passes_every_check(boot, tiny_model, tmp_path):
    p = run_cli("doctor", "--config", _config(tmp_path, model=str(tiny_model), bootstrap=[boot.addr]))
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    status = {line.split()[1]: line.split()[0] for line in lines}
    assert all(status[n] == OK for n in ("config", "key", "listen", "bootstrap", "reachability", "relays", "clock",
                                        "model")), p.stdout
    assert "gpu" in status and "Traceback" not in p.stderr


def test_bad_configs_fail_in_one_line_each_with_what_to_do(boot, tiny_model, tmp_path):
    # not a config: the CLI prints one line per check, exits 1, no traceback
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: [/ip4/127.0.0.1/tcp/0]\nmodle: x\n")
    p = run_cli("doctor", "--config", str(bad))
    assert p.returncode == 1 and "Traceback" not in p.stdout + p.stderr
    assert p.stdout.splitlines()[0].startswith(f"{FAIL}    config") and "unknown key 'modle'" in p.stdout

    with socket.socket() as taken:  # a listen port in use, a missing model, an unreachable bootstrap peer
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        dead = f"/ip4/127.0.0.1/tcp/{port}/p2p/{boot.peer_id}"
        checks = _by_name(run_checks(_config(tmp_path, listen=[f"/ip4/127.0.0.1/tcp/{port}"], bootstrap=[dead],
                                             model=str(tmp_path / "nothing"))))
    for name in ("listen", "bootstrap", "model"):
        assert checks[name].status == FAIL and checks[name].fix, checks[name]
        assert "\n" not in checks[name].line()

    # a node that fetches its model from peers, in a swarm where no peer holds it
    checks = _by_name(run_checks(_config(tmp_path, model="0123456789abcdef", bootstrap=[boot.addr])))
    assert checks["bootstrap"].status == OK
    assert checks["model"].status == FAIL and "no peer up holds it" in checks["model"].detail
