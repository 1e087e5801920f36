"""Batching-aware cost model (hand-computed step times), the continuous-batching simulator
(batch 1 reproduces the reference table), calibration ratios, and the planner's choice of max_batch."""

from dataclasses import replace

import pytest

from hexswarm.errors import UserError
from hexswarm.plan.batching_sim import simulate_batching
from hexswarm.plan.calibration import Calibration
from hexswarm.plan.cluster import GPU_CATALOG, GpuKind, Link
from hexswarm.plan.cluster_yaml import cluster_from_yaml_dict
from hexswarm.plan.cost import PrototypeCostModel, RooflineCostModel, StepShape
from hexswarm.plan.model_spec import load_model_spec
from hexswarm.plan.planner import PlanOptions, plan_cluster
from hexswarm.plan.replica import ReplicaPlanner
from hexswarm.plan.search import GaSettings
from hexswarm.plan.workload import LengthDist, Workload

LLAMA7 = load_model_spec("llama-2-7b")
LLAMA70 = load_model_spec("llama-2-70b")
H100 = GPU_CATALOG["H100"]
NO_LINK = Link(0.0, 1e30)


def test_decode_step_is_weights_once_plus_kv_per_row_hand_computed():
    # 7B on one H100 at batch 32, 160 tokens of context per row: memory-bound.
    cost = RooflineCostModel(LLAMA7, 32, 128, 160)
    P, L, q = LLAMA7.params_per_layer, 32, LLAMA7.q_size
    kv_tok = 2 * 32 * 128 * 2  # K and V, 32 heads of 128, bf16: 16 KiB per token per layer
    weights = L * P * 2
    kv = L * 32 * 160 * kv_tok
    head = LLAMA7.head_params
    bw = 3.35e12 * 0.8
    flops = L * (2 * P * 32 + 4 * 32 * 160 * q)
    assert flops / (989e12 * 0.5) < (weights + kv) / bw  # memory-bound, as on the real GPU
    want = (weights + kv) / bw + max(2 * 32 * head / (989e12 * 0.5), head * 2 / bw)
    got = cost.step_s(H100, 1, L, NO_LINK, last=True, shape=StepShape.decode(32, 160))
    assert got == pytest.approx(want, rel=1e-12)
    assert 4.5e-3 < got < 6.5e-3  # ~13.5 GB of weights + 2.7 GB of KV at ~2.7 TB/s


def test_prefill_step_is_compute_bound_hand_computed():
    # 2048 prompt tokens of 70B on 10 layers at TP 2: compute-bound, plus 2 ring all-reduces per layer.
    cost = RooflineCostModel(LLAMA70, 2048, 1, 2049)
    P, q, H = LLAMA70.params_per_layer, LLAMA70.q_size, LLAMA70.hidden_size
    intra = Link(5e-6, 25e9)
    flops = 10 * (2 * P * 2048 + 4 * (2048 * 2048 / 2) * q) / 2
    nbytes = 10 * (P * 2 / 2 + 2048 * LLAMA70.kv_bytes_per_token_per_layer(2))
    a6000 = GPU_CATALOG["A6000"]
    compute = flops / (154.8e12 * 0.5)
    assert compute > nbytes / (0.768e12 * 0.8)
    allreduce = 2 * 10 * 2 * (2 - 1) * (5e-6 + 2048 * H * 2 / (2 * 25e9))
    got = cost.step_s(a6000, 2, 10, intra, last=False, shape=StepShape.prefill(1, 2048))
    assert got == pytest.approx(compute + allreduce, rel=1e-12)


def test_stage_cost_is_the_step_model_at_the_mean_context():
    cost = RooflineCostModel(LLAMA7, 32, 128, 160)
    c = cost.stage(H100, 1, 16, NO_LINK, first=False, last=False, batch=8)
    assert c.decode_s == pytest.approx(cost.step_s(H100, 1, 16, NO_LINK, last=False, shape=StepShape.decode(8, 32 + 64)))
    assert c.prefill_s == pytest.approx(cost.step_s(H100, 1, 16, NO_LINK, last=False, shape=StepShape.prefill(8, 32)))


