"""`hexswarm generate`: one prompt through the served engine on one host (HexGen's llama_inference.py)."""

from __future__ import annotations

import json
import logging
import os
from typing import List, Optional

import typer


def generate(
    model: str = typer.Option(..., "--model", help="HF Llama checkpoint directory, or a .gguf file"),
    prompt: str = typer.Option(..., "--prompt", help="prompt text"),
    hetero_config: Optional[List[int]] = typer.Option(
        None, "--hetero-config", help="TP degree of each pipeline stage, e.g. --hetero-config 1 2 1"
    ),
    pp_partition: Optional[List[int]] = typer.Option(
        None, "--pp-partition", help="layers of each stage, e.g. --pp-partition 8 16 8"
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="tokens to generate at most"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy"),
    top_k: int = typer.Option(0, "--top-k", help="0 = off"),
    top_p: float = typer.Option(1.0, "--top-p", help="1.0 = off"),
    seed: int = typer.Option(0, "--seed"),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="stop string (repeatable)"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: float32 on cpu, bfloat16 on cuda)"),
    quantize: Optional[str] = typer.Option(
        None, "--quantize", help="int8 or int4: serve the projection weights quantized; none: all dense "
        "(default: a GGUF's Q8_0/Q4 weights stay quantized on cuda)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Generate text from a prompt on one host, over an asymmetric TP x PP layout."""
    if not os.environ.get("HEXSWARM_DEBUG"):
        # a failed stage is reported as one line naming its rank; the engine's own log line would add a traceback
        logging.getLogger("hexswarm.runtime.stage_engine").addHandler(logging.NullHandler())
    from hexswarm.runtime.offline import GenerateJob
    from hexswarm.runtime.offline import generate as run
    from hexswarm.runtime.sampling import SamplingParams

    job = GenerateJob(
        model_dir=model,
        prompt=prompt,
        hetero_config=list(hetero_config or []),
        pp_partition=list(pp_partition or []),
        max_new_tokens=max_new_tokens,
        sampling=SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
        stop=list(stop or []),
        device=device,
        dtype=dtype,
        show_progress=not as_json,
        quantize=quantize,
    )
    result = run(job)
    if as_json:
        print(json.dumps(result))
        return
    print(result["text"])
    t = result["timings"]
    typer.echo(
        f"[{len(result['tokens'])} tokens, finish={result['finish_reason']}, layout TP {result['layout']['hetero_config']}"
        f" / layers {result['layout']['pp_partition']}, prefill {t['prefill_s']:.3f}s, decode {t['decode_s']:.3f}s]",
        err=True,
    )


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
