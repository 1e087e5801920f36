"""Draw a node's peer table as a PNG with matplotlib (`hexswarm peers --png FILE`): peers as boxes on
a circle, one coloured square per GPU (colour by device name), a green frame when up and red when
down, the engine speed each peer measured (ms per decode step at batch 1 and the largest batch); a
line for each measured link, thicker for more Mb/s, labelled with its round trip and throughput."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hexswarm.plan.render import colours_by_name


def _device_name(d: dict) -> str:
    return str(d.get("name") or d.get("kind") or "?")


def links(peers: list[dict]) -> list[tuple[int, int, float | None, float | None]]:
    """(i, j, rtt_ms, mbps) per pair of peers in the table, from either side's measurement (i < j)."""
    index = {p["peer_id"]: i for i, p in enumerate(peers)}
    out: dict[tuple[int, int], tuple[float | None, float | None]] = {}
    for i, p in enumerate(peers):
        for other, m in (p.get("links") or {}).items():
            j = index.get(other)
            if j is None or j == i or not isinstance(m, dict):
                continue
            key = (min(i, j), max(i, j))
            rtt, mbps = m.get("rtt_ms"), m.get("mbps")
            old = out.get(key, (None, None))
            out[key] = (rtt if rtt is not None else old[0], mbps if mbps is not None else old[1])
    return [(i, j, rtt, mbps) for (i, j), (rtt, mbps) in sorted(out.items())]


def _positions(n: int, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if n == 1:
        return [(cx, cy)]
    return [(cx + r * math.cos(2 * math.pi * k / n - math.pi / 2), cy + r * math.sin(2 * math.pi * k / n - math.pi / 2))
            for k in range(n)]


def _width(mbps: float | None) -> int:
    return 1 if not mbps else max(1, min(8, round(math.log10(max(mbps, 1.0)) * 2)))


def _engine_label(cal: Any) -> str:
    """'B1 5.7 / B32 7.0 ms' from a peer's calibration, '' when it has none (or a malformed one)."""
    try:
        points = [(int(b), float(t)) for b, t in cal["decode"]]
        ends = [points[0], points[-1]] if len(points) > 1 else points
        return " / ".join(f"B{b} {t * 1e3:.3g}" for b, t in ends) + " ms"
    except (TypeError, ValueError, KeyError, IndexError):
        return ""


def render_peers_png(reply: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    peers = reply["peers"]
    colours = colours_by_name([_device_name(d) for p in peers for d in p.get("devices") or []])
    pos = _positions(len(peers), 0.0, 0.0, 1.0)
    fig, ax = plt.subplots(figsize=(8, 8))
    for i, j, rtt, mbps in links(peers):
        (x0, y0), (x1, y1) = pos[i], pos[j]
        ax.plot([x0, x1], [y0, y1], color="0.6", linewidth=_width(mbps), zorder=1)
        label = " / ".join(t for t in (f"{rtt:.1f} ms" if rtt is not None else "",
                                        f"{mbps:.0f} Mb/s" if mbps else "") if t)
        if label:
            ax.text((x0 + x1) / 2, (y0 + y1) / 2, label, fontsize=7, ha="center", va="center",
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1}, zorder=2)
    for k, (p, (x, y)) in enumerate(zip(peers, pos)):
        devices = p.get("devices") or []
        ax.add_patch(Rectangle((x - 0.22, y - 0.15), 0.44, 0.3, facecolor="white", zorder=3, linewidth=2,
                               edgecolor="tab:green" if p.get("state") == "up" else "tab:red"))
        w = 0.4 / max(1, len(devices))
        for d, dev in enumerate(devices):
            ax.add_patch(Rectangle((x - 0.2 + d * w, y - 0.13), w * 0.9, 0.1, color=colours[_device_name(dev)],
                                   zorder=4))
        ax.text(x, y + 0.06, f"{k + 1}: {p['peer_id'][:6]}..{p['peer_id'][-6:]}" + (" (self)" if p.get("self") else ""),
                ha="center", va="center", fontsize=7, zorder=5)
        engine = _engine_label(p.get("calibration"))
        if engine:
            ax.text(x, y - 0.01, engine, ha="center", va="center", fontsize=6, zorder=5)
    ax.legend(handles=[Patch(color=col, label=name) for name, col in colours.items()], loc="upper right", fontsize=7)
    ax.set_xlim(-1.4, 1.4)
    ax.set_ylim(-1.4, 1.4)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"swarm {reply.get('swarm')!r} as seen by {str(reply.get('self'))[:12]}..")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