def test_kv_memory_is_sized_by_max_batch_slots():
    one = RooflineCostModel(LLAMA7, 32, 128, 4096, max_batch=1, reserved_bytes=0)
    many = RooflineCostModel(LLAMA7, 32, 128, 4096, max_batch=9, reserved_bytes=0)
    grow = many.memory_bytes(1, 32, first=False, last=False) - one.memory_bytes(1, 32, first=False, last=False)
    kv_per_slot = 32 * 4096 * LLAMA7.kv_bytes_per_token_per_layer(1)
    act_growth = (min(9 * 4096, 4096) - 4096)  # the step token budget bounds activations
    assert act_growth == 0 and grow == pytest.approx(8 * kv_per_slot, rel=1e-6)


def test_calibration_scales_the_analytic_step_to_the_measurement():
    cost = RooflineCostModel(LLAMA7, 32, 128, 160)
    measured = {1: 5.68e-3, 32: 7.0e-3}
    cal = Calibration(decode=tuple(measured.items()), context=160, prefill_tokens_per_s=20000.0, prompt=128)
    h100 = GpuKind("H100", H100.memory_bytes, H100.tflops, H100.mem_bw_Bps, calibration=cal)
    for b, t in measured.items():  # the whole model at TP 1 reproduces the measurement
        assert cost.step_s(h100, 1, 32, NO_LINK, last=True, shape=StepShape.decode(b, 160)) == pytest.approx(t, rel=1e-9)
    assert cost.step_s(h100, 1, 32, NO_LINK, last=True, shape=StepShape.prefill(1, 128)) == pytest.approx(128 / 20000.0)
    # half the layers: about half the time, scaled by the same ratio
    half = cost.step_s(h100, 1, 16, NO_LINK, last=False, shape=StepShape.decode(32, 160))
    assert 0.4 * 7.0e-3 < half < 0.55 * 7.0e-3
    between = cost.step_s(h100, 1, 32, NO_LINK, last=True, shape=StepShape.decode(8, 160))
    assert 5.68e-3 < between < 7.0e-3


def test_a_measured_mixed_step_prices_prompt_tokens_riding_on_decode_rows():
    cost = RooflineCostModel(LLAMA7, 32, 128, 160)
    base = Calibration(decode=((1, 5.68e-3), (32, 7.0e-3)), context=160, prefill_tokens_per_s=20000.0, prompt=128,
                       prefill_batch=(2048, 0.042))
    kind = GpuKind("H100", H100.memory_bytes, H100.tflops, H100.mem_bw_Bps,
                   calibration=replace(base, mixed=(32, 128, 8.4e-3)))

    def step(k, rows, tokens):
        shape = StepShape.decode(rows, 160) + StepShape.prefill(1, tokens) if tokens else StepShape.decode(rows, 160)
        return cost.step_s(k, 1, 32, NO_LINK, last=True, shape=shape)

    assert step(kind, 32, 128) == pytest.approx(8.4e-3, rel=1e-9)  # the measured step, reproduced
    assert step(kind, 32, 0) == pytest.approx(7.0e-3, rel=1e-9)  # decode alone as before
    # by hand: the decode rows' step (analytic, at the decode ratio) plus a prompt token at 1.4 ms / 128 tokens of the
    # measurement, in analytic-compute units: doubling the prompt adds the same again, minus the larger step's extra KV
    per_token = (8.4e-3 - 7.0e-3) / 128
    assert step(kind, 32, 256) - step(kind, 32, 128) == pytest.approx(128 * per_token, rel=0.02)
    for rows in (8, 32, 64):  # grows with prompt tokens, and with rows
        ts = [step(kind, rows, t) for t in (0, 64, 128, 256, 512)]
        assert ts == sorted(ts) and len(set(ts)) == len(ts)
    assert step(kind, 64, 128) > step(kind, 32, 128) > step(kind, 8, 128)
    # without the mixed point a decode step is priced as before (mixed steps by the token-share blend)
    old = replace(kind, calibration=base)
    assert step(old, 32, 0) == pytest.approx(7.0e-3, rel=1e-9)


