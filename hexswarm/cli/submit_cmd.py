"""`hexswarm submit` (send a prompt to any node) and `hexswarm status` (a node's view of the layout)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from typing import List, Optional

import typer

from hexswarm.errors import UserError


def submit(
    peer: List[str] = typer.Option(..., "--peer", help="a node's multiaddr /ip4/.../tcp/.../p2p/<PeerID>; "
                                   "several: the next is used if one fails mid-request"),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", help="a prompt (repeatable)"),
    prompts_file: Optional[str] = typer.Option(None, "--prompts-file",
                                               help="more prompts, one per line ('-': stdin); blank lines skipped"),
    concurrency: int = typer.Option(8, "--concurrency", help="with several prompts: how many are in flight at once"),
    chat: bool = typer.Option(False, "--chat", help="the prompt is a user message: apply the chat template of --model"),
    model: Optional[str] = typer.Option(None, "--model", help="with --chat: the checkpoint (folder or .gguf) "
                                        "whose chat template to apply (the one the swarm serves)"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy"),
    top_k: int = typer.Option(0, "--top-k"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(0, "--seed"),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="stop string (repeatable)"),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="generate past end-of-sequence tokens, exactly "
                                    "--max-new-tokens (benchmarks)"),
    request_id: Optional[str] = typer.Option(None, "--request-id", help="idempotency key (default: random; "
                                             "with several prompts, ID-0, ID-1, ...)"),
    stream: bool = typer.Option(False, "--stream", help="print tokens as they arrive (one prompt only)"),
    as_json: bool = typer.Option(False, "--json", help="print each result as one JSON object (a line each)"),
    timeout: float = typer.Option(600.0, "--timeout", help="seconds to wait for the whole answer"),
    key: Optional[str] = typer.Option(None, "--key", help="submitter key file (with --cert)"),
    cert: Optional[str] = typer.Option(None, "--cert", help="client certificate from `hexswarm admit --client`"),
) -> None:
    """Send prompts to the swarm through any node; tokens come back from the serving pipeline.

    All prompts go over one client connection.  Several prompts are sent concurrently (up to --concurrency):
    the swarm batches the decode steps of requests in flight, so they finish far sooner together than one
    after another; results are printed in the order of the prompts."""
    import trio

    from hexswarm.net.submit_request import SubmitRequest

    prompts = list(prompt or []) + _read_prompts(prompts_file)
    if not prompts:
        raise UserError("give a prompt: --prompt TEXT (repeatable) or --prompts-file FILE")
    if stream and len(prompts) > 1:
        raise UserError("--stream prints one answer as it comes: give one prompt")
    if concurrency < 1:
        raise UserError(f"--concurrency must be >= 1, got {concurrency}")
    base = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
            "seed": seed, "stop": list(stop or []), "ignore_eos": ignore_eos, "stream": stream and not as_json,
            "timeout_s": timeout}
    maps = [{"prompt": p, **base} for p in prompts]
    if request_id:
        for i, msg in enumerate(maps):
            msg["request_id"] = request_id if len(maps) == 1 else f"{request_id}-{i}"
    # the entry's own checks, with its messages, before anything is sent
    checked = [SubmitRequest.from_map(msg) for msg in maps]
    if chat:
        checked = [replace(req, prompt=_chat_prompt(model, req.prompt)) for req in checked]
    requests = [req.to_map() for req in checked]
    identity, certificate = client_credentials(key, cert)
    run = _Run(list(peer), requests, concurrency, timeout, identity, certificate)
    if base["stream"]:
        finals = trio.run(run.all)
    else:  # a spinner on stderr while waiting (stdout stays clean for --json and pipes)
        from rich.console import Console

        with Console(stderr=True).status("waiting for the swarm to accept the request") as run.spinner:
            finals = trio.run(run.all)
    failed = 0
    for final in finals:
        if "error" in final:
            err = final["error"]
            failed += 1
            if len(finals) == 1:
                raise UserError(f"{err.get('code')}: {err.get('message')}")
            typer.echo(f"error: {err.get('code')}: {err.get('message')}", err=True)
            continue
        done = final["done"]
        if as_json:
            print(json.dumps(done))
        elif base["stream"]:
            sys.stdout.write(run.stream_tail(done) + "\n")
        else:
            print(done["text"])
        if not as_json:
            typer.echo(f"[{len(done['tokens'])} tokens, finish={done['finish_reason']}, request {done['request_id']}, "
                       f"epoch {done['epoch']} replica {done['replica']}, TP {done['layout']['hetero_config']} / "
                       f"layers {done['layout']['pp_partition']}]", err=True)
    if failed:
        raise UserError(f"{failed} of {len(finals)} requests failed")


def _read_prompts(path: str | None) -> list[str]:
    if path is None:
        return []
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except OSError as e:
        raise UserError(f"cannot read --prompts-file {path}: {e.strerror}") from None
    return [line for line in text.splitlines() if line.strip()]


class _Run:
    """The requests of one `hexswarm submit`, over one SwarmClient (one connection per entry node)."""

    def __init__(self, peers, requests, concurrency, timeout, identity, cert):
        self.peers, self.requests, self.concurrency, self.timeout = peers, requests, concurrency, timeout
        self.identity, self.cert = identity, cert
        self.spinner = None
        self.streamed = ""  # text printed so far (--stream)
        self.finished = 0

    def on_frame(self, frame: dict) -> None:
        if "token" in frame and self.requests[0]["stream"]:
            sys.stdout.write(frame["text"])
            sys.stdout.flush()
            self.streamed += frame["text"]
        elif "accepted" in frame and self.spinner is not None and len(self.requests) == 1:
            acc = frame["accepted"]
            self.spinner.update(f"generating up to {self.requests[0]['max_new_tokens']} tokens on epoch "
                                f"{acc.get('epoch')} replica {acc.get('replica')} ({len(acc.get('stages') or [])} stages)")

    def stream_tail(self, done: dict) -> str:
        """The end of the output that streamed frames held back (an incomplete character at the very end)."""
        text = done.get("text", "")
        return text[len(self.streamed):] if text.startswith(self.streamed) else ""

    async def all(self) -> list[dict]:
        import trio

        from hexswarm.api.client import SwarmClient

        finals: list[dict] = [{}] * len(self.requests)
        limiter = trio.CapacityLimiter(self.concurrency)

        async def one(client, i: int) -> None:
            async with limiter:
                finals[i] = await client.submit(self.requests[i], self.on_frame, self.timeout)
            self.finished += 1
            if self.spinner is not None and len(self.requests) > 1:
                self.spinner.update(f"{self.finished} of {len(self.requests)} requests done")

        async with SwarmClient(self.peers, identity=self.identity, cert=self.cert, timeout=self.timeout) as client:
            async with trio.open_nursery() as nursery:
                for i in range(len(self.requests)):
                    nursery.start_soon(one, client, i)
        return finals


def _chat_prompt(model: str | None, question: str) -> str:
    """The question as one user turn, rendered with the model's chat template."""
    if model is None:
        raise UserError("--chat needs --model (the checkpoint whose chat template to apply)")
    from hexswarm.runtime.chat import ChatTemplate

    return ChatTemplate.for_model(model).render([{"role": "user", "content": question}])


