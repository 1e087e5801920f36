"""Discrete-event simulator: unloaded latency, SLO accounting, saturation throughput, determinism."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hexswarm.plan.cluster_yaml import cluster_from_yaml_dict
from hexswarm.plan.cost import RooflineCostModel
from hexswarm.plan.model_spec import load_model_spec
from hexswarm.plan.replica import ReplicaPlanner
from hexswarm.plan.simulator import peak_rate, simulate
from hexswarm.plan.workload import LengthDist, Workload

MODEL = load_model_spec("llama-2-7b")
CLUSTER = cluster_from_yaml_dict({"hosts": [{"name": "a", "gpus": {"A6000": 2}}, {"name": "b", "gpus": {"A6000": 2}}]})
COST = RooflineCostModel(MODEL, 32, 128, 160)
RP = ReplicaPlanner(CLUSTER, COST)
ONE_STAGE = RP.layout([(0, "A6000", 1, 32)])
TWO_STAGES = RP.layout([(0, "A6000", 1, 16), (1, "A6000", 1, 16)])


def test_light_load_sees_the_unloaded_latency():
    w = Workload(rate=1e-6, slo_s=ONE_STAGE.latency_s * 1.01, num_requests=50)
    r = simulate(CLUSTER, COST, [ONE_STAGE], w)
    assert r.p50_s == pytest.approx(ONE_STAGE.latency_s, rel=1e-6)
    assert r.slo_attainment == 1.0
    assert simulate(CLUSTER, COST, [ONE_STAGE], w.with_slo(ONE_STAGE.latency_s * 0.99)).slo_attainment == 0.0


def test_overload_throughput_is_the_pipeline_capacity():
    w = Workload(rate=1000.0, slo_s=1.0, num_requests=300)
    one = simulate(CLUSTER, COST, [ONE_STAGE], w)
    assert one.throughput_rps == pytest.approx(1 / ONE_STAGE.latency_s, rel=0.02)
    # two stages interleave two requests: throughput ~ 1 / bottleneck stage, not 1 / latency
    two = simulate(CLUSTER, COST, [TWO_STAGES], w)
    assert two.throughput_rps == pytest.approx(1 / TWO_STAGES.bottleneck_s, rel=0.05)
    assert two.throughput_rps > 1.8 * one.throughput_rps


def test_batching_raises_memory_bound_throughput():
    w = Workload(rate=1000.0, slo_s=1.0, num_requests=300)
    batched = Workload(rate=1000.0, slo_s=1.0, max_batch=8, num_requests=300)
    assert simulate(CLUSTER, COST, [ONE_STAGE], batched).throughput_rps > 4 * simulate(CLUSTER, COST, [ONE_STAGE], w).throughput_rps


def test_two_replicas_double_the_peak_rate():
    w = Workload(rate=0.5, slo_s=3 * ONE_STAGE.latency_s, num_requests=400)
    one = peak_rate(CLUSTER, COST, [ONE_STAGE], w)
    two = peak_rate(CLUSTER, COST, [ONE_STAGE, ONE_STAGE], w)
    assert 2 * one <= two < 3.2 * one  # pooling two queues (JSQ) gains a little beyond 2x


@settings(max_examples=15, deadline=None)
@given(rate=st.floats(0.05, 20), seed=st.integers(0, 3), low=st.integers(1, 64), span=st.integers(0, 64))
def test_simulation_is_deterministic_and_sane(rate, seed, low, span):
    w = Workload(rate=rate, slo_s=5.0, prompt=LengthDist(low, low + span), output=LengthDist(low, low + span), num_requests=60)
    a = simulate(CLUSTER, COST, [ONE_STAGE, TWO_STAGES], w, seed=seed)
    assert a == simulate(CLUSTER, COST, [ONE_STAGE, TWO_STAGES], w, seed=seed)
    assert 0.0 <= a.slo_attainment <= 1.0 and a.p50_s <= a.p99_s
    assert a.p50_s > 0 and a.throughput_rps > 0
