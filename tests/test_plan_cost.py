"""Cost and memory model: the prototype's reference table, real parameter counts, roofline behaviour."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hexswarm.plan.cluster import GIB, GPU_CATALOG, Link
from hexswarm.plan.cost import PrototypeCostModel, RooflineCostModel, request_latency_s
from hexswarm.plan.model_spec import BUILTIN_CONFIGS, load_model_spec

LLAMA70 = load_model_spec("llama-2-70b")
ANY_GPU = GPU_CATALOG["A6000"]  # the prototype ignores the GPU kind (one constant m_d)
PROTO_LINK = Link(1e-6, 1e11)

# research notes section 1.2: plan -> (per-stage compute s, total s, max GPU memory GiB)
REFERENCE = [
    ([4, 2, 2], [48, 20, 12], [4.349, 3.624, 2.174], 10.22, 18.2),
    ([4, 2, 2], [44, 20, 16], [3.986, 3.624, 2.899], 10.58, 16.7),
    ([4, 2, 2], [27, 27, 26], [2.446, 4.892, 4.711], 12.11, 20.4),
    ([8], [80], [3.624], 3.85, 15.4),
    ([2, 2, 2, 2], [20] * 4, [3.624] * 4, 14.53, 15.1),
    ([1] * 8, [10] * 8, [3.624] * 8, 28.99, 15.1),
]


@pytest.mark.parametrize("tps,layers,compute,total,mem_gib", REFERENCE)
def test_prototype_reference_table(tps, layers, compute, total, mem_gib):
    cost = PrototypeCostModel.full_budget(LLAMA70)
    for tp, l, want in zip(tps, layers, compute):
        c_p, c_t = cost.compute_s(tp, l)
        assert c_p + cost.decode_steps * c_t == pytest.approx(want, abs=5e-4)
    stages = [cost.stage(ANY_GPU, tp, l, PROTO_LINK, first=i == 0, last=i == len(tps) - 1) for i, (tp, l) in enumerate(zip(tps, layers))]
    hops = [cost.hop(PROTO_LINK, tps[i + 1], PROTO_LINK) for i in range(len(tps) - 1)]
    assert request_latency_s(cost, stages, hops, 0.0) == pytest.approx(total, abs=5e-3)
    assert max(s.memory_bytes for s in stages) / GIB == pytest.approx(mem_gib, abs=0.05)


def test_prototype_tp_comm_matches_table_note():
    # "[8] / [80]: 3.624 (+0.223 TP comm)": prompt all-reduces plus (s_out - s_in) decode steps
    cost = PrototypeCostModel.full_budget(LLAMA70)
    comm = cost.tp_comm_s(8, 80, cost.s_in) + cost.decode_steps * cost.tp_comm_s(8, 80, 1)
    assert comm == pytest.approx(0.223, abs=5e-4)


@pytest.mark.parametrize("name,params", [("llama-2-7b", 6.74e9), ("llama-2-13b", 13.02e9), ("llama-2-70b", 68.98e9),
                                          ("llama-3-8b", 8.03e9), ("llama-3-70b", 70.55e9)])
def test_parameter_counts_match_published(name, params):
    assert load_model_spec(name).total_params == pytest.approx(params, abs=0.006e9)


def test_llama70_layer_is_gqa_swiglu_sized():
    # 0.856 B params per layer (research notes), vs the prototype's 12 H^2 = 0.805 B
    assert LLAMA70.params_per_layer == pytest.approx(0.856e9, rel=1e-3)
    assert LLAMA70.params_per_layer > 12 * LLAMA70.hidden_size**2


def test_memory_model_holds_every_weight_once():
    cost = RooflineCostModel(LLAMA70, prompt_len=1, output_len=1, max_context=2, reserved_bytes=0)
    whole = cost.memory_bytes(1, LLAMA70.num_layers, first=True, last=True)
    assert LLAMA70.weight_bytes <= whole <= LLAMA70.weight_bytes * 1.001
    assert LLAMA70.weight_bytes == 2 * LLAMA70.total_params  # untied: lm_head counted in total_params
    # split in two stages: same weights, embedding on the first, lm_head on the second
    a = cost.memory_bytes(1, 40, first=True, last=False)
    b = cost.memory_bytes(1, 40, first=False, last=True)
    assert a + b == pytest.approx(whole, rel=1e-4)


def test_kv_cache_is_divided_by_tp():
    # the prototype kept the whole KV per GPU; here TP shards it (GQA: 8 KV heads)
    kv1 = LLAMA70.kv_bytes_per_token_per_layer(1)
    assert LLAMA70.kv_bytes_per_token_per_layer(8) * 8 == kv1
    assert LLAMA70.kv_bytes_per_token_per_layer(16) == LLAMA70.kv_bytes_per_token_per_layer(8)  # replicated head
    cost = RooflineCostModel(LLAMA70, 32, 128, 4096, max_batch=8, reserved_bytes=0)
    no_kv = RooflineCostModel(LLAMA70, 32, 128, 4096, max_batch=8, reserved_bytes=0, max_inflight=0)
    kv_at = lambda tp: cost.memory_bytes(tp, 10, first=False, last=False) - no_kv.memory_bytes(tp, 10, first=False, last=False)
    assert kv_at(4) * 4 == pytest.approx(kv_at(1))


def test_tp_rule_uses_heads_and_kv_heads():
    m = LLAMA70
    assert [d for d in (1, 2, 3, 4, 6, 8, 16) if m.valid_tp(d)] == [1, 2, 4, 8, 16]
    llama3_8b = load_model_spec("llama-3-8b")
    assert llama3_8b.valid_tp(16) and not llama3_8b.valid_tp(3)


def test_decode_of_a_big_stage_is_memory_bound():
    a6000 = GPU_CATALOG["A6000"]
    cost = RooflineCostModel(LLAMA70, 32, 128, 160)
    c = cost.stage(a6000, 1, 10, Link(5e-6, 25e9), first=False, last=False)
    streamed = 10 * LLAMA70.params_per_layer * 2
    assert c.decode_s == pytest.approx(streamed / (a6000.mem_bw_Bps * cost.bandwidth_efficiency), rel=0.02)
    # a long prompt is compute-bound: 2 FLOPs per weight per token
    long = RooflineCostModel(LLAMA70, 4096, 1, 4097).stage(a6000, 1, 10, Link(5e-6, 25e9), first=False, last=False)
    assert long.prefill_s >= 2 * 10 * LLAMA70.params_per_layer * 4096 / (a6000.tflops * 1e12 * 0.5)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(BUILTIN_CONFIGS)), kind=st.sampled_from(sorted(GPU_CATALOG)),
       layers=st.integers(1, 31), tp=st.sampled_from([1, 2, 4, 8]), batch=st.integers(1, 8))
def test_stage_cost_monotone(name, kind, layers, tp, batch):
    m = load_model_spec(name)
    cost = RooflineCostModel(m, 64, 64, 128, max_batch=batch)
    g, link = GPU_CATALOG[kind], Link(5e-6, 25e9)
    one = cost.stage(g, tp, layers, link, first=False, last=False, batch=batch)
    more = cost.stage(g, tp, layers + 1, link, first=False, last=False, batch=batch)
    assert more.prefill_s > one.prefill_s and more.decode_s > one.decode_s and more.memory_bytes > one.memory_bytes
    wider = cost.stage(g, tp * 2, layers, link, first=False, last=False, batch=batch)
    assert wider.memory_bytes < one.memory_bytes
