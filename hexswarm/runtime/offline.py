"""`hexswarm generate`: one host, one process per rank, HexGen-style layouts.

Ranks are stage-major (stage 0's TP group first).  The stage-0 leader drives
generation; stage leaders pass activations to the next leader; the last
stage's leader samples and sends the token straight back to stage 0 (no
broadcast to every rank).  The parent process watches the ranks: a rank that
fails or dies ends the run with an error naming it.
"""

from __future__ import annotations

import os
import queue as queue_mod
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from hexswarm.errors import UserError
from hexswarm.model.config import LlamaConfig
from hexswarm.model.quant_format import check_mode
from hexswarm.model.source import open_checkpoint
from hexswarm.model.stage import DTYPES, load_stage
from hexswarm.net.ports import free_port
from hexswarm.runtime.cpus import usable_cpus
from hexswarm.runtime.executor import StageExecutor, TensorParallelGroup, normalize_forward
from hexswarm.runtime.layout import Layout
from hexswarm.runtime.sampling import SamplingParams, sample_token
from hexswarm.runtime.stopping import StopChecker
from hexswarm.runtime.tokenizer import TextTokenizer

FAULT_ENV = "HEXSWARM_TEST_CRASH_RANK"  # test hook: that rank exits abruptly after loading


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
    layout: Layout
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
    layout = Layout.build(cfg, job.hetero_config, job.pp_partition)
    open_checkpoint(job.model_dir)  # files present and headers readable
    check_mode(job.quantize)
    tok = TextTokenizer(job.model_dir, cfg)
    job.sampling.validate()
    if job.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {job.max_new_tokens}")
    device = resolve_device(job.device)
    dtype = resolve_dtype(job.dtype, device)
    ids = tok.encode(job.prompt)
    if not ids:
        raise UserError("the prompt encodes to no tokens")
    ctx = cfg.max_position_embeddings
    if len(ids) >= ctx:
        raise UserError(f"the prompt has {len(ids)} tokens; the model's context is {ctx}")
    return _Prepared(job, layout, ids, min(job.max_new_tokens, ctx - len(ids)), dtype)


# ---- the ranks -------------------------------------------------------------------------

def _sample_spec(job: GenerateJob, step: int) -> dict:
    return {"params": job.sampling.to_dict(), "step": step, "logits": job.return_logits and step == 0}


def _sample(logits: torch.Tensor, spec: dict) -> dict:
    token = sample_token(logits[0], SamplingParams.from_dict(spec["params"]), spec["step"])
    reply = {"token": token}
    if spec.get("logits"):
        reply["logits"] = logits[0].float().cpu()
    return reply


class _Pipeline:
    """The stage-0 leader's view of the pipeline: one call per generation step."""

    def __init__(self, executor: StageExecutor, layout: Layout):
        self.ex = executor
        self.stages = layout.stages

    def step(self, op: dict, sample: dict) -> dict:
        from hexswarm.runtime.transport import recv_obj, send_obj

        out = self.ex.lead(op)
        if len(self.stages) == 1:
            return _sample(out, sample)
        rows, _, _ = normalize_forward(op)
        send_obj({"op": "forward", "rows": rows, "x": out.cpu(), "sample": sample}, self.stages[1].first_rank)
        return recv_obj(self.stages[-1].first_rank)

    def stop(self) -> None:
        from hexswarm.runtime.transport import send_obj

        self.ex.lead({"op": "stop"})
        if len(self.stages) > 1:
            send_obj({"op": "stop"}, self.stages[1].first_rank)


def _drive(pipe: _Pipeline, prep: _Prepared, tok: TextTokenizer, load_s: float) -> dict:
    job = prep.job
    ids = prep.prompt_ids
    stopper = StopChecker(tok, prep.max_new_tokens, list(job.stop))
    t0 = time.perf_counter()
    reply = pipe.step({"op": "forward", "ids": [ids], "slots": [0], "start": [0]}, _sample_spec(job, 0))
    t_first = time.perf_counter()
    first_logits = reply.get("logits")
    tokens = [reply["token"]]
    while (reason := stopper.finish_reason(tokens)) is None:
        step = len(tokens)
        reply = pipe.step(
            {"op": "forward", "ids": [[tokens[-1]]], "slots": [0], "start": [len(ids) + step - 1]},
            _sample_spec(job, step),
        )
        tokens.append(reply["token"])
    t_end = time.perf_counter()
    pipe.stop()
    decode_steps = len(tokens) - 1
    result = {
        "prompt_tokens": ids,
        "tokens": tokens,
        "text": stopper.text(tokens),
        "finish_reason": reason,
        "layout": prep.layout.to_json(),
        "timings": {
            "load_s": round(load_s, 4),
            "prefill_s": round(t_first - t0, 4),
            "decode_s": round(t_end - t_first, 4),
            "decode_ms_per_token": round(1000 * (t_end - t_first) / decode_steps, 3) if decode_steps else None,
            "total_s": round(t_end - t0, 4),
        },
    }
    if first_logits is not None:
        result["logits"] = first_logits
    return result


