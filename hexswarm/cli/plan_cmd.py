"""`hexswarm plan`: search an asymmetric TP x PP layout for a cluster (no torch, no network)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("plan")
    def plan(
        cluster: Path = typer.Option(..., "--cluster", help="cluster YAML (see node_configs/clusters/)"),
        model: str = typer.Option(..., "--model", help="built-in name (llama-2-70b, ...), a directory with config.json, or a .gguf file"),
        quantize: Optional[str] = typer.Option(None, "--quantize", help="int8 or int4: count the layers' weights quantized"),
        rate: Optional[float] = typer.Option(None, "--rate", help="request rate (req/s); default 70% of the seed plan's capacity"),
        slo: Optional[float] = typer.Option(None, "--slo", help="latency deadline (s); default 2x the median replica latency"),
        seed: int = typer.Option(0, "--seed", help="search seed: same seed and input give the same plan"),
        as_json: bool = typer.Option(False, "--json", help="print the plan as JSON"),
        png: Optional[Path] = typer.Option(None, "--png", help="draw the layout to this PNG file"),
    ) -> None:
        """Plan replicas (stages, TP degrees, layer splits) and predict SLO attainment."""
        from hexswarm.plan.cluster_yaml import load_cluster_yaml
        from hexswarm.plan.model_spec import load_model_spec
        from hexswarm.plan.planner import plan_cluster

        from hexswarm.model.quant_format import BYTES_PER_PARAM, check_mode

        layer_bytes = BYTES_PER_PARAM.get(check_mode(quantize)) if quantize else None
        result = plan_cluster(load_cluster_yaml(cluster), load_model_spec(model, layer_bytes), rate=rate, slo_s=slo,
                              seed=seed)
        if png is not None:
            from hexswarm.plan.render import render_png

            render_png(result, png)
        if as_json:
            typer.echo(json.dumps(result.to_json(), indent=2))
        else:
            _print_table(result)


def _print_table(plan) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{plan.model} on {plan.cluster} (seed {plan.seed})")
    for col in ("replica", "stage", "host", "GPUs", "TP", "layers", "memory GiB", "stage time s"):
        table.add_column(col)
    for i, rep in enumerate(plan.replicas):
        for j, s in enumerate(rep.stages):
            table.add_row(
                str(i) if j == 0 else "", str(j), s.host, f"{s.gpu_kind} {','.join(map(str, s.gpus))}", str(s.tp),
                f"[{s.layer_start}, {s.layer_end})", f"{s.memory_bytes / 2**30:.1f} / {s.memory_capacity_bytes / 2**30:.0f}",
                f"{s.stage_time_s:.3f}", end_section=j == len(rep.stages) - 1,
            )
    console = Console()
    console.print(table)
    for i, rep in enumerate(plan.replicas):
        console.print(
            f"replica {i}: --hetero-config {' '.join(map(str, rep.hetero_config))} "
            f"--pp-partition {' '.join(map(str, rep.pp_partition))}  (unloaded latency {rep.latency_s:.2f} s, "
            f"capacity {rep.capacity_rps:.3g} req/s)",
            soft_wrap=True,
        )
    p, w = plan.predicted, plan.workload
    console.print(
        soft_wrap=True,
        *[f"predicted at {w.rate:.3g} req/s, SLO {w.slo_s:.3g} s, max_batch {w.max_batch} per replica: attainment "
          f"{p.slo_attainment:.1%}, p50 {p.p50_s:.2f} s, p99 {p.p99_s:.2f} s, TTFT p50 {p.ttft_p50_s * 1e3:.3g} ms, "
          f"ITL p50 {p.itl_p50_s * 1e3:.3g} ms, {p.tokens_per_s:.4g} tokens/s over {p.num_requests} simulated requests"],
    )
    if plan.unused_gpus:
        console.print("unused: " + "; ".join(f"{h} {k} {','.join(map(str, g))}" for h, k, g in plan.unused_gpus))
