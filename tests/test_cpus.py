"""Where a node's stage engines run and with how many torch threads, by device and usable CPUs."""

import pytest

from hexswarm.runtime import cpus


@pytest.mark.parametrize("n, own, threads", [(1, False, None), (2, False, None), (3, False, None), (4, True, 2),
                                             (16, True, 8), (64, True, 8)])
def test_cpu_node_engine_process_by_cpus(monkeypatch, n, own, threads):
    monkeypatch.setattr(cpus, "usable_cpus", lambda: n)
    assert cpus.engine_in_own_process("cpu") is own
    assert cpus.engine_torch_threads("cpu") == threads


@pytest.mark.parametrize("n", [1, 2, 16])
def test_cuda_engine_always_in_own_process(monkeypatch, n):
    monkeypatch.setattr(cpus, "usable_cpus", lambda: n)
    assert cpus.engine_in_own_process("cuda")
    assert cpus.engine_torch_threads("cuda") == max(1, min(8, n // 2))


def test_configured_threads_win(monkeypatch):
    monkeypatch.setattr(cpus, "usable_cpus", lambda: 16)
    assert cpus.engine_threads(3) == 3
    assert cpus.engine_threads(0) == 8
