"""`hexswarm plan` through the real CLI entry, cluster files, and the no-torch rule."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hexswarm.cli.app import main
from hexswarm.plan.cluster_yaml import load_cluster_yaml

CLUSTERS = Path(__file__).resolve().parents[1] / "node_configs" / "clusters"
CASE = str(CLUSTERS / "case-study-8gpu.yaml")


def test_plan_json_output(capsys):
    main(["plan", "--cluster", CASE, "--model", "llama-2-70b", "--rate", "0.1", "--slo", "30", "--seed", "3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["predicted"]["rate_rps"] == 0.1 and out["predicted"]["slo_s"] == 30
    assert 0.0 <= out["predicted"]["slo_attainment"] <= 1.0
    assert out["replicas"]
    for rep in out["replicas"]:
        assert rep["hetero_config"] == [s["tp"] for s in rep["stages"]]
        assert rep["pp_partition"] == [s["layers"][1] - s["layers"][0] for s in rep["stages"]]
        assert sum(rep["pp_partition"]) == 80
        for s in rep["stages"]:
            assert len(s["gpus"]) == s["tp"] and s["memory_gib"] <= s["memory_capacity_gib"]
            assert s["host"] in {"a6000-box", "a5000-box", "a4000-box"} and s["stage_time_s"] > 0


def test_plan_table_and_png(tmp_path, capsys):
    png = tmp_path / "plan.png"
    main(["plan", "--cluster", CASE, "--model", "llama-2-70b", "--png", str(png)])
    out = capsys.readouterr().out
    assert "--hetero-config" in out and "attainment" in out
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 100


@pytest.mark.parametrize("argv,needle", [
    (["--model", "llama-2-70b", "--cluster", "{tiny}"], "GiB missing"),
    (["--model", "llama-9-1t", "--cluster", CASE], "unknown model"),
    (["--model", "llama-2-7b", "--cluster", "/nonexistent.yaml"], "does not exist"),
    (["--model", "llama-2-7b", "--cluster", CASE, "--rate", "-1"], "--rate must be > 0"),
])
def test_plan_errors_are_one_line_exit_2(tmp_path, capsys, argv, needle):
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text("hosts:\n  - {name: a, gpus: {A4000: 2}}\n")
    with pytest.raises(SystemExit) as e:
        main(["plan"] + [a.replace("{tiny}", str(tiny)) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_example_clusters_load():
    files = sorted(CLUSTERS.glob("*.yaml"))
    assert {f.name for f in files} >= {"case-study-8gpu.yaml", "hexgen-58gpu-4region.yaml"}
    for f in files:
        assert load_cluster_yaml(f).num_gpus > 0


def test_plan_package_does_not_import_torch_or_libp2p():
    code = ("import sys, hexswarm.plan, hexswarm.cli.plan_cmd, hexswarm.plan.render; "
            "bad = [m for m in ('torch', 'libp2p', 'trio') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
