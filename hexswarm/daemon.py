"""A node daemon that serves: the Node (membership) plus, when the config names a
model, the Server (layout, head, stages, requests)."""

from __future__ import annotations

import importlib
import logging

import trio

from hexswarm.runtime.heap import freeze_heap
from hexswarm.swarm.config import NodeConfig

# The serving layer (and torch with it) is imported only by nodes that serve a model,
# so relay-only nodes start fast.

log = logging.getLogger("hexswarm.node")


def step_tokens_for(device: str) -> int:
    """max_step_tokens: auto.  On an H100 (7B, 32 and 64 streams) 2048 gave the same c=32 and 1.2x the
    c=64 tokens/s of 512, with lower TTFT and ITL p99 (docs/BENCHMARKS.md); with steps of up to 512
    prompt tokens replayed from CUDA graphs (run 19a, H200) no budget of 160-512 beat 2048 at 32 or 64
    streams either; a CPU step of 2048 tokens would hold decode rows for seconds."""
    return 2048 if device == "cuda" else 512


def serve_settings(config: NodeConfig, devices):
    from hexswarm.serve.stages import ServeSettings

    device = config.serve_device
    if device == "auto":
        device = "cuda" if any(d.kind == "cuda" for d in devices) else "cpu"
    dtype = config.serve_dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return ServeSettings(model_dir=str(config.model), device=device, dtype=dtype, max_batch=config.max_batch,
                         max_seq_len=config.max_seq_len, max_step_tokens=config.max_step_tokens or step_tokens_for(device),
                         gather_prompts=config.gather_prompts, freeze_heap=config.freeze_heap,
                         micro_batches=config.micro_batches, gpu_memory_fraction=config.gpu_memory_fraction,
                         engine_process={"auto": None, "on": True, "off": False}[config.engine_process],
                         quantize=config.quantize, local_links=config.local_links, kv_tokens=config.kv_tokens,
                         cpu_threads=config.cpu_threads)


def head_settings(config: NodeConfig):
    from hexswarm.serve.serving import HeadSettings

    return HeadSettings(term_s=config.term_s, serve_layout=config.serve_layout, dispatch_wait_s=config.dispatch_wait_s)


async def calibrate_node(node, settings) -> None:
    """Measure the engine on this node's device and model (cached) off the trio loop; the next
    record announces it. A failure only costs the planner its analytic guess."""
    from hexswarm.model.source import model_fingerprint
    from hexswarm.swarm import calibrate

    config = node.config
    try:
        node.calibration = await trio.to_thread.run_sync(
            calibrate.cached_measure, config.data_dir, config.model, model_fingerprint(config.model),
            settings.device, settings.dtype)
    except Exception as e:  # noqa: BLE001 - any engine error: serve without a calibration
        log.warning("calibration failed (%s: %s); the planner uses its analytic model", type(e).__name__, e)


async def _weights(node):
    """With model_source: swarm, the side files from peers (then `model` is the cache folder) and the
    fetcher that brings each stage's tensors; else offer this checkpoint's blocks to such peers."""
    from hexswarm.model.source import model_fingerprint
    from hexswarm.swarm.weights import WeightFetcher, WeightServer, servable

    config = node.config
    if config.model_source == "swarm":
        fetcher = WeightFetcher(node, config.model_fingerprint, config.model_cache)
        config.model = await fetcher.prepare()
        return fetcher
    if servable(config.model):
        WeightServer(node, config.model, model_fingerprint(config.model)).register()
    return None


async def run_daemon(node, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run the node, and the server on top of it when a model is configured."""
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        server = None
        if node.config.model is not None or node.config.model_source == "swarm":
            # torch and the serving layer take seconds to import: in a thread, so the node (already in the
            # swarm) answers its peers meanwhile (runtime/loop_watch.py saw the loop held 2-5 s here)
            await trio.to_thread.run_sync(importlib.import_module, "hexswarm.serve.serving")
            from hexswarm.serve.serving import Server

            weights = await _weights(node)
            settings = serve_settings(node.config, node.devices)
            if node.config.calibrate:
                nursery.start_soon(calibrate_node, node, settings)
            server = Server(node, settings, head_settings(node.config), weights)
            await nursery.start(server.run)
        else:
            log.info("no model configured: this node relays but serves no stages")
        if node.config.http is not None:
            from hexswarm.api.http_api import serve_http  # hypercorn is imported only when asked for

            await nursery.start(serve_http, node, server)
        if node.config.freeze_heap:  # started: what is alive now stays (stage loads freeze again, serve/stages.py)
            freeze_heap()
        task_status.started(server)
        await node.stopped()
        nursery.cancel_scope.cancel()