# research notes section 1.2 (the same table as test_plan_cost.py): plan -> total seconds of one request
REFERENCE = [([4, 2, 2], [48, 20, 12], 10.22), ([4, 2, 2], [44, 20, 16], 10.58), ([4, 2, 2], [27, 27, 26], 12.11),
             ([8], [80], 3.85), ([2, 2, 2, 2], [20] * 4, 14.53), ([1] * 8, [10] * 8, 28.99)]


@pytest.mark.parametrize("tps,layers,total", REFERENCE)
def test_batching_simulator_at_batch_1_reproduces_the_reference_table(tps, layers, total):
    # one host per stage, prototype constants (alpha 1e-6, beta 1e11) everywhere; GPUs big enough to ignore memory
    proto_gpu = {"huge": {"memory_gib": 10000, "tflops": 1, "mem_bw_gbyte_s": 1}}
    hosts = [{"name": f"h{i}", "gpus": {"huge": tp}, "intra": {"latency_us": 1, "gbyte_s": 100}} for i, tp in enumerate(tps)]
    cluster = cluster_from_yaml_dict({"gpu_kinds": proto_gpu, "hosts": hosts,
                                      "network": {"intra_region": {"latency_us": 1, "gbyte_s": 100}}})
    cost = PrototypeCostModel.full_budget(LLAMA70)
    layout = ReplicaPlanner(cluster, cost).layout([(i, "huge", tp, l) for i, (tp, l) in enumerate(zip(tps, layers))])
    w = Workload(rate=1e-6, slo_s=total * 1.01, num_requests=3)
    r = simulate_batching(cluster, cost, [layout], w, max_batch=1)
    assert r.p50_s == pytest.approx(total, abs=5e-3)
    assert r.p50_s == pytest.approx(layout.latency_s, rel=1e-6)  # arrivals ~1e6 s apart: float rounding
    assert r.slo_attainment == 1.0


def test_batching_simulator_batches_decode_and_pipelines_stages():
    cluster = cluster_from_yaml_dict({"hosts": [{"name": "a", "gpus": {"H100": 2}}]})
    cost = RooflineCostModel(LLAMA7, 32, 128, 160, max_batch=32)
    rp = ReplicaPlanner(cluster, cost, batch=32)
    one = rp.layout([(0, "H100", 1, 32)])
    two = rp.layout([(0, "H100", 1, 16), (0, "H100", 1, 16)])
    heavy = Workload(rate=500.0, slo_s=5.0, max_batch=32, num_requests=160)
    r1 = simulate_batching(cluster, cost, [one], heavy)
    single = simulate_batching(cluster, cost, [one], heavy, max_batch=1)
    assert r1.tokens_per_s > 10 * single.tokens_per_s  # memory-bound decode: 32 rows cost little more than 1
    # a decode step at batch 32 reads the weights once: ITL ~ one step of the whole model
    step = cost.step_s(cluster.hosts[0].gpus[0], 1, 32, cluster.hosts[0].intra, last=True, shape=StepShape.decode(32, 96))
    assert r1.itl_p50_s == pytest.approx(step, rel=0.3)
    # two stages pipeline two micro-batches; with the same 32 slots a memory-bound pipeline gains nothing (each GPU
    # reads its half of the weights twice per round), with the second GPU's memory holding 64 slots it doubles
    assert simulate_batching(cluster, cost, [two], heavy).tokens_per_s == pytest.approx(r1.tokens_per_s, rel=0.15)
    assert simulate_batching(cluster, cost, [two], heavy, max_batch=64).tokens_per_s > 1.6 * r1.tokens_per_s
    light = simulate_batching(cluster, cost, [one], Workload(rate=1e-3, slo_s=5.0, max_batch=32, num_requests=20))
    assert light.p50_s == pytest.approx(one.latency_s, rel=0.02)  # alone: the unloaded latency
    assert light.ttft_p50_s < light.itl_p50_s * 3


