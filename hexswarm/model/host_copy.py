"""Small host lists onto the device without waiting for the device.

`torch.tensor(values, device="cuda")` copies from pageable memory, and CUDA makes such a copy wait
for every kernel already queued on the stream: the host then cannot queue the rest of a step, or
the next step, while the GPU works.  Through pinned memory the copy is queued like a kernel.
"""

from __future__ import annotations

import torch


def to_device(values: list, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    t = torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
