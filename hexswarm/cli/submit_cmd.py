"""`hexswarm submit` (send a prompt to any node) and `hexswarm status` (a node's view of the layout)."""

from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer

from hexswarm.errors import UserError


def submit(
    peer: List[str] = typer.Option(..., "--peer", help="a node's multiaddr /ip4/.../tcp/.../p2p/<PeerID>; "
                                   "several: the next is used if one fails mid-request"),
    prompt: str = typer.Option(..., "--prompt"),
    chat: bool = typer.Option(False, "--chat", help="the prompt is a user message: apply the chat template of --model"),
    model: Optional[str] = typer.Option(None, "--model", help="with --chat: the checkpoint (folder or .gguf) "
                                        "whose chat template to apply (the one the swarm serves)"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy"),
    top_k: int = typer.Option(0, "--top-k"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(0, "--seed"),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="stop string (repeatable)"),
    request_id: Optional[str] = typer.Option(None, "--request-id", help="idempotency key (default: random)"),
    stream: bool = typer.Option(False, "--stream", help="print tokens as they arrive"),
    as_json: bool = typer.Option(False, "--json", help="print the result as one JSON object"),
    timeout: float = typer.Option(600.0, "--timeout", help="seconds to wait for the whole answer"),
    key: Optional[str] = typer.Option(None, "--key", help="submitter key file (with --cert)"),
    cert: Optional[str] = typer.Option(None, "--cert", help="client certificate from `hexswarm admit --client`"),
) -> None:
    """Send a prompt to the swarm through any node; tokens come back from the serving pipeline."""
    import trio

    from hexswarm.runtime.sampling import SamplingParams
    from hexswarm.swarm.submit import submit_with_failover

    SamplingParams(temperature, top_k, top_p, seed).validate()
    if chat:
        prompt = _chat_prompt(model, prompt)
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    request = {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
               "top_p": top_p, "seed": seed, "stop": list(stop or []), "stream": stream and not as_json}
    if request_id:
        request["request_id"] = request_id

    spinner = None

    def on_frame(frame: dict) -> None:
        if "token" in frame and request["stream"]:
            sys.stdout.write(frame["text"])
            sys.stdout.flush()
        elif "accepted" in frame and spinner is not None:
            acc = frame["accepted"]
            spinner.update(f"generating up to {max_new_tokens} tokens on epoch {acc.get('epoch')} replica "
                           f"{acc.get('replica')} ({len(acc.get('stages') or [])} stages)")

    identity, certificate = _client_credentials(key, cert)
    if request["stream"]:
        final = trio.run(submit_with_failover, list(peer), request, on_frame, timeout, identity, certificate)
    else:  # a spinner on stderr while waiting (stdout stays clean for --json and pipes)
        from rich.console import Console

        with Console(stderr=True).status("waiting for the swarm to accept the request") as spinner:
            final = trio.run(submit_with_failover, list(peer), request, on_frame, timeout, identity, certificate)
    if "error" in final:
        err = final["error"]
        raise UserError(f"{err.get('code')}: {err.get('message')}")
    done = final["done"]
    if as_json:
        print(json.dumps(done))
    elif request["stream"]:
        sys.stdout.write("\n")
    else:
        print(done["text"])
    if not as_json:
        typer.echo(f"[{len(done['tokens'])} tokens, finish={done['finish_reason']}, request {done['request_id']}, "
                   f"epoch {done['epoch']} replica {done['replica']}, TP {done['layout']['hetero_config']} / "
                   f"layers {done['layout']['pp_partition']}]", err=True)


def _chat_prompt(model: str | None, question: str) -> str:
    """The question as one user turn, rendered with the model's chat template."""
    if model is None:
        raise UserError("--chat needs --model (the checkpoint whose chat template to apply)")
    from hexswarm.runtime.chat import ChatTemplate

    return ChatTemplate.for_model(model).render([{"role": "user", "content": question}])


def _client_credentials(key: str | None, cert: str | None):
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
) -> None:
    """Show a node's view of the head and the committed layout."""
    import trio

    from hexswarm.swarm.status_client import fetch_status

    st = trio.run(fetch_status, peer)
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
