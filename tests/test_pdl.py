"""Programmatic dependent launch (model/pdl.py): which launches ask for it.  The kernels' own use is
checked on a GPU (tools/gpu_check.py, BENCHMARKS run 26); here, that nothing off a Hopper GPU asks."""

from __future__ import annotations

import torch

from hexswarm.model import pdl


def test_no_pdl_off_cuda_or_when_turned_off(monkeypatch):
    assert pdl.enabled(torch.device("cpu")) is False
    assert pdl.launch_kwargs(torch.device("cpu")) == {"PDL": False}  # no launch attribute: CPU interpreter safe
    monkeypatch.setenv(pdl.ENV, "0")
    assert pdl.enabled(torch.device("cuda", 0)) is False  # turned off before any device query
    assert pdl.launch_kwargs(torch.device("cuda", 0)) == {"PDL": False}
