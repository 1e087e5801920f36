"""Only admitted peers join: certificates, refused strangers, signed layouts that cannot be altered."""

from __future__ import annotations

import time

import pytest
import trio

from conftest import run_cli
from hexswarm.errors import ProtocolError, UserError
from hexswarm.net import codec
from hexswarm.net.admission import Admission, issue_certificate, verify_certificate
from hexswarm.net.identity import generate, load_or_create
from hexswarm.net.client import ask
from hexswarm.net.protocols import LAYOUT, PING
from hexswarm.net.signed import seal
from hexswarm.launcher import LocalSwarm, NodeProcess, peer_id_of, write_node_config
from hexswarm.serve.layout import StageAssignment, SwarmLayout
from hexswarm.serve.serving import LAYOUT_DOMAIN, read_layout_message
from hexswarm.api.status_client import fetch_status
from hexswarm.api.client import submit_to


def test_certificates_bind_owner_swarm_peer_role_and_time():
    owner, other_owner, peer = generate(), generate(), generate().peer_id.to_base58()
    o = owner.peer_id.to_base58()
    cert = issue_certificate(owner, "s", peer)
    assert verify_certificate(cert, o, "s", peer)["role"] == "node"
    for bad in (
        lambda: verify_certificate(cert, other_owner.peer_id.to_base58(), "s", peer),
        lambda: verify_certificate(cert, o, "other-swarm", peer),
        lambda: verify_certificate(cert, o, "s", generate().peer_id.to_base58()),
        lambda: verify_certificate(issue_certificate(owner, "s", peer, "client"), o, "s", peer, ("node",)),
        lambda: verify_certificate(issue_certificate(owner, "s", peer, valid_days=-1), o, "s", peer),
        lambda: verify_certificate(issue_certificate(other_owner, "s", peer), o, "s", peer),
        lambda: verify_certificate({**cert, "body": cert["body"][:-1] + b"x"}, o, "s", peer),
        lambda: verify_certificate("junk", o, "s", peer),
    ):
        with pytest.raises(ProtocolError):
            bad()
    adm = Admission(o, "s", "me")
    assert adm.is_admitted("me") and not adm.is_admitted(peer)
    adm.admit(peer, cert)
    assert adm.is_admitted(peer)


def _layout(head: str) -> SwarmLayout:
    return SwarmLayout(3, head, "m1", (head,), ((StageAssignment(head, 1, 0, 4),),))


def test_a_tampered_or_forged_layout_is_rejected():
    head = generate()
    hid = head.peer_id.to_base58()
    msg = seal({"type": "commit", "layout": _layout(hid).to_wire()}, head, LAYOUT_DOMAIN)
    assert read_layout_message(msg, 4, "m1")[1].epoch == 3
    # change the epoch inside the signed body
    tampered = dict(msg)
    body = codec.decode(msg["body"])
    body["layout"]["epoch"] = 99
    tampered["body"] = codec.encode(body)
    with pytest.raises(ProtocolError):
        read_layout_message(tampered, 4, "m1")
    # signed by someone who is not the layout's head
    forger = generate()
    with pytest.raises(ProtocolError):
        read_layout_message(seal({"type": "commit", "layout": _layout(hid).to_wire()}, forger, LAYOUT_DOMAIN), 4, "m1")
    # a layout that does not cover the model, or for another model
    with pytest.raises(ProtocolError):
        read_layout_message(msg, 6, "m1")
    with pytest.raises(ProtocolError):
        read_layout_message(msg, 4, "other-model")


