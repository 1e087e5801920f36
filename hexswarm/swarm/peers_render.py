"""Draw a node's peer table as a PNG (`hexswarm peers --png FILE`): peers as boxes on a circle, one
coloured square per GPU (colour by device name), a green frame when up and red when down; a line for
each measured link, thicker for more Mb/s, labelled with its round trip in ms.

Reuses the plan renderer's palette and built-in rasteriser (hexswarm/plan/render.py); with matplotlib
installed the picture is drawn by matplotlib instead and carries PeerIDs and device names."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hexswarm.plan.render import PALETTE, Canvas

UP, DOWN, LINK, INK = (44, 160, 44), (214, 39, 40), (150, 150, 150), (0, 0, 0)


def device_colours(peers: list[dict]) -> dict[str, tuple[int, int, int]]:
    names = sorted({_device_name(d) for p in peers for d in p.get("devices") or []})
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}


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


def _line(c: Canvas, x0: int, y0: int, x1: int, y1: int, colour, width: int = 1) -> None:
    steps = max(abs(x1 - x0), abs(y1 - y0), 1)
    h = width // 2
    for s in range(steps + 1):
        x = round(x0 + (x1 - x0) * s / steps)
        y = round(y0 + (y1 - y0) * s / steps)
        c.rect(x - h, y - h, x - h + width, y - h + width, colour)


def _width(mbps: float | None) -> int:
    return 1 if not mbps else max(1, min(8, round(math.log10(max(mbps, 1.0)) * 2)))


def render_peers_builtin(reply: dict, path: Path) -> None:
    peers = reply["peers"]
    colours = device_colours(peers)
    size, box, pad = 640, 70, 40
    c = Canvas(size, size + 30)
    pos = [(round(x), round(y)) for x, y in _positions(len(peers), size / 2, size / 2, size / 2 - box - pad)]
    for i, j, rtt, mbps in links(peers):
        (x0, y0), (x1, y1) = pos[i], pos[j]
        _line(c, x0, y0, x1, y1, LINK, _width(mbps))
        if rtt is not None:
            c.text((x0 + x1) // 2 + 4, (y0 + y1) // 2 + 4, str(round(rtt)), INK)
    for k, (p, (x, y)) in enumerate(zip(peers, pos)):
        devices = p.get("devices") or []
        x0, y0 = x - box // 2, y - box // 2
        c.rect(x0 - 3, y0 - 3, x0 + box + 3, y0 + box + 3, UP if p.get("state") == "up" else DOWN)
        c.rect(x0, y0, x0 + box, y0 + box, (255, 255, 255))
        per_row = max(1, math.ceil(math.sqrt(len(devices) or 1)))
        cell = (box - 8) // per_row
        for d, dev in enumerate(devices):
            cx, cy = x0 + 4 + (d % per_row) * cell, y0 + 4 + (d // per_row) * cell
            c.rect(cx + 1, cy + 1, cx + cell - 1, cy + cell - 1, colours[_device_name(dev)])
        c.text(x0, y0 + box + 8, str(k + 1), INK)  # the peer's number in the printed legend
    for j, col in enumerate(colours.values()):  # legend: colour swatches in device-name order
        c.rect(pad + j * 60, size + 8, pad + j * 60 + 50, size + 24, col)
    path.write_bytes(c.png())


def render_peers_matplotlib(reply: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    peers = reply["peers"]
    colours = {k: tuple(v / 255 for v in rgb) for k, rgb in device_colours(peers).items()}
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
    ax.legend(handles=[Patch(color=col, label=name) for name, col in colours.items()], loc="upper right", fontsize=7)
    ax.set_xlim(-1.4, 1.4)
    ax.set_ylim(-1.4, 1.4)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"swarm {reply.get('swarm')!r} as seen by {str(reply.get('self'))[:12]}..")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_peers_png(reply: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        render_peers_builtin(reply, path)
    else:
        render_peers_matplotlib(reply, path)
