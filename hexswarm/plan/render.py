"""Draw a plan as a PNG with matplotlib (`hexswarm plan --png`): one row per replica, one box per
stage, as wide as its layers and coloured by GPU kind, labelled with the host, the GPU kind and TP
degree and the layer range; each row ends with the replica's predicted latency and capacity, the
title carries the workload and the simulated SLO attainment, TTFT and inter-token latency.

matplotlib is imported when a picture is drawn, not with the package (``hexswarm.plan`` stays
light for the swarm, which never draws)."""

from __future__ import annotations

from pathlib import Path

from hexswarm.plan.result import Plan


def colours_by_name(names: list[str]) -> dict[str, tuple[float, float, float, float]]:
    """A stable colour per name (sorted), from matplotlib's tab10 / tab20 cycle."""
    from matplotlib import colormaps

    ordered = sorted(set(names))
    cmap = colormaps["tab10" if len(ordered) <= 10 else "tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(ordered)}


def render_png(plan: Plan, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    reps = plan.replicas
    colours = colours_by_name([s.gpu_kind for r in reps for s in r.stages])
    layers = max((r.stages[-1].layer_end for r in reps), default=1)
    fig, ax = plt.subplots(figsize=(12, 0.9 * max(1, len(reps)) + 1.6))
    for i, rep in enumerate(reps):
        for s in rep.stages:
            width = s.layer_end - s.layer_start
            ax.barh(i, width, left=s.layer_start, height=0.8, color=colours[s.gpu_kind], edgecolor="black")
            ax.text(s.layer_start + width / 2, i, f"{s.host}\n{s.gpu_kind} x{s.tp}\n[{s.layer_start}, {s.layer_end})",
                    ha="center", va="center", fontsize=6, clip_on=True)
        ax.text(layers * 1.01, i, f"{rep.latency_s:.3g} s, {rep.capacity_rps:.3g} req/s", va="center", fontsize=7)
    ax.set_yticks(range(len(reps)), [f"replica {i}" for i in range(len(reps))])
    ax.invert_yaxis()
    ax.set_xlim(0, layers * 1.18)
    ax.set_xlabel("layers (row end: unloaded latency, capacity)")
    ax.legend(handles=[Patch(color=c, label=k) for k, c in colours.items()], loc="lower right", fontsize=7)
    w, p = plan.workload, plan.predicted
    ax.set_title(f"{plan.model} on {plan.cluster}: {w.rate:.3g} req/s, SLO {w.slo_s:.3g} s, max_batch {w.max_batch}\n"
                 f"predicted attainment {p.slo_attainment:.1%}, p50 {p.p50_s:.3g} s, TTFT p50 {p.ttft_p50_s * 1e3:.3g} ms, "
                 f"ITL p50 {p.itl_p50_s * 1e3:.3g} ms", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
