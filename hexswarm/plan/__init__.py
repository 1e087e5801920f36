"""The HexGen scheduler: batching-aware cost model (calibrated by measurements), two-level search,
continuous-batching simulator.

Pure Python + numpy (no torch, no libp2p). Typical use from the swarm:

    from hexswarm.plan import cluster_from_peer_table, load_model_spec, plan_cluster
    cluster = cluster_from_peer_table(peers, links)
    plan = plan_cluster(cluster, load_model_spec("llama-2-70b"), rate=2.0, slo_s=20.0, seed=0)
    plan.to_json()
"""

from hexswarm.plan.batching_sim import BatchSimResult, peak_rate_batching, simulate_batching
from hexswarm.plan.calibration import Calibration, parse_calibration
from hexswarm.plan.cluster import GPU_CATALOG, Cluster, GpuKind, Host, Link, cluster_from_hosts, cluster_from_peer_table
from hexswarm.plan.cluster_yaml import cluster_from_yaml_dict, load_cluster_yaml
from hexswarm.plan.cost import PrototypeCostModel, RooflineCostModel, StageCost, StepShape
from hexswarm.plan.model_spec import BUILTIN_CONFIGS, ModelSpec, load_model_spec, model_spec_from_dict
from hexswarm.plan.planner import PlanOptions, Planner, plan_cluster
from hexswarm.plan.result import Plan
from hexswarm.plan.simulator import SimResult, peak_rate, simulate
from hexswarm.plan.workload import LengthDist, Workload

__all__ = [
    "BUILTIN_CONFIGS", "GPU_CATALOG", "BatchSimResult", "Calibration", "Cluster", "GpuKind", "Host", "LengthDist", "Link", "ModelSpec", "Plan",
    "PlanOptions", "Planner", "PrototypeCostModel", "RooflineCostModel", "SimResult", "StageCost", "StepShape", "Workload",
    "cluster_from_hosts", "cluster_from_peer_table", "cluster_from_yaml_dict", "load_cluster_yaml",
    "load_model_spec", "model_spec_from_dict", "parse_calibration", "peak_rate", "peak_rate_batching", "plan_cluster",
    "simulate", "simulate_batching",
]
