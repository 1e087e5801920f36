"""tools/plan_vs_measured.py on a synthetic bench_serve JSON: tolerant reading, calibrated predictions, ratios."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import plan_vs_measured as pvm  # noqa: E402
from hexswarm.plan.workload import staggered_starts  # noqa: E402

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
    out = json.loads(out_json.read_text())
    rows = out["rows"]
    assert len(rows) == 4 and rows[0]["measured"]["tokens_per_s"] == 170.0
    assert out["sources"]["stage_overhead"].startswith("not measured")  # says what it did not have
    assert "within 20%:" in table


def test_unreadable_input_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert pvm.main([str(bad)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# bench_serve's own shape (run 9): engine rows, one prompt's and a full step's prefill, node_extra, serve rows
# of several front ends; numbers made up.
SERVE = {
    "device": "NVIDIA H100 80GB HBM3, 79 GiB", "prompt_tokens": 128, "new_tokens": 32,
    "model": {"layers": 32, "hidden": 4096, "heads": 32, "kv_heads": 32, "intermediate": 11008, "vocab": 32000},
    "node_extra": {"micro_batches": 1}, "prefill_ms": 12.0, "prefill_batch": {"prompts": 16, "ms": 45.0},
    "engine": [{"batch": 1, "ms_per_step": 5.7}, {"batch": 8, "ms_per_step": 6.1}, {"batch": 32, "ms_per_step": 7.0}],
    "serve": [{"stages": 1, "frontend": "http", "concurrency": 8, "requests": 16, "tokens_per_s": 1100.0,
               "ttft_p50_s": 0.03, "itl_p50_s": 0.0062},
              {"stages": 1, "frontend": "submit", "concurrency": 8, "requests": 16, "tokens_per_s": 900.0,
               "ttft_p50_s": 0.05, "itl_p50_s": 0.0065},
              {"stages": 2, "frontend": "http", "concurrency": 1, "requests": 4, "tokens_per_s": 130.0,
               "ttft_p50_s": 0.02, "itl_p50_s": 0.0072}],
}
CAL_FILE = {"decode": [[1, 0.0057], [32, 0.007]], "context": 144, "prefill_tokens_per_s": 10000.0, "prompt": 128,
            "prefill_batch": [2048, 0.045], "stage_overhead": [[1, 0.0008], [32, 0.0012]], "link_Bps": 2e9}


def test_reads_bench_serve_rows_of_one_front_end_and_names_every_source():
    b = pvm.read_bench(SERVE, "run.json")
    assert {(m.stages, m.concurrency, m.tokens_per_s) for m in b.layouts} == {(1, 8, 1100.0), (2, 1, 130.0)}
    assert pvm.read_bench(SERVE, frontend="submit").layouts[0].tokens_per_s == 900.0
    cal = b.calibration
    assert cal.prefill_tokens_per_s == pytest.approx(128 / 0.012) and cal.prefill_batch == (2048, 0.045)
    assert cal.stage_overhead == () and cal.link_Bps is None and b.micro_batches == 1 and b.shared_device
    assert "run.json" in b.sources["prefill_batch"] and b.sources["stage_overhead"].startswith("not measured")
    # a node's calibration comes first; flags only fill what nothing measured
    with_cal = pvm.read_bench(SERVE, calibration=CAL_FILE, calibration_name="cal.json", stage_overhead_ms="1:5")
    assert with_cal.calibration.overhead_s(1) == pytest.approx(0.0008) and with_cal.sources["stage_overhead"] == "cal.json"
    assert with_cal.engine == ((1, 0.0057), (32, 0.007))
    flags = pvm.read_bench(SERVE, stage_overhead_ms="1:0.5,32:1.0", link_gbps=3.0, entry_ms=2.0)
    assert flags.calibration.overhead_s(32) == pytest.approx(0.001) and flags.calibration.link_Bps == 3e9
    assert flags.entry_s == pytest.approx(0.002) and flags.sources["stage_overhead"] == "--stage-overhead-ms"


def test_staggered_rows_are_read_apart_and_simulated_with_the_clients_starts_they_had():
    """bench_serve --arrival staggered rows: read only with arrival="staggered", their stagger period
    kept; the simulated clients then start spread as the measured ones did, so a level's prompts do not
    queue behind each other as a burst's do."""
    rows = [dict(SERVE["serve"][0], arrival="burst", stagger_period_s=0.0),
            dict(SERVE["serve"][0], arrival="staggered", stagger_period_s=0.3, ttft_p50_s=0.02)]
    doc = dict(SERVE, serve=rows)
    burst, spread = pvm.read_bench(doc), pvm.read_bench(doc, arrival="staggered")
    assert [(m.ttft_p50_s, m.stagger_period_s) for m in burst.layouts] == [(0.03, 0.0)]
    assert [(m.ttft_p50_s, m.stagger_period_s) for m in spread.layouts] == [(0.02, 0.3)]
    assert pvm.read_bench(SERVE).layouts[0].stagger_period_s == 0.0  # rows from before --arrival: a burst
    b = pvm.read_bench(doc, calibration=CAL_FILE, arrival="staggered")
    (row,) = pvm.compare(b, [1], [8])
    alone = pvm.predict(b, 1, 8, 16, client_starts=staggered_starts(8, 0.3))
    assert row["predicted"]["ttft_p50_s"] == pytest.approx(alone.ttft_p50_s)
    assert alone.ttft_p50_s < 0.6 * pvm.predict(b, 1, 8, 16).ttft_p50_s  # the burst's prompts wait for each other