def test_planner_takes_a_larger_max_batch_when_the_rate_needs_it_and_memory_allows():
    quick = PlanOptions(final_requests=200, ga=GaSettings(generations=2))
    cluster = cluster_from_yaml_dict({"hosts": [{"name": "a", "gpus": {"H100": 1}}]})
    slow = plan_cluster(cluster, LLAMA7, rate=0.2, slo_s=2.0, options=quick)
    fast = plan_cluster(cluster, LLAMA7, rate=20.0, slo_s=2.0, options=quick)
    assert slow.workload.max_batch == 1
    assert fast.workload.max_batch >= 16
    assert fast.predicted.slo_attainment > 0.9 and fast.predicted.throughput_rps > 15
    # a 24 GiB card holds 7B with little room for KV at 4096 tokens: memory caps max_batch
    tight = cluster_from_yaml_dict({"hosts": [{"name": "a", "gpus": {"A5000": 1}}]})
    long = replace(quick, prompt=LengthDist.constant(3840), output=LengthDist.constant(256))
    capped = plan_cluster(tight, LLAMA7, rate=50.0, slo_s=1000.0, options=long)
    stage = capped.replicas[0].stages[0]
    assert 1 <= capped.workload.max_batch <= 8 and stage.memory_bytes <= stage.memory_capacity_bytes
    assert capped.workload.max_batch < fast.workload.max_batch


def test_calibrated_h100_predicts_the_measured_engine():
    # the H100 numbers: 5.68 ms per token alone, ~7.0 ms per step at batch 32 -> ~35 requests/s of 32 + 128
    doc = {"gpu_kinds": {"H100": {"calibration": {"decode": [[1, 0.00568], [32, 0.0070]], "context": 96,
                                                  "prefill_tokens_per_s": 20000.0, "prompt": 32}}},
           "hosts": [{"name": "h", "gpus": {"H100": 1}}]}
    cluster = cluster_from_yaml_dict(doc)
    assert cluster.hosts[0].gpus[0].calibration is not None
    plan = plan_cluster(cluster, LLAMA7, rate=5.0, slo_s=2.0,
                        options=PlanOptions(max_batch=32, final_requests=100, ga=GaSettings(generations=1)))
    rep = plan.replicas[0]
    assert rep.latency_s == pytest.approx(32 / 20000.0 + 127 * 0.00568, rel=0.02)
    assert rep.capacity_rps == pytest.approx(32 / (128 * 0.0070), rel=0.05)
    with pytest.raises(UserError, match="calibration"):
        cluster_from_yaml_dict({"gpu_kinds": {"H100": {"calibration": {"decode": []}}}, "hosts": doc["hosts"]})


def test_queueing_fitness_hand_values_and_limits():
    from hexswarm.plan.queueing import erlang_c, estimate

    assert erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: P(wait) = rho
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)  # M/M/2 at a = 1 Erlang
    cluster = cluster_from_yaml_dict({"hosts": [{"name": "a", "gpus": {"H100": 1}}]})
    cost = RooflineCostModel(LLAMA7, 32, 128, 160, max_batch=32)
    one = ReplicaPlanner(cluster, cost, batch=32).layout([(0, "H100", 1, 32)])
    light = estimate([one], 32, 0.01 * one.capacity_rps, 1.5 * one.latency_s)
    assert light.slo_attainment > 0.99 and light.mean_s == pytest.approx(one.latency_s, rel=0.02)
    assert estimate([one], 32, 0.9 * one.capacity_rps, 1.5 * one.latency_s).slo_attainment < light.slo_attainment
    assert estimate([one], 32, 2 * one.capacity_rps, 100.0).slo_attainment == 0.0
    assert estimate([one, one], 32, 1.5 * one.capacity_rps, 100.0).slo_attainment > 0.9  # two replicas carry it
