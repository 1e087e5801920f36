"""Draw a plan as a PNG: one row per replica, one box per stage, width
proportional to its layers, colour by GPU kind, labelled "tp/layers".

Uses matplotlib when it is installed; otherwise a tiny built-in rasteriser
(boxes and a 3x5 digit font) written as PNG with zlib + struct."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from hexswarm.plan.result import Plan

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]

# 3x5 glyphs, rows top to bottom, 3 bits each
_GLYPHS = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7), "4": (5, 5, 7, 1, 1),
    "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1), "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7),
    "/": (1, 1, 2, 4, 4), " ": (0, 0, 0, 0, 0),
}


def kind_colours(plan: Plan) -> dict[str, tuple[int, int, int]]:
    kinds = sorted({s.gpu_kind for r in plan.replicas for s in r.stages})
    return {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(kinds)}


class Canvas:
    def __init__(self, width: int, height: int, bg: tuple[int, int, int] = (255, 255, 255)) -> None:
        self.w, self.h = width, height
        self.px = bytearray(bytes(bg) * (width * height))

    def rect(self, x0: int, y0: int, x1: int, y1: int, colour: tuple[int, int, int]) -> None:
        x0, x1 = max(0, x0), min(self.w, x1)
        row = bytes(colour) * max(0, x1 - x0)
        for y in range(max(0, y0), min(self.h, y1)):
            i = (y * self.w + x0) * 3
            self.px[i:i + len(row)] = row

    def text(self, x: int, y: int, s: str, colour: tuple[int, int, int], scale: int = 2) -> None:
        for ch in s:
            for r, bits in enumerate(_GLYPHS.get(ch, _GLYPHS[" "])):
                for c in range(3):
                    if bits >> (2 - c) & 1:
                        self.rect(x + c * scale, y + r * scale, x + (c + 1) * scale, y + (r + 1) * scale, colour)
            x += 4 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3:(y + 1) * self.w * 3]) for y in range(self.h))

        def chunk(tag: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def render_png_builtin(plan: Plan, path: Path) -> None:
    colours = kind_colours(plan)
    width, row_h, pad, legend_h = 800, 40, 10, 30
    rows = max(1, len(plan.replicas))
    c = Canvas(width, pad + rows * (row_h + pad) + legend_h)
    layers = max((r.stages[-1].layer_end for r in plan.replicas), default=1)
    for i, rep in enumerate(plan.replicas):
        y = pad + i * (row_h + pad)
        for s in rep.stages:
            x0 = pad + (width - 2 * pad) * s.layer_start // layers
            x1 = pad + (width - 2 * pad) * s.layer_end // layers
            c.rect(x0, y, x1, y + row_h, (0, 0, 0))
            c.rect(x0 + 1, y + 1, x1 - 1, y + row_h - 1, colours[s.gpu_kind])
            label = f"{s.tp}/{s.layer_end - s.layer_start}"
            if len(label) * 8 < x1 - x0 - 4:
                c.text(x0 + 4, y + row_h // 2 - 5, label, (255, 255, 255))
    y = pad + rows * (row_h + pad)
    for j, (kind, col) in enumerate(colours.items()):  # legend: colour swatches in kind-name order
        c.rect(pad + j * 60, y, pad + j * 60 + 50, y + 16, col)
    path.write_bytes(c.png())


def render_png_matplotlib(plan: Plan, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colours = {k: tuple(v / 255 for v in rgb) for k, rgb in kind_colours(plan).items()}
    fig, ax = plt.subplots(figsize=(10, 0.6 * max(1, len(plan.replicas)) + 1.2))
    for i, rep in enumerate(plan.replicas):
        for s in rep.stages:
            ax.barh(i, s.layer_end - s.layer_start, left=s.layer_start, color=colours[s.gpu_kind], edgecolor="black")
            ax.text((s.layer_start + s.layer_end) / 2, i, f"TP{s.tp}\n{s.host}", ha="center", va="center", fontsize=6)
    ax.set_yticks(range(len(plan.replicas)), [f"replica {i}" for i in range(len(plan.replicas))])
    ax.invert_yaxis()
    ax.set_xlabel("layers")
    ax.legend(handles=[Patch(color=c, label=k) for k, c in colours.items()], loc="upper right", fontsize=7)
    ax.set_title(f"{plan.model} on {plan.cluster}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_png(plan: Plan, path: str | Path) -> None:
    path = Path(path)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        render_png_builtin(plan, path)
    else:
        render_png_matplotlib(plan, path)