def test_stranger_cannot_join_submit_or_inject_gossip(tiny_model, tmp_path):
    owner_key = tmp_path / "owner.key"
    owner = load_or_create(owner_key)
    owner_id = owner.peer_id.to_base58()

    def certify(name: str, role: str = "node", by=owner) -> dict:
        cfg = write_node_config(tmp_path / "certs", name)
        peer = peer_id_of(cfg)
        path = tmp_path / f"{name}.cert"
        path.write_bytes(codec.encode(issue_certificate(by, "local", peer, role)))
        return {"path": path, "peer": peer, "key": cfg.parent / "node.key"}

    sw = LocalSwarm(tmp_path / "swarm", tiny_model, [2, 1, 1],
                    serve_layout={"hetero_config": [2, 1], "pp_partition": [2, 2]},
                    # pipeline frames over libp2p streams here (the other swarm tests use the direct path)
                    extra={"swarm_owner": owner_id, "require_client_cert": True, "dispatch_wait_s": 5.0,
                           "direct_data_path": False})
    # each member gets its own certificate, issued for its own key
    for node in sw.nodes:
        cert = tmp_path / f"{node.peer_id}.cert"
        cert.write_bytes(codec.encode(issue_certificate(owner, "local", node.peer_id)))
        text = node.config.read_text() + f"admission_cert: {cert}\n"
        node.config.write_text(text)
    # the stranger: same swarm name, a certificate from a different "owner" it made itself
    fake_owner = generate()
    stranger_cfg = write_node_config(tmp_path / "stranger", "s", swarm="local", model=str(tiny_model),
                                     roles=["head", "worker"], swarm_owner=fake_owner.peer_id.to_base58())
    stranger_peer = peer_id_of(stranger_cfg)
    fake_cert = tmp_path / "fake.cert"
    fake_cert.write_bytes(codec.encode(issue_certificate(fake_owner, "local", stranger_peer)))
    stranger_cfg.write_text(stranger_cfg.read_text() + f"admission_cert: {fake_cert}\n")
    # the test reads the members' status as a client with a certificate (strangers are refused)
    client = certify("client", "client")
    client_id, client_cert = load_or_create(client["key"]), codec.decode(client["path"].read_bytes())
    sw.client = (client_id, client_cert)
    sw.start()
    stranger = NodeProcess(stranger_cfg)
    try:
        before = sw.wait_layout(90)
        stranger.start([sw.nodes[0].addr, sw.nodes[1].addr]).wait_listening()
        time.sleep(6)  # many heartbeats: the stranger gossips records, proposals and commits all along
        for node in sw.nodes:
            st = sw.status(node)
            assert stranger_peer not in st["view"]
            # the head rotates among the members each term (term_s of wall clock), never to the stranger
            assert st["layout"]["epoch"] == before["layout"]["epoch"]
            assert st["head"] in {n.peer_id for n in sw.nodes}, st["head"]
        # status and peers answer only certificate holders (issue 13 finding 4)
        peers = run_cli("peers", "--peer", sw.nodes[0].addr, "--json")
        assert peers.returncode != 0 and "forbidden" in peers.stderr
        peers = run_cli("peers", "--peer", sw.nodes[0].addr, "--json", "--key", str(client["key"]),
                        "--cert", str(client["path"]))
        assert stranger_peer not in peers.stdout and peers.returncode == 0, peers.stderr
        with pytest.raises(UserError, match="forbidden"):
            trio.run(fetch_status, sw.nodes[0].addr, 5.0)
        # the stranger's own view: it learned nobody, since nobody answers it
        rogue = certify("rogue", "client", by=fake_owner)
        rogue_id, rogue_cert = load_or_create(rogue["key"]), codec.decode(rogue["path"].read_bytes())
        assert trio.run(fetch_status, stranger.addr, 5.0, rogue_id, rogue_cert)["view"] == [stranger_peer]
        # a client without a certificate is refused; with one it is served
        refused = trio.run(submit_to, sw.nodes[1].addr, {"prompt": "hi", "max_new_tokens": 3})
        assert refused.get("error", {}).get("code") == "forbidden", refused
        ok = trio.run(submit_to, sw.nodes[1].addr, {"prompt": "hi", "max_new_tokens": 3}, None, 60,
                      client_id, client_cert)
        assert "done" in ok, ok
        # ...but its client certificate opens no node protocol (issue 13 finding 1)
        for protocol, msg in ((PING, {"pad": b""}), (LAYOUT, {"ready": before["layout"]["epoch"] + 1})):
            with pytest.raises(UserError, match="forbidden"):
                trio.run(ask, sw.nodes[1].addr, protocol, msg, 5.0, client_id)
        # a client certificate from the wrong owner is refused too
        bad = trio.run(submit_to, sw.nodes[1].addr, {"prompt": "hi", "max_new_tokens": 3}, None, 60,
                       rogue_id, rogue_cert)
        assert bad.get("error", {}).get("code") == "forbidden", bad
    finally:
        stranger.kill()
        sw.stop()


def test_node_without_valid_certificate_refuses_to_start(tiny_model, tmp_path):
    owner = generate()
    cfg = write_node_config(tmp_path, "n", swarm="local", swarm_owner=owner.peer_id.to_base58())
    p = run_cli("node", "--config", str(cfg), "--listen", "/ip4/127.0.0.1/tcp/0", timeout=60)
    assert p.returncode == 2 and "admission_cert" in p.stderr and "Traceback" not in p.stderr