def test_gather_prompts_is_read_from_the_node_config_and_changes_when_prompts_start():
    """node_extra gather_prompts: false (bench_serve's serving configuration): a one-stage overlapped
    pipeline then starts prompts in the next decided step instead of waiting for the step on the GPU."""
    off = pvm.read_bench(dict(SERVE, node_extra={"micro_batches": 1, "gather_prompts": False}), calibration=CAL_FILE)
    on = pvm.read_bench(SERVE, calibration=CAL_FILE)
    assert on.gather_prompts and not off.gather_prompts
    # a run that recorded the node's defaults (bench_serve since the default became off) and named none
    assert not pvm.read_bench(dict(SERVE, node_defaults={"gather_prompts": False}), calibration=CAL_FILE).gather_prompts
    starts = staggered_starts(32, 0.25)
    a, b = pvm.predict(on, 1, 32, 128, client_starts=starts), pvm.predict(off, 1, 32, 128, client_starts=starts)
    assert a.ttft_p50_s != pytest.approx(b.ttft_p50_s, rel=1e-2)
    assert a.tokens_per_s != pytest.approx(b.tokens_per_s, rel=1e-2)


def test_stages_on_one_device_pay_their_gpu_time_and_host_time_per_step():
    """micro_batches 1, two stages on one device whose hosts wait for it (no GPU handoff): a batch-1 token
    costs the whole model's GPU step plus each stage's host time (hand-computed); one stage hides its
    host time behind the GPU."""
    b = replace(pvm.read_bench(SERVE, calibration=CAL_FILE), cuda=False)
    one, two = pvm.predict(replace(b, cuda=True), 1, 1, 4), pvm.predict(b, 2, 1, 4)
    assert one.gap_p50_s == pytest.approx(0.0057, rel=0.03)  # 0.8 ms host work under a 5.7 ms GPU step
    assert two.gap_p50_s == pytest.approx(0.0057 + 2 * 0.0008, rel=0.03)
    # a prompt: its prefill (128 / 10,000 s) on the shared GPU, each stage's host time, its activations once
    # over the local link (stage 0 -> 1: 128 x 4096 x 2 bytes at 2 GB/s)
    assert two.ttft_p50_s == pytest.approx(0.0128 + 2 * 0.0008 + 128 * 4096 * 2 / 2e9, rel=0.03)
    apart = pvm.predict(replace(b, shared_device=False, micro_batches=None), 2, 8, 32)
    shared = pvm.predict(replace(b, micro_batches=None), 2, 8, 32)
    assert apart.tokens_per_s > 1.3 * shared.tokens_per_s  # two micro-batches overlap only on two devices


def test_stages_that_hand_over_on_the_gpu_expose_only_the_host_time_their_gpu_does_not_hide():
    """CUDA stages on one GPU (bench_serve): a stage turns a step in max(GPU, host time), hand-computed:
    1 ms of host time under each 16-layer stage's ~2.85 ms is hidden, 4 ms is not (2 x 4 ms a token)."""
    b = pvm.read_bench(SERVE, calibration=CAL_FILE)
    hidden = replace(b, calibration=replace(b.calibration, stage_host=((1, 0.001),)))
    exposed = replace(b, calibration=replace(b.calibration, stage_host=((1, 0.004),)))
    assert pvm.predict(hidden, 2, 1, 4).gap_p50_s == pytest.approx(0.0057, rel=0.03)
    assert pvm.predict(exposed, 2, 1, 4).gap_p50_s == pytest.approx(2 * 0.004, rel=1e-6)
    # activations stay on the GPU: no socket link time for a prompt
    assert pvm.predict(hidden, 2, 1, 4).ttft_p50_s == pytest.approx(0.0128, rel=0.03)


