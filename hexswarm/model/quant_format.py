"""The quantized weight formats' names and sizes, torch-free (the planner and the CLIs use them;
model/quant.py holds the tensors and the math)."""

from __future__ import annotations

from hexswarm.errors import UserError

GROUP = 32  # weights per scale, along the input dim (GGUF's block size)
QUANT_MODES = ("int8", "int4")
GGUF_KEPT_TYPES = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4}  # GGUF block types served as they are
# bytes per weight, scales included: int8 = 32 int8 + fp16 scale; int4 = 16 bytes + fp16 scale + fp16 offset
BYTES_PER_PARAM = {"int8": (GROUP + 2) / GROUP, "int4": (GROUP // 2 + 4) / GROUP}


def check_mode(mode: str | None) -> str | None:
    """None (the checkpoint as it is), 'none' (everything dense) or a QUANT_MODES entry."""
    if mode is not None and mode not in ("none", *QUANT_MODES):
        raise UserError(f"--quantize must be int8, int4 or none, got {mode!r}")
    return mode
