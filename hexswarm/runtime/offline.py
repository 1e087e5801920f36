"""`hexswarm generate`: one prompt through a HexGen-style layout on this host, on the served engine.

The layout's stages are built as a LocalPipeline: each stage leader's engine in this process,
its TP followers as child processes (gloo on CPU, NCCL on CUDA; rank r on GPU r mod the GPUs).
The prompt goes to stage 0 as a swarm's stage 0 gets it, and the tokens come back in the
entry's `done` message: sampling and stopping are the engine's.  A stage that fails ends the
run with an error naming its rank (ranks are stage-major); a follower that exited is the cause.
"""

from __future__ import annotations

import os
import queue
import time
from dataclasses import dataclass, field, replace

import torch

from hexswarm.errors import UserError
from hexswarm.model.config import LlamaConfig
from hexswarm.model.quant_format import check_mode
from hexswarm.model.source import open_checkpoint
from hexswarm.model.stage import DTYPES
from hexswarm.net.submit_request import MAX_NEW_TOKENS, FieldError
from hexswarm.runtime.layout import HeteroLayout
from hexswarm.runtime.local_pipeline import LocalPipeline, StageFailure
from hexswarm.runtime.sampling import SamplingParams
from hexswarm.runtime.stage_engine import EngineSettings
from hexswarm.runtime.tokenizer import TextTokenizer

# test hook: that rank crashes once loaded (a TP follower's process is killed; a stage leader runs in this process)
FAULT_ENV = "HEXSWARM_TEST_CRASH_RANK"
REQUEST_ID = "generate"


@dataclass
class GenerateJob:
    model_dir: str
    prompt: str
    hetero_config: list[int] = field(default_factory=list)
    pp_partition: list[int] = field(default_factory=list)
    max_new_tokens: int = 32
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    device: str = "cpu"
    dtype: str | None = None
    return_logits: bool = False
    show_progress: bool = False
    quantize: str | None = None  # None, "none", "int8", "int4" (see load_stage)


@dataclass
class _Prepared:
    job: GenerateJob
    layout: HeteroLayout
    prompt_ids: list[int]
    max_new_tokens: int
    dtype: str


def resolve_device(device: str) -> str:
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    return device


def resolve_dtype(dtype: str | None, device: str) -> str:
    if dtype is None:
        return "bfloat16" if device == "cuda" else "float32"
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def prepare(job: GenerateJob) -> _Prepared:
    """Check everything that can be checked before any rank starts."""
    cfg = LlamaConfig.from_dir(job.model_dir)
    layout = HeteroLayout.build(cfg, job.hetero_config, job.pp_partition)
    open_checkpoint(job.model_dir)  # files present and headers readable
    check_mode(job.quantize)
    tok = TextTokenizer(job.model_dir, cfg)
    try:  # a submitted request's rules, said of `hexswarm generate`'s flags
        job = replace(job, sampling=job.sampling.validate(), max_new_tokens=MAX_NEW_TOKENS.check(job.max_new_tokens))
    except FieldError as e:
        raise e.renamed("--" + e.field.replace("_", "-")) from None
    device = resolve_device(job.device)
    dtype = resolve_dtype(job.dtype, device)
    ids = tok.encode(job.prompt)
    if not ids:
        raise UserError("the prompt encodes to no tokens")
    ctx = cfg.max_position_embeddings
    if len(ids) >= ctx:
        raise UserError(f"the prompt has {len(ids)} tokens; the model's context is {ctx}")
    return _Prepared(job, layout, ids, min(job.max_new_tokens, ctx - len(ids)), dtype)


# ---- the run ----------------------------------------------------------------------------