def test_a_v2_calibration_gets_its_gpu_time_added_back_as_host_time():
    """A v2 record holds (step - GPU time of two 1-layer stages) / 2; the stage's host time is that
    plus half the same calibration's 2-layer GPU step (with lm_head)."""
    from hexswarm.plan.batching_sim import step_timer
    from hexswarm.plan.cost import StepShape

    b = pvm.read_bench(SERVE, calibration=CAL_FILE)
    cluster, cost, (layout,) = pvm.pipeline(b, 2, 1)
    timer = step_timer(cluster, cost, layout)
    kind = cluster.hosts[0].gpus[0]
    two_layers = cost.step_s(kind, 1, 2, pvm.NO_HOP, last=True, shape=StepShape.decode(1, 144))
    assert timer.host_s(0, StepShape.decode(1, 144)) == pytest.approx(0.0008 + two_layers / 2, rel=1e-9)
    assert 0 < two_layers < 0.0057 * 3 / 32  # about 2 of the 32 layers plus lm_head
    v3 = replace(b, calibration=replace(b.calibration, stage_host=((1, 0.0009),)))
    cluster, cost, (layout,) = pvm.pipeline(v3, 2, 1)
    assert step_timer(cluster, cost, layout).host_s(1, StepShape.decode(1, 144)) == pytest.approx(0.0009)


def test_entry_latency_shifts_the_first_token_only():
    b = pvm.read_bench(SERVE, calibration=CAL_FILE)
    base, late = pvm.predict(b, 1, 1, 4), pvm.predict(replace(b, entry_latency_s=0.004), 1, 1, 4)
    assert late.ttft_p50_s == pytest.approx(base.ttft_p50_s + 0.004, rel=1e-9)
    assert late.gap_p50_s == pytest.approx(base.gap_p50_s, rel=1e-9)
    assert late.tokens_per_s < base.tokens_per_s  # each client waits that long longer per request


def test_a_one_stage_engine_starts_new_prompts_when_the_step_on_the_gpu_ends():
    """8 clients sending 2.5 ms apart, no entry (hand-computed).  The first prompt runs alone (the engine
    was idle) and its decode row is launched at once behind it; prompts 2-6 arrive during the prefill,
    7 and 8 during that decode step.  The engine waits for the step on the GPU before starting prompts,
    so all 7 go in the step after the decode step, none in a later one."""
    from hexswarm.plan.batching_sim import step_timer
    from hexswarm.plan.cost import StepShape

    e = 0.0025
    b = pvm.read_bench(SERVE, calibration=CAL_FILE)
    wave = pvm.predict(b, 1, 8, 8, client_starts=[k * e for k in range(8)])
    cluster, cost, (layout,) = pvm.pipeline(b, 1, 8)
    timer = step_timer(cluster, cost, layout)
    alone = timer.stage_s(0, StepShape.prefill(1, 128))
    decode = timer.stage_s(0, StepShape.decode(1, 128))
    seven = timer.stage_s(0, StepShape.prefill(7, 128) + StepShape.decode(1, 129))
    assert 5 * e < alone < 6 * e < 7 * e < alone + decode  # the arrivals fall as described
    assert wave.ttft_s[0] == pytest.approx(alone, rel=1e-4)
    together = alone + decode + seven  # all 7 have their first token then
    assert [t + k * e for k, t in enumerate(wave.ttft_s) if k] == pytest.approx([together] * 7, rel=1e-4)


def test_the_first_of_simultaneous_starts_runs_alone():
    """A wave whose starts reach stage 0 at the same moment: they come one message at a time, so the idle
    engine starts a step on the first, and the others share the next (every closed-loop wave of run 14's
    records: the first request's first token alone, the rest together a step later)."""
    from hexswarm.plan.batching_sim import step_timer
    from hexswarm.plan.cost import StepShape

    b = pvm.read_bench(SERVE, calibration=CAL_FILE)
    wave = pvm.predict(b, 1, 8, 8)
    cluster, cost, (layout,) = pvm.pipeline(b, 1, 8)
    timer = step_timer(cluster, cost, layout)
    alone = timer.stage_s(0, StepShape.prefill(1, 128))
    decode = timer.stage_s(0, StepShape.decode(1, 128))
    seven = timer.stage_s(0, StepShape.prefill(7, 128) + StepShape.decode(1, 129))
    assert wave.ttft_s[0] == pytest.approx(alone, rel=1e-4)
    assert wave.ttft_s[1:] == pytest.approx([alone + decode + seven] * 7, rel=1e-4)


