#!/usr/bin/env python
"""The cost of one pipeline hop over libp2p, against a raw TCP socket, in one run.

Two processes on one machine (loopback).  The client sends an activation
message, the same length-prefixed hexswarm codec frame on both transports
({"x": bf16 tensor, "slots", "start"}), over one long-lived connection (libp2p:
one stream of our host, TCP + noise + yamux, from hexswarm.net.host; raw: a TCP
socket with TCP_NODELAY), and the server answers:

* decode activations (batch 1 and 32, hidden 4096): the server echoes the
  message; one hop = round trip / 2 (median of --iters);
* a prefill activation (512 x 4096): the server answers a small ack; one hop =
  the round trip (the ack is tiny), and throughput = message bytes / that time.

Both sides encode and decode with hexswarm.net.codec, so the ratio isolates the
transport.  This is a loopback measurement (no GPU involved, no NIC): it
measures per-message software cost, which is what libp2p adds.

    python tools/bench_hop.py --json hop.json
    python tools/bench_hop.py --quick          # the CPU test's sizes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PROTO = "/hexswarm/bench-hop/1"
KINDS = ("tcp", "libp2p", "libp2p-plain", "direct")
HIDDEN = 4096


def _message(rows: int, hidden: int, echo: bool):
    import torch

    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, hidden, generator=g).to(torch.bfloat16)
    return {"x": x, "slots": list(range(min(rows, 32))), "start": [0] * min(rows, 32), "echo": echo}


def _reply(msg):
    return msg if msg.get("echo") else {"ok": 1}


# ---- raw TCP ---------------------------------------------------------------------------

def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("closed")
        got += k
    return bytes(buf)


def _tcp_read_frame(sock):
    from hexswarm.net import codec

    n = codec.frame_length(_recv_exactly(sock, codec.FRAME_HEADER.size))
    return codec.decode(_recv_exactly(sock, n), tensors=True)


def serve_tcp() -> None:
    from hexswarm.net import codec

    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    print(f"ADDR {srv.getsockname()[1]}", flush=True)
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            conn.sendall(codec.frame(_reply(_tcp_read_frame(conn))))
    except ConnectionError:
        pass


def client_tcp(port: int, cases: list[dict]) -> dict:
    from hexswarm.net import codec

    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = {}
    for case in cases:
        msg = case["msg"]
        times = []
        for i in range(case["warmup"] + case["iters"]):
            t = time.perf_counter()
            sock.sendall(codec.frame(msg))
            _tcp_read_frame(sock)
            if i >= case["warmup"]:
                times.append(time.perf_counter() - t)
        out[case["name"]] = times
    sock.close()
    return out


# ---- libp2p ----------------------------------------------------------------------------

def _host(kind: str):
    """kind libp2p: hexswarm's host (TCP + noise + yamux).  kind libp2p-plain: a diagnostic
    host built here from py-libp2p directly, identical but with the plaintext security
    transport instead of noise (never used by hexswarm): it splits encryption from the rest."""
    from hexswarm.net import identity
    from hexswarm.net.host import _no_auto_connect, make_host

    ident = identity.generate()
    if kind == "libp2p":
        return make_host(ident)
    from libp2p import new_host
    from libp2p.custom_types import TProtocol
    from libp2p.network.config import ConnectionConfig
    from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
    from libp2p.stream_muxer.yamux.yamux import Yamux

    kp = ident.libp2p_key_pair()
    host = new_host(key_pair=kp, sec_opt={TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(kp)},
                    muxer_opt={TProtocol(YAMUX_ID): Yamux}, enable_mDNS=False, enable_upnp=False,
                    connection_config=ConnectionConfig(min_connections=0, low_watermark=0))
    host.get_network().auto_connector.maybe_connect = _no_auto_connect
    return host


def serve_libp2p(kind: str = "libp2p") -> None:
    import multiaddr
    import trio
    from libp2p.custom_types import TProtocol

    from hexswarm.net.framing import StreamClosed, read_frame, write_frame
    from hexswarm.net.host import advertised_addrs

    async def main():
        host = _host(kind)

        async def handler(stream):
            try:
                while True:
                    msg = await read_frame(stream, timeout=120, tensors=True)
                    await write_frame(stream, _reply(msg), timeout=120)
            except StreamClosed:
                pass
            finally:
                try:
                    await stream.close()
                except Exception:
                    pass

        async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            host.set_stream_handler(TProtocol(PROTO), handler)
            print(f"ADDR {advertised_addrs(host)[0]}", flush=True)
            await trio.sleep_forever()

    trio.run(main)


def client_libp2p(addr: str, cases: list[dict], kind: str = "libp2p") -> dict:
    import multiaddr
    import trio
    from libp2p.custom_types import TProtocol

    from hexswarm.net import codec
    from hexswarm.net.framing import read_frame, write_frame
    from hexswarm.net.host import dial, parse_peer_multiaddr

    out = {}

    async def main():
        host = _host(kind)
        info = parse_peer_multiaddr(addr)
        async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            await dial(host, info, timeout=20)
            stream = await host.new_stream(info.peer_id, [TProtocol(PROTO)])
            for case in cases:
                msg = case["msg"]
                times = []
                for i in range(case["warmup"] + case["iters"]):
                    t = time.perf_counter()
                    await write_frame(stream, msg, timeout=120)
                    await read_frame(stream, timeout=120, max_size=codec.DEFAULT_MAX_FRAME, tensors=True)
                    if i >= case["warmup"]:
                        times.append(time.perf_counter() - t)
                out[case["name"]] = times
            await stream.close()

    trio.run(main)
    return out


# ---- hexswarm's direct data path (net/direct.py): AES-256-GCM frames over TCP ------------
# In the swarm the keys come over an authenticated libp2p request and each connection carries one
# direction; here each side sends its own key first (a benchmark, not a handshake) and the echo uses
# a second key for the way back, so the per-message cost is exactly the data path's.

def serve_direct() -> None:
    import trio

    from hexswarm.net.direct import DirectOpener, DirectSender, read_exactly

    async def handler(stream):
        keys = await read_exactly(stream, 64)
        opener = DirectOpener(keys[:32], 1 << 30, 120)
        sender = DirectSender(stream, keys[32:])
        try:
            while True:
                await sender.send(_reply(await opener.read(stream)), 1 << 30)
        except Exception:
            pass

    async def main():
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        print(f"ADDR {listeners[0].socket.getsockname()[1]}", flush=True)
        await trio.serve_listeners(handler, listeners)

    trio.run(main)


def client_direct(port: int, cases: list[dict]) -> dict:
    import trio

    from hexswarm.net.direct import DirectOpener, DirectSender

    out = {}

    async def main():
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        k_out, k_back = os.urandom(32), os.urandom(32)
        await stream.send_all(k_out + k_back)
        sender, opener = DirectSender(stream, k_out), DirectOpener(k_back, 1 << 30, 120)
        for case in cases:
            times = []
            for i in range(case["warmup"] + case["iters"]):
                t = time.perf_counter()
                await sender.send(case["msg"], 1 << 30)
                await opener.read(stream)
                if i >= case["warmup"]:
                    times.append(time.perf_counter() - t)
            out[case["name"]] = times
        await stream.aclose()

    trio.run(main)
    return out


# ---- the run ---------------------------------------------------------------------------

def _start_server(kind: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", kind],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith("ADDR "):
            return proc, line.split(None, 1)[1].strip()
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"{kind} server did not start: {proc.stderr.read()[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def cases(quick: bool) -> list[dict]:
    dec_iters, pre_iters = (20, 3) if quick else (300, 30)
    return [
        {"name": "decode b=1", "msg": _message(1, HIDDEN, True), "warmup": 5 if quick else 30, "iters": dec_iters, "echo": True},
        {"name": "decode b=32", "msg": _message(32, HIDDEN, True), "warmup": 5 if quick else 30, "iters": dec_iters, "echo": True},
        {"name": "prefill 512", "msg": _message(512, HIDDEN, False), "warmup": 1 if quick else 3, "iters": pre_iters, "echo": False},
    ]


def run(quick: bool) -> dict:
    from hexswarm.net import codec

    cs = cases(quick)
    res: dict = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        "rows": {},
    }
    try:
        import libp2p  # noqa: F401
        from importlib.metadata import version

        res["libp2p"] = version("libp2p")
    except Exception:
        res["libp2p"] = "?"
    raw: dict[str, dict] = {}
    for kind in KINDS:
        proc, addr = _start_server(kind)
        try:
            if kind == "tcp":
                raw[kind] = client_tcp(int(addr), cs)
            elif kind == "direct":
                raw[kind] = client_direct(int(addr), cs)
            else:
                raw[kind] = client_libp2p(addr, cs, kind)
        finally:
            _stop(proc)
    for case in cs:
        nbytes = len(codec.frame(case["msg"]))
        row = {"frame_bytes": nbytes, "iters": case["iters"]}
        for kind in KINDS:
            rt = statistics.median(raw[kind][case["name"]])
            hop = rt / 2 if case["echo"] else rt
            row[f"{kind}_hop_ms"] = hop * 1e3
            row[f"{kind}_p90_ms"] = sorted(raw[kind][case["name"]])[int(0.9 * (len(raw[kind][case["name"]]) - 1))] \
                * (0.5 if case["echo"] else 1) * 1e3
            row[f"{kind}_MBps"] = nbytes / hop / 1e6
        row["ratio"] = row["libp2p_hop_ms"] / row["tcp_hop_ms"]
        row["plain_ratio"] = row["libp2p-plain_hop_ms"] / row["tcp_hop_ms"]
        row["direct_ratio"] = row["direct_hop_ms"] / row["tcp_hop_ms"]
        res["rows"][case["name"]] = row
    res["table"] = table(res)
    return res


def table(res: dict) -> str:
    lines = ["| message | frame bytes | raw TCP ms/hop (p90) | libp2p ms/hop (p90) | libp2p / TCP | "
             "libp2p no-noise ms/hop (diagnostic) | no-noise / TCP | hexswarm direct path ms/hop (p90) | direct / TCP | "
             "raw TCP MB/s | libp2p MB/s | direct MB/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["rows"].items():
        lines.append(f"| {name} | {r['frame_bytes']} | {r['tcp_hop_ms']:.3f} ({r['tcp_p90_ms']:.3f}) | "
                     f"{r['libp2p_hop_ms']:.3f} ({r['libp2p_p90_ms']:.3f}) | {r['ratio']:.2f} | "
                     f"{r['libp2p-plain_hop_ms']:.3f} | {r['plain_ratio']:.2f} | "
                     f"{r['direct_hop_ms']:.3f} ({r['direct_p90_ms']:.3f}) | {r['direct_ratio']:.2f} | "
                     f"{r['tcp_MBps']:.0f} | {r['libp2p_MBps']:.0f} | {r['direct_MBps']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", choices=list(KINDS), help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="few iterations (the CPU test)")
    ap.add_argument("--json", help="write every number here")
    args = ap.parse_args(argv)
    if args.serve == "tcp":
        serve_tcp()
        return {}
    if args.serve == "direct":
        serve_direct()
        return {}
    if args.serve:
        serve_libp2p(args.serve)
        return {}
    res = run(args.quick)
    print(f"{res['date']}; {res['machine']}; python {res['python']}, libp2p {res['libp2p']}")
    print(res["table"])
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