def generate(job: GenerateJob) -> dict:
    """Run one generation; returns the `generate --json` object."""
    prep = prepare(job)
    job = prep.job  # its values as checked
    t0 = time.perf_counter()
    try:
        pipe = _open_pipeline(prep)
    except UserError:
        raise
    except Exception as e:  # a stage that cannot load (out of memory, say): one line, as a bad flag
        raise UserError(f"the stages did not load: {type(e).__name__}: {e}") from e
    load_s = time.perf_counter() - t0
    try:
        _crash_for_test(pipe, prep.layout)
        pipe.start(REQUEST_ID, prep.prompt_ids, prep.max_new_tokens, job.sampling, job.stop)
        done = _wait_done(pipe, prep.layout)
        first_logits = pipe.first_logits
    finally:
        pipe.close()
    result = _result(prep, done, load_s)
    if job.return_logits:
        result["logits"] = first_logits
    result["device"] = job.device
    result["dtype"] = prep.dtype
    return result


def _open_pipeline(prep: _Prepared) -> LocalPipeline:
    """The layout's stages as served engines, sized for this one request; the whole prompt is one
    step (one forward, as a swarm runs a prompt within its step budget), so the last stage's first
    logits are the prompt's."""
    job, stages = prep.job, prep.layout.stages
    gpus = None
    if job.device == "cuda":
        count = torch.cuda.device_count()
        gpus = [tuple(rank % count for rank in st.ranks) for st in stages]
    settings = EngineSettings(max_step_tokens=max(EngineSettings().max_step_tokens, len(prep.prompt_ids)))
    return LocalPipeline(job.model_dir, [(st.tp, st.layer_end - st.layer_start) for st in stages], max_batch=1,
                         max_seq_len=len(prep.prompt_ids) + prep.max_new_tokens, settings=settings,
                         device=job.device, dtype=prep.dtype, gpus=gpus, quantize=job.quantize,
                         show_progress=job.show_progress, keep_first_logits=job.return_logits)


def _crash_for_test(pipe: LocalPipeline, layout: HeteroLayout) -> None:
    rank = os.environ.get(FAULT_ENV)
    if rank is None:
        return
    stage, tp_rank = layout.stage_of_rank(int(rank))
    if tp_rank:
        follower = pipe.hosts[stage.index].followers[tp_rank - 1]
        follower.kill()
        follower.wait()


def _wait_done(pipe: LocalPipeline, layout: HeteroLayout) -> dict:
    """The request's `done` message; a stage that fails before it ends the run with its rank named."""
    while True:
        try:
            done = pipe.done.get(timeout=0.1)
        except queue.Empty:
            if pipe.failure() is None:
                continue
            time.sleep(0.5)  # a follower's exit, the cause of its leader's failed step, may show a moment later
            raise UserError(_failure_report(layout, pipe.failure())) from None
        if "error" in done:
            raise UserError(f"stage 0 ended the request: {done['error']}")
        return done


def _failure_report(layout: HeteroLayout, failure: StageFailure) -> str:
    rank = layout.stages[failure.stage].first_rank + failure.tp_rank
    return f"rank {rank} (stage {failure.stage}, TP rank {failure.tp_rank}) {failure.what}; the run was stopped"


def _result(prep: _Prepared, done: dict, load_s: float) -> dict:
    """The `generate --json` object from the request's `done` message: the engine times it from the
    request's admission (prefill: to its first token; decode: the rest)."""
    tokens = done["tokens"]
    ttft_s, total_s = done["timings"]["ttft_s"], done["timings"]["total_s"]
    decode_s = total_s - ttft_s
    decode_steps = len(tokens) - 1
    return {
        "prompt_tokens": done["prompt_tokens"],
        "tokens": tokens,
        "text": done["text"],
        "finish_reason": done["finish_reason"],
        "layout": prep.layout.to_json(),
        "timings": {
            "load_s": round(load_s, 4),
            "prefill_s": round(ttft_s, 4),
            "decode_s": round(decode_s, 4),
            "decode_ms_per_token": round(1000 * decode_s / decode_steps, 3) if decode_steps else None,
            "total_s": round(total_s, 4),
        },
    }