def test_a_calibrated_prompt_step_takes_the_longer_of_the_launch_and_the_gpu_work():
    """Between one prompt (launch-bound, 12.8 ms here) and a full step of 2048 tokens (45 ms), a step of n
    prompt tokens takes max(12.8 ms, 45 ms x n / 2048), hand-computed, on the calibration's own run (all 32
    layers with lm_head, TP 1): 7 prompts 19.7 ms, 2 prompts the launch time."""
    from hexswarm.plan.cost import StepShape

    b = pvm.read_bench(SERVE, calibration=CAL_FILE)
    cost = pvm.pipeline(b, 1, 8)[1]
    kind = pvm.calibrated_device(b)

    def step(prompts: int) -> float:
        return cost.step_s(kind, 1, 32, pvm.NO_HOP, last=True, shape=StepShape.prefill(prompts, 128))

    assert step(1) == pytest.approx(0.0128, rel=1e-9) and step(16) == pytest.approx(0.045, rel=1e-9)
    assert step(2) == pytest.approx(0.0128, rel=1e-9)
    assert step(7) == pytest.approx(0.045 * 7 / 16, rel=1e-9)
    assert step(32) == pytest.approx(0.090, rel=1e-9)  # compute-bound: linear beyond the full step


def test_a_closed_loop_wave_waits_for_the_entry_and_the_step_budget():
    b = pvm.read_bench(SERVE, calibration=CAL_FILE)
    wave = pvm.predict(b, 1, 32, 32)  # one wave: 32 x 128 prompt tokens, 2048 per step
    assert wave.ttft_p99_s > 2 * 0.045  # the second half waits for the first half's step
    slow_entry = pvm.predict(replace(b, entry_s=0.004), 1, 32, 32)
    assert slow_entry.ttft_p99_s > 32 * 0.004 > wave.ttft_p99_s  # the last of 32 passes the entry after 32 x 4 ms


@pytest.mark.parametrize("shape", ["plain", "node cache"])
def test_cli_takes_a_node_calibration_file_and_says_so(tmp_path, capsys, shape):
    bench, cal = tmp_path / "run.json", tmp_path / "cal.json"
    bench.write_text(json.dumps(SERVE))
    cal.write_text(json.dumps(CAL_FILE if shape == "plain" else {"v2|H100|fp|bfloat16": CAL_FILE}))
    assert pvm.main([str(bench), "--calibration", str(cal), "--stages", "1", "2", "--concurrency", "1"]) == 0
    out = capsys.readouterr().out
    assert f"host time per stage per step: B1 0.80 ms B32 1.20 ms ({cal})" in out
    assert "| 2 | 1 |" in out and "entry: 0.00 ms per request in (not measured: 0)" in out


