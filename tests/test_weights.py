"""Weights from peers (issue 16): the manifest, the local block cache, and a node started without the
checkpoint that fetches its stage's tensors from two holders, one of which serves a corrupted block."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from hexswarm.errors import ProtocolError
from hexswarm.model.checkpoint import CheckpointReader
from hexswarm.model.manifest import build_manifest, check_manifest, stage_tensors
from hexswarm.model.source import model_fingerprint
from hexswarm.model.weight_cache import WeightCache
from hexswarm.swarm.weights import BLOCK_BYTES_ENV, CORRUPT_ENV, read_weights_request

SMALL_BLOCKS = 4096  # the tiny model's tensors then span several blocks


@pytest.fixture(scope="module")
def manifest(tiny_model):
    fp = model_fingerprint(tiny_model)
    m, index = build_manifest(tiny_model, fp, SMALL_BLOCKS)
    return fp, m, index


def test_manifest_is_bound_to_the_fingerprint_and_checked(manifest):
    fp, m, index = manifest
    assert check_manifest(m, fp) is m
    assert any(len(t["blocks"]) > 1 for t in m["tensors"].values())
    assert all(index[d].length <= SMALL_BLOCKS for t in m["tensors"].values() for d in t["blocks"])
    bad = [
        ({**m, "model": "0" * 16}, fp),  # another model
        (m, "0" * 16),
        ({**m, "files": {**m["files"], "../evil": m["files"]["config.json"]}}, fp),  # a path
        ({**m, "files": {k: v for k, v in m["files"].items() if k != "config.json"}}, fp),  # unbound
        ({**m, "tensors": {"../x": next(iter(m["tensors"].values()))}}, fp),
        ({**m, "tensors": {"x": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "blocks": []}}}, fp),  # huge
        ({**m, "tensors": {"x": {"dtype": "F32", "shape": [2048], "blocks": [b"x" * 32]}}}, fp),  # block count
        ({**m, "tensors": {"x": {"dtype": "PICKLE", "shape": [1], "blocks": [b"x" * 32]}}}, fp),
        ({**m, "block_size": 0}, fp),
        ({**m, "extra": 1}, fp),
        ([], fp),
    ]
    for obj, want in bad:
        with pytest.raises(ProtocolError):
            check_manifest(obj, want)


def test_weights_requests_are_checked():
    assert read_weights_request({"blocks": [b"x" * 32]}) == ("blocks", [b"x" * 32])
    assert read_weights_request({"manifest": "ab" * 8}) == ("manifest", "ab" * 8)
    for msg in [{}, {"blocks": [b"x"]}, {"blocks": ["x" * 32]}, {"blocks": []}, {"blocks": [b"x" * 32] * 65},
                {"blocks": b"x" * 32}, {"manifest": 1}, {"manifest": "a" * 65}, {"blocks": [b"x" * 32], "manifest": "a"},
                [], None, b"x"]:
        with pytest.raises(ProtocolError):
            read_weights_request(msg)


def test_stage_tensors_are_only_the_stage_s_own():
    names = ["model.embed_tokens.weight", "model.layers.0.a", "model.layers.1.a", "model.layers.10.a",
             "model.norm.weight", "lm_head.weight"]
    assert stage_tensors(names, 0, 1, True, False) == ["model.embed_tokens.weight", "model.layers.0.a"]
    assert stage_tensors(names, 1, 2, False, False) == ["model.layers.1.a"]
    assert stage_tensors(names, 10, 11, False, True) == ["model.layers.10.a", "model.norm.weight", "lm_head.weight"]
    assert "model.embed_tokens.weight" in stage_tensors(names[:-1], 10, 11, False, True)  # tied: no lm_head


def test_cache_keeps_verified_blocks_across_restarts_and_writes_a_checkpoint(manifest, tiny_model, tmp_path):
    fp, m, index = manifest

    def raw(d):
        w = index[d]
        with open(w.path, "rb") as f:
            f.seek(w.offset)
            return f.read(w.length)

    names = stage_tensors(list(m["tensors"]), 0, 2, True, False)
    cache = WeightCache(tmp_path, m)
    blocks = cache.blocks_of(list(m["files"]), names)
    half = blocks[: len(blocks) // 2]
    assert not cache.put_block(half[0][0], b"corrupt")  # refused: does not hash to its digest
    for d, _ in half:
        assert cache.put_block(d, raw(d))
    # an interrupted fetch: a new process finds the verified blocks; a damaged one is dropped
    damaged = half[1][0]
    (tmp_path / "blocks" / damaged.hex()).write_bytes(b"torn")
    again = WeightCache(tmp_path, m)
    have = [d for d, _ in blocks if again.has_block(d)]
    assert set(have) == {d for d, _ in half} - {damaged}
    for d, _ in blocks:
        if not again.has_block(d):
            assert again.put_block(d, raw(d))
    again.write_files()
    again.write_tensors(names)
    assert model_fingerprint(tmp_path) == fp
    reader, ref = CheckpointReader(tmp_path), CheckpointReader(tiny_model)
    assert sorted(reader.names()) == sorted(names)
    for n in names:
        assert torch.equal(reader.read(n), ref.read(n))
    assert not any((tmp_path / "blocks").iterdir())  # blocks of written tensors are dropped


@pytest.mark.slow
def test_a_node_without_the_checkpoint_fetches_its_stage_from_peers_and_serves(tiny_model, tmp_path, monkeypatch):
    from hexswarm.launcher import LocalSwarm, NodeProcess, free_port, write_node_config
    from swarmutil import reference, submit_many

    fp = model_fingerprint(tiny_model)
    layout = {"hetero_config": [1, 1, 1], "pp_partition": [2, 1, 1]}  # three stages: needs the third node
    sw = LocalSwarm(tmp_path, tiny_model, [1, 1], serve_layout=layout, extra={"dispatch_wait_s": 5.0})
    sw.nodes[0].port = free_port()  # known before it starts: all three nodes start at once
    monkeypatch.setenv(BLOCK_BYTES_ENV, str(SMALL_BLOCKS))
    try:
        sw.nodes[0].start()
        monkeypatch.setenv(CORRUPT_ENV, "2")  # the holder node1 corrupts the third block it serves
        sw.nodes[1].start([sw.nodes[0].addr])
        monkeypatch.delenv(CORRUPT_ENV)
        cfg = write_node_config(tmp_path, "fetcher", swarm=sw.swarm, model=fp, roles=["worker"], serve_layout=layout,
                                dispatch_wait_s=5.0)
        fetcher = NodeProcess(cfg)
        sw.nodes.append(fetcher)
        fetcher.start([sw.nodes[0].addr])
        for n in sw.nodes:
            n.wait_listening()
        status = sw.wait_layout(90)
        log = fetcher.log()
        # the corrupt block was caught by its hash and its holder never asked again; both holders served
        assert re.search(rf"peer {sw.nodes[1].peer_id} served block \w+ that fails its hash: not asked again", log)
        served = [json.loads(s.replace("'", '"')) for s in re.findall(r"blocks per peer (\{[^}]*\})", log)]
        assert any(sw.nodes[0].peer_id in s for s in served) and any(sw.nodes[1].peer_id in s for s in served)
        # only this stage's tensors were fetched, into a normal checkpoint
        (replica,) = status["replicas"]
        (mine,) = [(i, s) for i, s in enumerate(replica["stages"]) if s["peer"] == fetcher.peer_id]
        i, st = mine
        cache = tmp_path / "fetcher" / "models" / fp
        want = stage_tensors(list(CheckpointReader(tiny_model).names()), *st["layers"], i == 0, i == 2)
        assert sorted(CheckpointReader(cache).names()) == sorted(want)
        # and the pipeline through it gives the tokens of `generate`
        (res,) = submit_many([(fetcher.addr, {"prompt": "Hello, world!", "max_new_tokens": 8})])
        assert res["done"]["tokens"] == reference(tiny_model, "Hello, world!", 8)["tokens"]
        assert "Traceback" not in log
    finally:
        sw.stop()
        os.environ.pop(CORRUPT_ENV, None)


def test_config_model_fingerprint_means_fetch_from_peers(tmp_path):
    from hexswarm.errors import UserError
    from hexswarm.swarm.config import config_from_dict

    cfg = config_from_dict({"model": "0123456789abcdef", "data_dir": str(tmp_path)}, tmp_path)
    assert (cfg.model_source, cfg.model_fingerprint, cfg.model) == ("swarm", "0123456789abcdef", None)
    assert cfg.model_cache == tmp_path / "models" / "0123456789abcdef"
    for bad in [{"model_source": "swarm"}, {"model_fingerprint": "xyz"},
                {"model_source": "swarm", "model_fingerprint": "0123456789abcdef", "model": str(tmp_path)}]:
        with pytest.raises(UserError):
            config_from_dict(bad, tmp_path)
