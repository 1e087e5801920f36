"""The benchmark tools' code paths, on CPU and tiny sizes, so they cannot rot (no timing asserts)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import REPO, load_tool


def test_bench_gpu_tiny_cpu_runs_every_measurement(tmp_path, capsys):
    bench = load_tool("bench_gpu")
    out = tmp_path / "bench.json"
    res = bench.main(["--device", "cpu", "--tiny", "--json", str(out)])
    assert not res.get("errors"), res.get("errors")
    for B in (1, 2):
        for key in (f"engine-fast/{B}", f"engine-torch/{B}", f"hf-eager/{B}", f"hf-sdpa/{B}"):
            assert res["prefill"][key] > 0, key
        for key in (f"engine-graph/{B}", f"engine-eager/{B}", f"engine-torch/{B}", f"hf-eager/{B}", f"hf-sdpa/{B}"):
            assert math.isfinite(res["decode"][key]), key
        assert res["floor"][B]["weights_kv_ms"] > res["floor"][B]["weights_ms"] > 0
    # the fast path (here: its CPU fallback) and the torch path agree exactly in float32
    assert res["agreement"]["max_rel_logit_diff"] < 1e-5
    assert res["agreement"]["argmax_agree_steps"] == "9/9"
    for impl in ("eager", "sdpa"):
        assert res[f"hf_vs_engine_rel_diff/{impl}"] < 1e-4
    assert "| batch |" in capsys.readouterr().out
    assert json.loads(out.read_text())["table"] == res["table"]


def test_checkpoint_maker_writes_a_loadable_7b_shaped_model(tmp_path):
    """The GPU run's checkpoint maker, at one layer and on CPU: config and shapes as Llama-2-7B."""
    bench = load_tool("bench_gpu")
    from safetensors import safe_open

    d = bench.make_llama_checkpoint(tmp_path / "m", layers=1, device=torch.device("cpu"), files=3)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["hidden_size"] == 4096 and cfg["num_hidden_layers"] == 1
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) == 3
    with safe_open(str(d / index["model.layers.0.mlp.down_proj.weight"]), framework="pt") as f:
        t = f.get_slice("model.layers.0.mlp.down_proj.weight")
        assert t.get_shape() == [4096, 11008] and t.get_dtype() == "BF16"


def test_bench_hop_quick_measures_both_transports():
    hop = load_tool("bench_hop")
    res = hop.main(["--quick"])
    assert set(res["rows"]) == {"decode b=1", "decode b=32", "prefill 512"}
    for row in res["rows"].values():
        for kind in ("tcp", "libp2p", "libp2p-plain"):
            assert row[f"{kind}_hop_ms"] > 0
    # the frames carry the activation: 2 bytes per bf16 element plus a small header
    assert res["rows"]["prefill 512"]["frame_bytes"] > 512 * 4096 * 2