def test_a_malformed_calibration_file_is_one_line_exit_2(tmp_path, capsys):
    bench, cal = tmp_path / "run.json", tmp_path / "cal.json"
    bench.write_text(json.dumps(SERVE))
    cal.write_text(json.dumps({**CAL_FILE, "stage_overhead": [[1, -1.0]]}))
    assert pvm.main([str(bench), "--calibration", str(cal)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cal.json" in err and "stage_overhead" in err


def test_calibrate_node_summary_names_every_quantity():
    import calibrate_node

    text = calibrate_node.summary({**CAL_FILE, "layers": 32, "device": "H100", "dtype": "bfloat16"})
    for part in ("B1 5.700 ms", "2048 tokens in one forward", "host time per stage per step B1 0.800 ms", "2.00 GB/s"):
        assert part in text


def test_the_entry_probe_gives_each_swarm_its_entry_work_and_latency():
    """bench_serve's probe (tiny requests alone and in one burst) is read back through the model: made from the
    model with a known entry, it gives that entry back; the predictions then use it per stage count."""
    b = pvm.read_bench(SERVE, calibration=CAL_FILE)
    tiny = replace(b, prompt_len=2, output_len=1)
    known = pvm.Entry(arrive_s=0.0006, done_s=0.0003, latency_s=0.004)
    alone = pvm.predict(tiny, 2, 1, 8, entry=known).ttft_s
    burst = pvm.predict(tiny, 2, 32, 32, entry=known).ttft_s
    probe = {"stages": 2, "frontend": "http", "prompt_tokens": 2, "new_tokens": 1, "burst": 32,
             "alone_ttft_s": list(alone), "burst_ttft_s": list(burst)}
    doc = {**SERVE, "entry_probe": [probe, {**probe, "frontend": "submit", "alone_ttft_s": [1.0] * 8}, {"junk": 1}]}
    probed = pvm.read_bench(doc, "run.json", calibration=CAL_FILE)
    assert [p.stages for p in probed.entry_probes] == [2] and "entry probe of run.json" in probed.sources["entry"]
    got = pvm.estimate_entry(probed, probed.entry_probes[0])
    assert got.latency_s == pytest.approx(0.004, abs=2e-5)
    assert got.arrive_s == pytest.approx(0.0006, rel=0.02) and got.done_s == pytest.approx(0.0003, rel=0.05)
    row = next(r for r in pvm.compare(probed, [2], [1], 4) if r["stages"] == 2)
    assert row["predicted"]["ttft_p50_s"] == pytest.approx(pvm.predict(b, 2, 1, 4).ttft_p50_s + 0.004 + 0.0006, rel=0.02)
    assert pvm.read_bench(doc, calibration=CAL_FILE, entry_ms=1.0).entry_probes == ()  # a flag says otherwise


def test_the_streaming_probe_gives_the_entry_work_per_token_relayed():
    """The probe's streaming burst: the entry node's CPU seconds, less each request's arrive + done work, per
    token relayed; without a streaming burst (older bench files) it is 0."""
    b = pvm.read_bench(SERVE, calibration=CAL_FILE)
    tiny = replace(b, prompt_len=2, output_len=1)
    known = pvm.Entry(arrive_s=0.0006, done_s=0.0003, latency_s=0.004)
    probe = {"stages": 1, "frontend": "http", "prompt_tokens": 2, "new_tokens": 1, "burst": 32,
             "alone_ttft_s": list(pvm.predict(tiny, 1, 1, 8, entry=known).ttft_s),
             "burst_ttft_s": list(pvm.predict(tiny, 1, 32, 32, entry=known).ttft_s)}
    streamed = dict(probe, stream={"requests": 32, "tokens": 2048, "entry_cpu_s": 32 * 0.0009 + 2048 * 80e-6})
    (old,) = pvm.read_bench(dict(SERVE, entry_probe=[probe]), calibration=CAL_FILE).entry_probes
    bench = pvm.read_bench(dict(SERVE, entry_probe=[streamed]), calibration=CAL_FILE)
    got = pvm.estimate_entry(bench, bench.entry_probes[0])
    assert got.token_s == pytest.approx(80e-6, rel=0.05) and pvm.estimate_entry(bench, old).token_s == 0.0
    assert "us per token relayed" in pvm._entry_text(bench)
    # a node that reports its event loop's busy time: that, not its CPU (a loop waiting for the GIL is busy)
    looped = dict(probe, stream=dict(streamed["stream"], entry_loop_busy_s=32 * 0.0009 + 2048 * 120e-6))
    bench = pvm.read_bench(dict(SERVE, entry_probe=[looped]), calibration=CAL_FILE)
    assert pvm.estimate_entry(bench, bench.entry_probes[0]).token_s == pytest.approx(120e-6, rel=0.05)


def test_first_tokens_go_out_before_the_decode_rows_tokens_and_starts_wait_behind_both():
    """A step's tokens reach the entry in one message, first tokens first (StageEngine._tokens_back): a
    prompt finishing in a step with 7 decode rows is not delayed by their tokens, but the next start waits
    for all of them (the entry's loop itself: hand-computed)."""
    from hexswarm.plan.batching_sim import _Entry

    e = _Entry(0.0, 0.0, 0.001)
    assert e.token(1.0) == pytest.approx(1.0) and e.token(1.0) == pytest.approx(1.001)  # each first token costs too
    e.relay(1.0, 7)
    assert e.start(1.0) == pytest.approx(1.009)  # a start behind the relaying
    b = replace(pvm.read_bench(SERVE, calibration=CAL_FILE), output_len=400)  # all 8 still decoding at the end
    starts = [0.05 * j for j in range(8)]  # one arrival per 50 ms: the 8th joins 7 decoding requests
    free = pvm.predict(b, 1, 8, 8, client_starts=starts, entry=pvm.Entry(arrive_s=1e-9))
    slow = pvm.predict(b, 1, 8, 8, client_starts=starts, entry=pvm.Entry(arrive_s=1e-9, token_s=1e-4))
    assert slow.ttft_s[0] == pytest.approx(free.ttft_s[0], abs=1e-6)  # alone: nothing before its token
    assert slow.ttft_s[7] - free.ttft_s[7] < 7e-4  # its first token does not wait for the 7 decode rows' tokens


def test_a_burst_reaches_stage_0_once_the_entry_has_taken_all_of_it_in():
    """The entry's loop takes in every request of a burst (arrive_s each) before the first start gets through;
    the first tokens then go out one by one behind each finished request's done_s (1-token requests,
    hand-computed)."""
    b = pvm.read_bench(SERVE, calibration=CAL_FILE)
    tiny = replace(b, prompt_len=2, output_len=1)
    alone = pvm.predict(tiny, 1, 1, 1).ttft_p50_s
    burst = pvm.predict(tiny, 1, 16, 16, entry=pvm.Entry(arrive_s=0.001, done_s=0.0005)).ttft_s
    assert burst[0] == pytest.approx(16 * 0.001 + alone, rel=1e-3)  # the first start after 16 requests' work in
    rest = sorted(burst[1:])  # the other 15 in the next step, their tokens 0.5 ms apart
    assert [b - a for a, b in zip(rest, rest[1:])] == pytest.approx([0.0005] * 14, rel=1e-3)


def test_stage_0_of_gpu_handoff_stages_takes_no_prompt_that_arrives_after_it_decided_the_next_step():
    """4 clients sending 2.5 ms apart, on one stage and on two GPU-handoff stages (same GPU work, host time
    hidden).  One stage waits for the first prompt's step before starting prompts: 2-4 share the next step.
    Two stages decide the next step as soon as the last stage has queued its part of the first and handed the
    tokens back (host time, ~2 ms here: StageEngine._returned_on_gpu), before prompt 2 is there: that step
    carries prompt 1's decode row only, and 2-4 share the one after, decided once stage 0 has read step 1."""
    b = pvm.read_bench(SERVE, calibration=CAL_FILE)
    starts = [0.0, 0.0025, 0.005, 0.0075]
    one, two = pvm.predict(b, 1, 4, 4, client_starts=starts), pvm.predict(b, 2, 4, 4, client_starts=starts)
    at_one = [t + s for t, s in zip(one.ttft_s, starts)]
    at_two = [t + s for t, s in zip(two.ttft_s, starts)]
    assert at_one[1] == pytest.approx(at_one[2]) and at_one[2] == pytest.approx(at_one[3])
    assert at_two[1] == pytest.approx(at_two[2]) and at_two[2] == pytest.approx(at_two[3])
    step1, decode_row = at_two[0], two.gap_p50_s  # prompt 1 alone, then a step of one decode row
    assert at_two[1] > step1 + decode_row  # 2-4 run after the decode-only step, not in it
    assert two.gap_p50_s == pytest.approx(one.gap_p50_s, rel=0.05)


def test_a_client_s_think_time_delays_its_next_request_by_the_drawn_wait():
    """One closed-loop client with waits of up to 20 ms after each answer (workload.think_times, as bench_serve's
    staggered clients wait): its requests' times are those without waits, each later by the waits drawn before
    it; the TTFT of each is what it was alone (nothing else in flight)."""
    from itertools import islice

    from hexswarm.plan.workload import think_times

    b = pvm.read_bench(SERVE, calibration=CAL_FILE)
    plain = pvm.predict(b, 1, 1, 6)
    waits = list(islice(think_times(0, 0.02), 5))
    thinking = pvm.predict(b, 1, 1, 6, think_max_s=0.02)
    assert all(0 <= w <= 0.02 for w in waits) and len(set(waits)) == 5
    assert thinking.ttft_s == pytest.approx(plain.ttft_s, rel=1e-9)
    assert thinking.num_requests / thinking.throughput_rps == pytest.approx(
        plain.num_requests / plain.throughput_rps + sum(waits), rel=1e-9)
    assert list(islice(think_times(3, 0.0), 2)) == [0.0, 0.0]
    assert list(islice(think_times(3, 0.02), 3)) == list(islice(think_times(3, 0.02), 3))  # seeded by the client
