"""Calibration: measured on the node's own device and model (cached), gossiped in the signed record
(old records stay valid, malformed or unsigned ones are refused), and used by the planner."""

import dataclasses

import pytest

from hexswarm.errors import ProtocolError
from hexswarm.model.config import LlamaConfig
from hexswarm.net import codec, identity
from hexswarm.plan.calibration import parse_calibration
from hexswarm.plan.cluster import cluster_from_peer_table
from hexswarm.swarm import calibrate
from hexswarm.swarm.config import config_from_dict
from hexswarm.serve.planning import PeerView
from hexswarm.swarm.records import SIGNING_DOMAIN, NodeRecord, open_record, sign_record

CAL = {"decode": [[1, 0.00568], [8, 0.0061], [32, 0.007]], "context": 128, "prefill_tokens_per_s": 21000.0,
       "prompt": 128, "layers": 32, "device": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16", "model": "abc"}
# with the runtime's quantities (calibration v2): batched prefill, per-stage host time, local link speed
CAL2 = {**CAL, "prefill_batch": [2048, 0.0453], "stage_overhead": [[1, 7e-4], [8, 8e-4], [32, 1e-3]], "link_Bps": 2.5e9}
# v3: a stage's whole host time per step too
CAL3 = {**CAL2, "stage_host": [[1, 9e-4], [8, 1.1e-3], [32, 1.4e-3]]}
# v4: a step of decode rows and a prompt
CAL4 = {**CAL3, "mixed": [32, 128, 0.0086]}


def _record(me: identity.Identity, **changes) -> NodeRecord:
    base = NodeRecord(me.peer_id.to_base58(), me.public_bytes, "s", [], [{"kind": "cuda"}], ["worker"], {}, 1, 1, 0.0)
    return dataclasses.replace(base, **changes)


def _resign(me: identity.Identity, body_map: dict) -> dict:
    body = codec.encode(body_map)
    return {"body": body, "sig": me.sign(SIGNING_DOMAIN + body)}


@pytest.mark.parametrize("cal", [CAL, CAL2, CAL3, CAL4])
def test_calibration_round_trips_through_the_signed_record(cal):
    me = identity.generate()
    wire = codec.decode(codec.encode(sign_record(_record(me, calibration=cal), me)))
    got = open_record(wire)
    assert got.calibration == cal
    parsed = parse_calibration(got.calibration)
    assert parsed.decode_s(8) == pytest.approx(0.0061)
    assert parsed.to_json() == {**cal, "layers": 32}  # what a node announces is what it measured
    if cal is not CAL:
        assert parsed.overhead_s(1) == pytest.approx(7e-4) and parsed.overhead_s(20) == pytest.approx(9e-4)
        assert parsed.prefill_batch == (2048, 0.0453) and parsed.link_Bps == 2.5e9
        # a v2 record has no host time of its own (the planner adds its GPU time back to the overhead)
        assert parsed.host_s(1) is None if cal is CAL2 else parsed.host_s(20) == pytest.approx(1.25e-3)
        assert parsed.mixed == ((32, 128, 0.0086) if cal is CAL4 else None)
    else:  # not measured: no overhead, the planner's analytic prefill shape
        assert parsed.overhead_s(8) == 0.0 and parsed.prefill_batch is None and parsed.link_Bps is None


def test_records_without_calibration_stay_valid_and_omit_the_field():
    me = identity.generate()
    signed = sign_record(_record(me), me)
    assert "calibration" not in codec.decode(signed["body"])  # nodes that predate the field accept it
    assert open_record(signed).calibration == {}


@pytest.mark.parametrize("bad", [
    {**CAL, "decode": []},
    {**CAL, "decode": [[8, 0.006], [1, 0.005]]},  # batches not ascending
    {**CAL, "decode": [[1, -0.005]]},
    {**CAL, "decode": [[1, float("nan")]]},
    {**CAL, "decode": [[True, 0.005]]},
    {**CAL, "decode": [[1, 0.005, 3]]},
    {**CAL, "decode": [[b, 0.01] for b in range(1, 40)]},  # too many points
    {**CAL, "prefill_tokens_per_s": "fast"},
    {**CAL, "context": 0},
    {**CAL, "device": "x" * 1000},
    {**CAL2, "stage_overhead": [[8, 1e-3], [1, 7e-4]]},  # rows not ascending
    {**CAL2, "stage_overhead": [[1, -1e-3]]},
    {**CAL2, "stage_overhead": [[1, float("inf")]]},
    {**CAL2, "stage_overhead": []},
    {**CAL2, "stage_overhead": "fast"},
    {**CAL3, "stage_host": [[8, 1e-3], [1, 7e-4]]},
    {**CAL3, "stage_host": [[1, 0.0]]},
    {**CAL2, "prefill_batch": [2048]},
    {**CAL2, "prefill_batch": [2048, 0.0]},
    {**CAL2, "prefill_batch": [1.5, 0.04]},
    {**CAL2, "link_Bps": 0},
    {**CAL2, "link_Bps": "2.5e9"},
    {**CAL2, "link_Bps": float("nan")},
    {**CAL4, "mixed": [32, 128]},
    {**CAL4, "mixed": [0, 128, 0.008]},
    {**CAL4, "mixed": [32, 128.5, 0.008]},
    {**CAL4, "mixed": [32, 128, -1.0]},
    {**CAL4, "mixed": "fast"},
    "not a map",
])
def test_malformed_calibration_is_refused(bad):
    me = identity.generate()
    fields = dataclasses.asdict(_record(me))
    fields["calibration"] = bad
    with pytest.raises(ProtocolError, match="calibration"):
        open_record(_resign(me, fields))


def test_unsigned_or_forged_calibration_is_refused():
    me, mallory = identity.generate(), identity.generate()
    signed = sign_record(_record(me, calibration=CAL), me)
    with pytest.raises(ProtocolError):
        open_record({"body": signed["body"]})
    for faster in ({**CAL, "decode": [[1, 1e-6]]}, {**CAL2, "stage_overhead": [[1, 1e-9]]}):
        forged = sign_record(_record(me, calibration=faster), me)
        with pytest.raises(ProtocolError, match="signature"):
            open_record({"body": forged["body"], "sig": signed["sig"]})
    with pytest.raises(ProtocolError, match="signature"):
        open_record({"body": signed["body"], "sig": mallory.sign(SIGNING_DOMAIN + signed["body"])})


def _small_runtime_calibration(monkeypatch) -> None:
    """Fewer and shorter runs of the runtime measurement: the code path, not a timing (tests assert none)."""
    from hexswarm.swarm import calibrate_runtime as rt

    for name, value in (("OVERHEAD_ROWS", (1, 2)), ("REPEATS", 1), ("SHORT", 2), ("LONG", 4), ("LINK_TOKENS", 16)):
        monkeypatch.setattr(rt, name, value)
    for name, value in (("DECODE_BATCHES", (1, 4)), ("PROMPT", 16), ("CONTEXT", 16)):
        monkeypatch.setattr(calibrate, name, value)


def test_measurement_on_the_tiny_model_is_cached_by_device_model_and_dtype(tiny_model, tmp_path, monkeypatch):
    _small_runtime_calibration(monkeypatch)
    first = calibrate.cached_measure(tmp_path, tiny_model, "fp1", "cpu", "float32")
    cal = parse_calibration(first)  # the wire form the record carries
    assert [b for b, _ in cal.decode] == list(calibrate.DECODE_BATCHES)
    assert cal.layers == LlamaConfig.from_dir(tiny_model).num_hidden_layers and cal.model == "fp1"
    # the runtime's share: a full step's prefill, host time per stage by rows (real engines, two stages), the link
    assert cal.prefill_batch is not None and cal.prefill_batch[0] > cal.prompt == 16
    assert [r for r, _ in cal.stage_overhead] == [1, 2] and cal.link_Bps > 0
    # v3: the stage's whole host time, which is at least what it adds beyond its GPU time
    assert [r for r, _ in cal.stage_host] == [1, 2]
    assert all(h >= o for (_, h), (_, o) in zip(cal.stage_host, cal.stage_overhead))

    def boom(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(calibrate, "measure", boom)
    assert calibrate.cached_measure(tmp_path, tiny_model, "fp1", "cpu", "float32") == first
    with pytest.raises(AssertionError):  # another model fingerprint is another key
        calibrate.cached_measure(tmp_path, tiny_model, "fp2", "cpu", "float32")


def test_calibrate_key_is_on_by_default_and_can_be_switched_off(tmp_path):
    assert config_from_dict({}, tmp_path).calibrate is True
    assert config_from_dict({"calibrate": False}, tmp_path).calibrate is False


def test_planner_cluster_takes_the_peers_calibration():
    from hexswarm.serve.plan_bridge import _device

    dev = {"kind": "cuda", "name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.1, "tflops": 700.0, "mem_bw_gbs": 3000.0}
    other = {**dev, "name": "NVIDIA A100-SXM4-80GB"}
    view = PeerView("p1", [dev, other], {}, CAL)
    table = {view.peer: {"devices": [_device(d, view.calibration) for d in view.devices]}}
    cluster = cluster_from_peer_table(table, {})
    measured, not_measured = cluster.hosts[0].gpus
    assert measured.calibration is not None and measured.calibration.decode_s(32) == pytest.approx(0.007)
    assert not_measured.calibration is None  # measured on the H100 only


@pytest.mark.slow
def test_a_serving_node_measures_and_gossips_its_calibration(tmp_path, tiny_model):
    from conftest import run_cli
    from netutil import NodeProcess, query, wait_for, write_config

    a = NodeProcess(write_config(tmp_path, "A", model=str(tiny_model), calibrate=True))
    b = NodeProcess(write_config(tmp_path, "B"))
    try:
        a.start().wait_listening()
        b.start([a.addr]).wait_listening()

        def calibration_seen_by_b() -> dict | None:
            reply = query([b.addr]).get(b.addr) or {}
            return next((p.get("calibration") for p in reply.get("peers", []) if p["peer_id"] == a.peer_id), None)

        assert wait_for(lambda: bool(calibration_seen_by_b()), 90)
        cal = parse_calibration(calibration_seen_by_b())  # B accepted A's signed record with it
        assert [b_ for b_, _ in cal.decode] == list(calibrate.DECODE_BATCHES)
        assert (tmp_path / "A" / calibrate.CACHE_FILE).is_file()
        shown = run_cli("peers", "--peer", b.addr)
        assert shown.returncode == 0 and "ms/step" in shown.stdout
    finally:
        a.kill()
        b.kill()


def test_peers_shows_the_runtime_quantities_when_a_peer_measured_them():
    from hexswarm.cli.node_cmd import _format_calibration

    old, new = _format_calibration(CAL), _format_calibration(CAL2)
    assert "stage overhead" not in old and "local link" not in old  # a v1 record shows what it has
    assert "45,210 tok/s at 2048 tokens" in new and "stage overhead B1:0.70 B8:0.80 B32:1.00 ms/step" in new
    assert "local link 2.50 GB/s" in new and "stage host" not in new
    assert "stage host B1:0.90 B8:1.10 B32:1.40 ms/step" in _format_calibration(CAL3)
    assert _format_calibration({**CAL2, "stage_overhead": "x"}) == "?"