def test_bench_serve_tiny_cpu_measures_engine_and_both_front_ends(tmp_path):
    """tools/bench_serve.py on CPU: tiny model, one stage, concurrency 1 and 4, a few tokens.
    Sane positive numbers for every row and ratio; no timing asserts."""
    bench = load_tool("bench_serve")
    out = tmp_path / "serve.json"
    res = bench.main(["--tiny", "--device", "cpu", "--stages", "1", "--concurrency", "1,4", "--new-tokens", "6",
                      "--requests-per-level", "4", "--client-procs", "2", "--engine-batches", "1",
                      "--engine-steps", "3", "--frontends", "http,submit,http-whole", "--arrival", "staggered",
                      "--records", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["serve"] == res["serve"] and saved["device"].startswith("cpu")
    assert saved["model"]["tiny"] and saved["prefill_ms"] > 0
    assert {e["batch"] for e in saved["engine"]} == {1, 4}
    assert all(e["ms_per_step"] > 0 and e["tokens_per_s"] > 0 for e in saved["engine"])
    rows = {(r["frontend"], r["concurrency"]): r for r in saved["serve"]}
    assert set(rows) == {(f, c) for f in ("http", "submit", "http-whole") for c in (1, 4)}
    for r in rows.values():
        assert r["stages"] == 1 and r["errors"] == 0 and r["requests"] == 4, r
        assert 0 < r["tokens"] <= 4 * 6 and r["tokens_per_request_min"] >= 1
        assert r["ratio_tokens_vs_ceiling"] > 0 and r["engine_ceiling_tokens_per_s"] > 0
        assert 0 < r["entry_loop_busy_s"] and 0 < r["entry_loop_busy_share"] <= 1.5  # (scrapes outside the wall)
        # staggered: client j of c sent its first request no earlier than j/c of the expected request time
        period = r["stagger_period_s"]
        assert r["arrival"] == "staggered" and period == pytest.approx(bench.request_period_s(
            saved, r["concurrency"], 6), abs=1e-4) and period > 0
        # ... and each client waited up to one engine step after an answer (phases spread: workload.think_times)
        assert r["think_max_s"] > 0 and r["think_max_s"] == pytest.approx(bench.engine_step_s(saved, r["concurrency"]),
                                                                          abs=1e-5)
        firsts = sorted(rec[0] for rec in r["records"])[:r["concurrency"]]
        assert firsts[-1] - firsts[0] >= 0.7 * period * (r["concurrency"] - 1) / r["concurrency"], (firsts, period)
        if r["frontend"] == "http-whole":  # one answer per request: counted, not timed per token
            assert r["tokens_per_s"] > 0 and r["ttft_p50_s"] is None
            continue
        for key in ("tokens_per_s", "ttft_p50_s", "ttft_p99_s", "ratio_tokens", "ratio_ttft_p50_vs_prefill"):
            assert r[key] > 0, (key, r)
        assert r["ttft_p99_s"] >= r["ttft_p50_s"] and r["itl_p99_s"] >= r["itl_p50_s"] >= 0
        if r["frontend"] == "submit":  # stage 0's own clock, from the done frame: part of the client's TTFT
            assert 0 < r["engine_ttft_p50_s"] <= r["ttft_p99_s"], r
    assert "| stages | front end |" in res["table"]
    # the entry probe, per streamed front end: tiny requests alone, then one burst of the highest concurrency
    probes = {p["frontend"]: p for p in saved["entry_probe"]}
    assert set(probes) == {"http", "submit"}
    for p in probes.values():
        assert p["stages"] == 1 and p["burst"] == 4 and len(p["alone_ttft_s"]) == 8 and len(p["burst_ttft_s"]) == 4
        assert all(t > 0 for t in p["alone_ttft_s"] + p["burst_ttft_s"])
        # the streaming burst: every request answered, tokens counted, the entry node's own CPU taken
        assert p["stream"]["requests"] == 4 and 4 <= p["stream"]["tokens"] <= 4 * 64
        assert p["stream"]["entry_cpu_s"] >= 0
        assert p["stream"]["entry_loop_busy_s"] > 0  # the entry's event loop, from its /metrics


def test_bench_serve_steady_state_window_and_variants():
    """The steady window runs from the first request's end to the last one's start: tokens streamed in
    it over its length, TTFTs of requests started in it; --node-extra given twice is two variants."""
    bench = load_tool("bench_serve")
    recs = [{"start": 0.0, "times": [1.0, 2.0, 3.0], "end": 3.0},  # the first wave: its TTFT is out
            {"start": 0.0, "times": [1.5, 2.5, 3.5, 4.5], "end": 4.5},
            {"start": 3.0, "times": [3.2, 4.0, 6.0], "end": 6.0},
            {"start": 4.0, "times": [4.4, 5.0, 7.0], "end": 7.0}]
    out = bench.steady_state(recs)
    # window [3.0, 4.0]: tokens at 3.0, 3.5, 3.2 and 4.0 -> 4 in 1 s; TTFTs of the starts 3.0 and 4.0
    assert out["steady_window_s"] == 1.0 and out["steady_tokens_per_s"] == 4.0 and out["steady_requests"] == 2
    assert out["steady_ttft_p50_s"] == 0.2 and out["steady_ttft_p99_s"] == 0.4
    assert bench.steady_state(recs[:1]) == {}  # no window: one request
    args = bench.parse_args(["--node-extra", "{}", "--node-extra", '{"gather_prompts": false}',
                             "--node-extra", "http_workers: 2"])
    assert args.variants == [{}, {"gather_prompts": False}, {"http_workers": 2}] and args.node_extra == {}


def test_bench_serve_deals_staggered_starts_over_its_processes():
    """Every client's first-send time reaches one process, each process its own client count, early and
    late ones mixed; the expected request time is prefill + new tokens x the batch-c step."""
    bench = load_tool("bench_serve")
    from hexswarm.plan.workload import staggered_starts

    starts = staggered_starts(8, 0.8)
    assert starts == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    hands = bench.deal(starts, [3, 3, 2])
    assert [len(h) for h in hands] == [3, 3, 2] and sorted(t for h in hands for t in h) == starts
    assert hands[0] == pytest.approx([0.0, 0.3, 0.6]) and hands[2] == pytest.approx([0.2, 0.5])
    assert bench.deal([0.0] * 5, [4, 1]) == [[0.0] * 4, [0.0]]  # a burst: every client at once
    engine = {"prefill_ms": 10.0, "engine": [{"batch": 1, "ms_per_step": 5.0}, {"batch": 8, "ms_per_step": 6.0}],
              "engine_full": [{"batch": 1, "ms_per_step": 5.5}, {"batch": 8, "ms_per_step": 7.0}]}
    assert bench.request_period_s(engine, 8, 100) == pytest.approx((10.0 + 700.0) / 1e3)
    del engine["engine_full"]
    assert bench.request_period_s(engine, 1, 100) == pytest.approx(0.51)
    assert bench.parse_args(["--arrival", "burst,staggered"]).arrivals == ["burst", "staggered"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--arrival", "poisson"])


def test_exact_prompt_has_the_asked_token_count(tiny_model):
    bench = load_tool("bench_serve")
    from hexswarm.model.config import LlamaConfig
    from hexswarm.runtime.tokenizer import TextTokenizer

    tok = TextTokenizer(tiny_model, LlamaConfig.from_dir(tiny_model))
    for n in (16, 128, 129):
        assert len(tok.encode(bench.exact_prompt(tok, n))) == n
def test_bench_quant_tiny_cpu_runs_every_measurement(tmp_path, capsys):
    """bench_quant's code path on CPU: bf16/int8/int4 decode and floors, SmolLM2 agreement
    (the CPU reference path: the Q4_1 blocks dequantize exactly, so every step agrees)."""
    from hexswarm.model.smollm2 import smollm2_path

    smollm2_path(install=True)
    bench = load_tool("bench_quant")
    out = tmp_path / "quant.json"
    res = bench.main(["--device", "cpu", "--tiny", "--json", str(out)])
    for mode in ("bf16", "int8", "int4"):
        for B in (1, 2):
            assert math.isfinite(res["decode"][f"{mode}/{B}"]) and res["floor"][f"{mode}/{B}"] > 0
    assert res["bytes"]["int4"] < res["bytes"]["int8"] < res["bytes"]["bf16"]
    assert res["kernels"] == {"skipped": "needs CUDA and Triton"}
    assert res["smollm2"]["packed_layers"] == 4 * 30
    assert res["smollm2"]["agree"] == res["smollm2"]["steps"]
    assert "| weights | batch |" in capsys.readouterr().out
    assert json.loads(out.read_text())["table"] == res["table"]


def test_decode_profile_tiny_cpu_sums_a_steps_kernels_by_kind(tmp_path):
    """decode_profile's code path on CPU (eager steps, CPU ops as the "kernels"): every weight format timed
    against its floor, the step's time split by kind, the kinds adding up to the busy time."""
    tool = load_tool("decode_profile")
    out = tmp_path / "prof.json"
    res = tool.main(["--device", "cpu", "--tiny", "--int4-backends", "hexswarm", "--profile-steps", "2",
                     "--json", str(out)])
    assert set(res["modes"]) == {"bf16", "int8", "int4/hexswarm"}
    for entry in res["modes"].values():
        assert entry["ms"] > 0 and entry["floor_ms"] > 0 and entry["kernels"] > 0
        assert "attention" in entry["kinds"] and "skeleton" not in entry  # no read-only skeleton off CUDA
        assert sum(k["us"] for k in entry["kinds"].values()) == pytest.approx(entry["busy_us"], rel=0.01, abs=1)
    assert res["pdl"] is False
    assert json.loads(out.read_text())["modes"].keys() == res["modes"].keys()


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="no CPU tinygemm")
def test_bench_tinygemm_tiny_cpu_times_every_path(tmp_path):
    """bench_tinygemm's code path on CPU (torch's CPU twin of tinygemm): every path timed and checked, and
    SmolLM2's greedy agreement with its layers served by it."""
    from hexswarm.model.smollm2 import smollm2_path

    smollm2_path(install=True)
    bench = load_tool("bench_tinygemm")
    res = bench.main(["--device", "cpu", "--tiny", "--rows", "1,8", "--agree-steps", "4",
                      "--json", str(tmp_path / "t.json")])
    # SmolLM2's 120 Q4_1 projections all served by (the CPU twin of) tinygemm, teacher-forced on the dense model
    assert res["smollm2"]["tinygemm_layers"] == res["smollm2"]["packed_layers"] == 4 * 30
    assert res["smollm2"]["agree"] >= 3, res["smollm2"]
    for m in (1, 8):
        row = res["rows"][m]
        assert set(row["total_us"]) == {"ours", "tinygemm/2", "tinygemm/4", "tinygemm/8", "bf16"}
        assert all(us > 0 for us in row["total_us"].values())
        for line in row["shapes"].values():
            assert all(line[k]["error"] < 1e-2 for k in line if k != "bf16"), line
    assert json.loads((tmp_path / "t.json").read_text())["rows"]["1"]["total_us"] == res["rows"][1]["total_us"]


def test_tune_quant_table_takes_the_faster_path_and_rewrites_only_the_tuned_block(tmp_path):
    """tune_quant's decisions without a GPU: the best GEMV config per bucket, None from the
    first bucket where dequantize + cuBLAS was faster, and --apply's rewrite of the table."""
    import ast

    tune = load_tool("tune_quant")
    cfg = lambda n: [16, n, 8, 2, 4, 1]  # noqa: E731
    res = {"env": {"gpu": "GPU X", "date": "today", "torch": "t", "triton": "tr"},
           "results": {"int4/1": {"config": [1, 32, 8, 2, 4, 1], "us": 10.0},
                       "int4/16": {"config": cfg(64), "us": 50.0, "dense_us": 60.0},
                       "int4/32": {"config": cfg(32), "us": 80.0, "dense_us": 70.0},
                       "int4/64": {"config": cfg(128), "us": 100.0, "dense_us": 120.0},
                       "int8/1": {"tried": 0}, "int8/16": {"config": cfg(64), "us": 5.0, "dense_us": 9.0}}}
    table = tune.table_from(res)
    assert table == {(4, 1): (1, 32, 8, 2, 4, 1), (4, 16): tuple(cfg(64)), (4, 32): None, (4, 64): None,
                     (8, 1): None, (8, 16): None}
    path = tmp_path / "quant_kernels.py"
    src = (REPO / "hexswarm" / "model" / "quant_kernels.py").read_text()
    path.write_text(src)
    tune.apply(table, res, path)
    new = path.read_text()
    assert "GPU X" in new
    body = new.split("GEMV_CONFIGS = ", 1)[1].split("\n}\n", 1)[0] + "\n}"
    assert ast.literal_eval(body) == table
    head, tail = src.split("# BEGIN TUNED")[0], src.split("# END TUNED")[1]
    assert new.startswith(head) and new.endswith(tail)


def test_tune_quant_shape_table(tmp_path):
    """A shape whose own best config beats its bucket's on it by more than 3% gets an entry (others
    do not); a base's entries for buckets not measured stay; apply writes the table gemv_config reads."""
    import ast

    tune = load_tool("tune_quant")
    best, own = [1, 2, 64, 0, 2, 1, "dp4a"], [1, 2, 32, 0, 1, 1, "dp4a"]
    res = {"env": {"gpu": "GPU X", "date": "today", "torch": "t", "triton": "tr"},
           "results": {"int4/1": {"config": best, "us": 30.0,
                                  "shapes": {"4096x4096": {"us": 8.0}, "4096x11008": {"us": 14.0},
                                             "12288x4096": {"us": 8.0}},
                                  "by_shape": {"4096x4096": {"config": own, "us": 7.0},      # 12.5% better
                                               "4096x11008": {"config": best, "us": 14.0},   # the bucket's own
                                               "12288x4096": {"config": own, "us": 7.9}}}}}  # 1.25%: not enough
    shapes = tune.shape_table_from(res, {(4, 8, 64, 64): (16, 64, 4, 2, 4, 1), (4, 1, 9, 9): (1,)})
    assert shapes == {(4, 1, 4096, 4096): tuple(own), (4, 8, 64, 64): (16, 64, 4, 2, 4, 1)}
    path = tmp_path / "quant_kernels.py"
    path.write_text((REPO / "hexswarm" / "model" / "quant_kernels.py").read_text())
    tune.apply(tune.table_from(res), res, path, shapes=shapes)
    body = path.read_text().split("GEMV_SHAPE_CONFIGS = ", 1)[1].split("\n}\n", 1)[0] + "\n}"
    assert ast.literal_eval(body) == shapes


def test_tune_quant_step_picks_override_the_kernels_alone():
    """A result with step_rank's picks (--step-top): each ranked bucket takes the config whose whole step
    was fastest, not the fastest alone (dequantize + cuBLAS, None, included); its shape entries are the
    step's (a stale one goes), other buckets' stay; both key spellings (run 28d's "int4", later "int4/8")
    read."""
    tune = load_tool("tune_quant")
    alone, stepped = [1, 2, 32, 0, 1, 3, "dp4a"], [1, 1, 128, 0, 4, 1, "dp4a"]
    res = {"results": {"int8/1": {"config": alone, "us": 87.6}, "int4/8": {"config": [16, 64, 4, 2, 4, 1], "us": 9.0}},
           "step": {"int8": {"best": stepped, "shapes": {"4096x11008": {"pick": [1, 2, 64, 0, 1, 2, "dp4a"]},
                                                        "4096x4096": {"pick": None}}},
                    "int4/8": {"best": [16, 64, 4, 2, 4, 3], "shapes": {}},
                    "int4/16": {"best": None}}}  # dequantize + cuBLAS made the fastest 16-row step
    res["results"]["int4/16"] = {"config": [16, 64, 4, 2, 4, 1], "us": 12.0, "dense_us": 13.0}
    table = tune.table_from(res)
    assert table[(8, 1)] == tuple(alone) and table[(4, 16)] == (16, 64, 4, 2, 4, 1)
    shapes = {(8, 1, 12288, 4096): (1,), (4, 1, 9, 9): (2,)}
    tune.step_picks(res, table, shapes)
    assert table == {(8, 1): tuple(stepped), (4, 8): (16, 64, 4, 2, 4, 3), (4, 16): None}
    assert shapes == {(8, 1, 4096, 11008): (1, 2, 64, 0, 1, 2, "dp4a"), (4, 1, 9, 9): (2,)}


def test_tune_quant_keeps_untuned_buckets_and_tries_both_variants():
    """A sweep of some buckets keeps the table's other entries (None above a measured crossover);
    the M = 1 candidates alternate the "fact" and "deq" kernels, the new one first."""
    tune = load_tool("tune_quant")
    base = {(4, 1): (1, 32, 8, 2, 4, 3), (4, 8): (16, 64, 4, 2, 4, 3), (4, 64): (64, 64, 4, 2, 4, 1),
            (8, 1): (1, 32, 8, 2, 4, 3)}
    fact = [1, 256, 2, 2, 2, 1, "fact"]
    res = {"results": {"int4/1": {"config": fact, "us": 10.0}, "int4/32": {"config": [32, 64, 4, 2, 4, 1],
                                                                          "us": 80.0, "dense_us": 70.0}}}
    table = tune.table_from(res, base)
    assert table == {(4, 1): tuple(fact), (4, 8): base[(4, 8)], (4, 32): None, (4, 64): None, (8, 1): base[(8, 1)]}
    ones = tune.candidates(1)
    assert ones[0][6:] == ("fact",) and len(ones[1]) == 6 and {len(c) for c in ones} == {6, 7}
    assert all(c[0] == 1 for c in ones if len(c) == 7)
    assert all(len(c) == 6 for c in tune.candidates(16))
    assert [c for c in tune.candidates(1, ("deq",)) if len(c) == 7] == []


def test_bench_gemlite_tiny_cpu_runs_the_hexswarm_side_and_decode(tmp_path, capsys):
    """bench_gemlite's code path on CPU: gemlite needs a CUDA device, so only hexswarm's rows, and
    the decode section with both backend settings (gemlite's falls back to ours off CUDA)."""
    bench = load_tool("bench_gemlite")
    out = tmp_path / "gemlite.json"
    res = bench.main(["--device", "cpu", "--tiny", "--bits", "4", "--decode", "int4", "--batches", "1",
                      "--json", str(out)])
    assert set(res["kernels"]) == {"int4/m1", "int4/m3"}
    for entries in res["kernels"].values():
        assert set(entries) == {"hexswarm"} and entries["hexswarm"]["max_error"] < 1e-6
    assert set(res["decode"]["ms"]) == {"int4/hexswarm/1", "int4/gemlite/1"}
    assert res["decode"]["gemlite_layers"]["int4/gemlite"] == 0
    assert "| int4/gemlite | 1 |" in capsys.readouterr().out
    assert json.loads(out.read_text())["table"] == res["table"]


def test_bench_gemlite_picks_the_fastest_gemlite_kernel_for_batch_1():
    bench = load_tool("bench_gemlite")
    res = {"int4/m1": {"hexswarm": {"us": 5.0}, "gemlite/GEMV_REVSPLITK": {"us": 9.0},
                       "gemlite/GEMV_SPLITK": {"us": 7.0}, "gemlite/GEMV_REVSPLITK+bf16atomics": {"us": 6.0}},
           "int8/m1": {"gemlite/GEMV_SPLITK": {"failed": "x"}, "gemlite/GEMV_REVSPLITK": {"skipped": "budget"}}}
    assert bench.best_m1(res, "best") == {4: "GEMV_SPLITK", 8: None}
    assert bench.best_m1(res, "auto") == {8: None, 4: None}
    assert bench.best_m1(res, "GEMV_SPLITK") == {8: "GEMV_SPLITK", 4: "GEMV_SPLITK"}


def test_bench_loop_watch_runs():
    """bench_loop_watch's code path (tiny): both timings come back, positive."""
    out = load_tool("bench_loop_watch").main(["--tasks", "2", "--steps", "200", "--runs", "1"])
    assert len(out) == 1 and all(us > 0 for us in out[0])