def _serve_stage(ex: StageExecutor, layout: Layout, index: int) -> None:
    from hexswarm.runtime.transport import recv_obj, send_obj

    stages = layout.stages
    last = index == len(stages) - 1
    prev = stages[index - 1].first_rank
    while True:
        msg = recv_obj(prev)
        if msg["op"] == "stop":
            ex.lead(msg)
            if not last:
                send_obj(msg, stages[index + 1].first_rank)
            return
        sample = msg.pop("sample")
        out = ex.lead(msg)
        if last:
            send_obj(_sample(out, sample), stages[0].first_rank)
        else:
            msg["x"] = out.cpu()
            msg["sample"] = sample
            send_obj(msg, stages[index + 1].first_rank)


def _rank_device(device: str, rank: int) -> torch.device:
    if device == "cuda":
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def _run_rank(rank: int, prep: _Prepared, port: int | None) -> dict | None:
    import torch.distributed as dist

    job, layout = prep.job, prep.layout
    world = layout.world_size
    device = _rank_device(job.device, rank)
    if world > 1:
        torch.set_num_threads(max(1, usable_cpus() // world))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(minutes=30))
    try:
        # every rank creates every TP group, in the same order (torch.distributed requires it)
        groups = {st.index: dist.new_group(list(st.ranks)) for st in layout.stages if st.tp > 1} if world > 1 else {}
        stage, tp_rank = layout.stage_of_rank(rank)
        cfg = LlamaConfig.from_dir(job.model_dir)
        t0 = time.perf_counter()
        model = load_stage(open_checkpoint(job.model_dir), cfg, layout.part(cfg, stage, tp_rank),
                           DTYPES[prep.dtype], device, show_progress=job.show_progress and rank == 0,
                           quantize=job.quantize)
        load_s = time.perf_counter() - t0
        if os.environ.get(FAULT_ENV) == str(rank):
            os._exit(3)
        kv = model.new_kv_cache(1, len(prep.prompt_ids) + prep.max_new_tokens)
        tp = TensorParallelGroup(groups[stage.index], device) if stage.tp > 1 else None
        ex = StageExecutor(model, kv, tp)
        if tp_rank != 0:
            ex.follow()
            return None
        if stage.index != 0:
            _serve_stage(ex, layout, stage.index)
            return None
        return _drive(_Pipeline(ex, layout), prep, TextTokenizer(job.model_dir, cfg), load_s)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _rank_main(rank: int, prep: _Prepared, port: int, results) -> None:
    try:
        out = _run_rank(rank, prep, port)
        if out is not None:
            # plain lists: a tensor would travel as a shared-memory handle that dies with this process
            if "logits" in out:
                out["logits"] = out["logits"].tolist()
            results.put(("result", rank, out))
    except UserError as e:
        results.put(("error", rank, str(e)))
    except BaseException as e:  # report, then die: the parent stops the other ranks
        results.put(("error", rank, f"{type(e).__name__}: {e}"))
        raise SystemExit(1)


def _describe_rank(layout: Layout, rank: int) -> str:
    stage, tp_rank = layout.stage_of_rank(rank)
    return f"rank {rank} (stage {stage.index}, TP rank {tp_rank})"


def _failure_report(layout: Layout, procs, results, first_error: tuple[int, str] | None) -> str:
    """Name the rank that caused a failure.

    When one rank dies, its peers fail too (connection closed); a rank that
    died without reporting anything is the cause, else the first reporter.
    """
    time.sleep(0.5)  # let every rank's report and exit status arrive
    reports = dict([first_error]) if first_error else {}
    while True:
        try:
            kind, rank, payload = results.get_nowait()
        except queue_mod.Empty:
            break
        if kind == "error":
            reports.setdefault(rank, payload)
    silent = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in reports]
    if silent:
        code = procs[silent[0]].exitcode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return f"{_describe_rank(layout, silent[0])} {how}; the run was stopped"
    rank = first_error[0] if first_error else min(reports)
    return f"{_describe_rank(layout, rank)} failed: {reports[rank]}"


def generate(job: GenerateJob) -> dict:
    """Run one generation; returns the `generate --json` object."""
    prep = prepare(job)
    if prep.layout.world_size == 1:
        result = _run_rank(0, prep, None)
    else:
        result = _run_multiprocess(prep)
        if "logits" in result:
            result["logits"] = torch.tensor(result["logits"], dtype=torch.float32)
    result["device"] = job.device
    result["dtype"] = prep.dtype
    return result


def _run_multiprocess(prep: _Prepared) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    world = prep.layout.world_size
    procs = [ctx.Process(target=_rank_main, args=(r, prep, port, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    try:
        while True:
            try:
                kind, rank, payload = results.get(timeout=0.2)
            except queue_mod.Empty:
                if all(p.exitcode in (None, 0) for p in procs):
                    continue
                kind, rank, payload = "died", None, None
            if kind == "result":
                for p in procs:
                    p.join(timeout=30)
                return payload
            raise UserError(_failure_report(prep.layout, procs, results, (rank, payload) if kind == "error" else None))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=5)
