"""Where a node's stage engines run and with how many torch threads, by device and usable CPUs."""

import pytest

from hexswarm.runtime import cpus


@pytest.mark.parametrize("n, own, threads", [(1, False, None), (2, False, None), (4, False, None), (7, False, None),
                                             (8, True, 4), (16, True, 8), (64, True, 8)])
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


def _build(monkeypatch, cpus_n: int, **settings):
    """StageSet._build_worker with its engines stood in: (kind of worker, EngineJob threads, torch threads set)."""
    import torch

    from hexswarm.serve import stages as stages_mod
    from hexswarm.serve.layout import StageAssignment, SwarmLayout

    monkeypatch.setattr(cpus, "usable_cpus", lambda: cpus_n)
    made, threads = [], []

    class Fake:
        def __init__(self, *args, **kwargs):
            self.args = args
            made.append(self)

        def start(self):
            pass

        def wait_loaded(self):
            pass

    class FakeProcess(Fake):
        pass

    monkeypatch.setattr(stages_mod, "EngineProcess", FakeProcess)
    monkeypatch.setattr(stages_mod, "StageHost", Fake)
    monkeypatch.setattr(stages_mod, "StageEngine", Fake)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    layout = SwarmLayout(1, "A", "m", ("A",), ((StageAssignment("A", 1, 0, 2),),))
    stage_set = stages_mod.StageSet("A", None, None, stages_mod.ServeSettings(model_dir="unused", local_links=False,
                                                                              **settings), pipe=None)
    worker = stage_set._build_worker(layout, 0, 0)
    job_threads = worker.args[0].threads if isinstance(worker, FakeProcess) else None
    return type(worker) is FakeProcess, job_threads, threads


def test_a_cpu_node_places_its_engine_by_its_cpus(monkeypatch):
    assert _build(monkeypatch, 2) == (False, None, [])  # in the node's process, torch's own threads
    assert _build(monkeypatch, 2, cpu_threads=1) == (False, None, [1])
    assert _build(monkeypatch, 16) == (True, 0, [])  # its own process: engine_threads there
    assert _build(monkeypatch, 16, cpu_threads=3) == (True, 3, [])
    assert _build(monkeypatch, 16, engine_process=False) == (False, None, [])
    assert _build(monkeypatch, 2, engine_process=True)[0]


def test_the_node_config_reaches_the_stage_settings(tmp_path):
    from hexswarm.swarm.config import NodeConfig
    from hexswarm.daemon import serve_settings

    cfg = NodeConfig(model=tmp_path, cpu_threads=3, engine_process="off", serve_device="cpu")
    s = serve_settings(cfg, [])
    assert s.cpu_threads == 3 and s.engine_process is False
