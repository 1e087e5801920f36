"""tools/plan_vs_measured.py on a synthetic bench_serve JSON: tolerant reading, calibrated predictions, ratios."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import plan_vs_measured as pvm  # noqa: E402

SYNTHETIC = {
    "device": "NVIDIA H100 80GB HBM3", "model": "llama-2-7b", "prompt_len": 32, "output_len": 64,
    "engine": [{"batch": 1, "ms_per_step": 5.68}, {"batch": 8, "ms_per_step": 6.0}, {"batch": 32, "ms_per_step": 7.0}],
    "layouts": [{"stages": 1, "concurrency": 1, "tokens_per_s": 170.0, "ttft_p50_s": 0.012, "itl_p50_s": 0.0058},
                {"stages": 2, "concurrency": 8, "tokens_per_s": 1200.0, "ttft_p50_s": 0.02, "itl_p50_s": 0.0065}],
}


def test_reads_the_documented_schema_and_a_flat_variant():
    b = pvm.read_bench(SYNTHETIC)
    assert b.device.name == "H100" and b.model.num_layers == 32 and (b.prompt_len, b.output_len) == (32, 64)
    assert [b for b, _ in b.engine] == [1, 8, 32] and [t for _, t in b.engine] == pytest.approx([0.00568, 0.006, 0.007])
    assert {(m.stages, m.concurrency) for m in b.layouts} == {(1, 1), (2, 8)}
    flat = {"gpu": "H100", "new_tokens": 64, "prompt_tokens": 32,
            "rows": [*SYNTHETIC["engine"], *SYNTHETIC["layouts"], {"stages": "x"}, "junk"]}
    assert pvm.read_bench(flat).engine == b.engine and len(pvm.read_bench(flat).layouts) == 2
    with pytest.raises(ValueError):
        pvm.read_bench({"device": "H100"})


def test_predictions_follow_the_engine_rows():
    b = pvm.read_bench(SYNTHETIC)
    alone = pvm.predict(b, stages=1, concurrency=1, requests=8)
    assert alone.itl_p50_s == pytest.approx(0.00568, rel=0.02)  # one row: the measured batch-1 step
    full = pvm.predict(b, stages=1, concurrency=32, requests=64)
    assert full.itl_p50_s == pytest.approx(0.007, rel=0.1)  # 32 rows: the measured batch-32 step
    assert full.tokens_per_s > 15 * alone.tokens_per_s


def test_cli_prints_predicted_measured_and_ratio(tmp_path, capsys):
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(SYNTHETIC))
    out_json = tmp_path / "cmp.json"
    assert pvm.main([str(src), "--stages", "1", "2", "--concurrency", "1", "8", "--requests", "8",
                     "--json", str(out_json)]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("| 1 | 1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    pred, meas, ratio = float(cells[2]), float(cells[3]), float(cells[4])
    assert meas == 170.0 and ratio == pytest.approx(pred / meas, abs=0.01)
    assert "| 2 | 8 |" in table and "| 1 | 8 |" in table  # unmeasured cells are predicted, marked "-"
    rows = json.loads(out_json.read_text())
    assert len(rows) == 4 and rows[0]["measured"]["tokens_per_s"] == 170.0


def test_unreadable_input_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert pvm.main([str(bad)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