def client_credentials(key: str | None, cert: str | None):
    """(identity, certificate) for a swarm that requires client certificates; (None, None) otherwise."""
    if (key is None) != (cert is None):
        raise UserError("--key and --cert go together")
    if key is None:
        return None, None
    from pathlib import Path

    from hexswarm.net import codec
    from hexswarm.net.identity import load_or_create

    try:
        certificate = codec.decode(Path(cert).read_bytes(), 8192)
    except OSError as e:
        raise UserError(f"cannot read --cert {cert}: {e.strerror}") from None
    except Exception as e:
        raise UserError(f"--cert {cert} is not a certificate: {e}") from None
    return load_or_create(Path(key)), certificate


def status(
    peer: str = typer.Option(..., "--peer", help="a node's multiaddr"),
    as_json: bool = typer.Option(False, "--json"),
    key: Optional[str] = typer.Option(None, "--key", help="client key file (with --cert; a swarm with an owner)"),
    cert: Optional[str] = typer.Option(None, "--cert", help="client certificate from `hexswarm admit --client`"),
) -> None:
    """Show a node's view of the head and the committed layout."""
    import trio

    from hexswarm.api.status_client import fetch_status

    st = trio.run(fetch_status, peer, 10.0, *client_credentials(key, cert))
    if as_json:
        print(json.dumps(st))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    layout = st.get("layout")
    console.print(f"node {st['peer']}  head {st['head']}  term {st['term']}  "
                  f"epoch {layout['epoch'] if layout else '-'}  serving peers {len(st['view'])}")
    if not layout:
        console.print("no committed layout yet")
        return
    table = Table("replica", "stage", "peer", "TP", "layers")
    for ri, r in enumerate(layout["replicas"]):
        for si, s in enumerate(r):
            table.add_row(str(ri), str(si), s["peer"], str(s["tp"]), f"{s['layers'][0]}-{s['layers'][1] - 1}")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("submit")(submit)
    app.command("status")(status)
