"""An asymmetric TP x PP layout: per-stage TP degree and layer count (HexGen's
`--hetero-config` / `--pp-partition`), validated against the model."""

from __future__ import annotations

from dataclasses import dataclass

from hexswarm.errors import UserError
from hexswarm.model.config import LlamaConfig
from hexswarm.model.shard import check_tp_degree


@dataclass(frozen=True)
class StageRanks:
    """One stage of a HeteroLayout: its TP degree, its layers and the global ranks that run it."""
    index: int
    tp: int
    layer_start: int
    layer_end: int
    first_rank: int  # global rank of the stage leader (ranks are stage-major)

    @property
    def ranks(self) -> range:
        return range(self.first_rank, self.first_rank + self.tp)


@dataclass(frozen=True)
class HeteroLayout:
    """`hexswarm generate`'s layout as its flags give it (the swarm's agreed one is serve/layout.py SwarmLayout,
    the planner's plan/replica.py ReplicaLayout)."""
    hetero_config: tuple[int, ...]
    pp_partition: tuple[int, ...]

    @classmethod
    def build(cls, cfg: LlamaConfig, hetero_config: list[int] | None,
              pp_partition: list[int] | None) -> "HeteroLayout":
        n = cfg.num_hidden_layers
        if not hetero_config and not pp_partition:
            return cls((1,), (n,))
        if not hetero_config:
            raise UserError("--pp-partition needs --hetero-config (one TP degree per stage)")
        if not pp_partition:
            if n % len(hetero_config):
                raise UserError(
                    f"{n} layers do not split evenly over {len(hetero_config)} stages: give --pp-partition"
                )
            pp_partition = [n // len(hetero_config)] * len(hetero_config)
        if len(hetero_config) != len(pp_partition):
            raise UserError(
                f"--hetero-config has {len(hetero_config)} stages but --pp-partition has {len(pp_partition)}"
            )
        if any(p < 1 for p in pp_partition):
            raise UserError(f"every stage needs at least one layer: --pp-partition {' '.join(map(str, pp_partition))}")
        if sum(pp_partition) != n:
            raise UserError(
                f"--pp-partition {' '.join(map(str, pp_partition))} sums to {sum(pp_partition)}, but the model has {n} layers"
            )
        for tp in hetero_config:
            check_tp_degree(cfg, tp)
        return cls(tuple(hetero_config), tuple(pp_partition))

    @property
    def world_size(self) -> int:
        return sum(self.hetero_config)

    @property
    def stages(self) -> list[StageRanks]:
        out, layer, rank = [], 0, 0
        for i, (tp, n) in enumerate(zip(self.hetero_config, self.pp_partition)):
            out.append(StageRanks(i, tp, layer, layer + n, rank))
            layer += n
            rank += tp
        return out

    def stage_of_rank(self, rank: int) -> tuple[StageRanks, int]:
        """The stage a global rank belongs to and its TP rank inside it."""
        for st in self.stages:
            if rank in st.ranks:
                return st, rank - st.first_rank
        raise ValueError(f"rank {rank} outside world of {self.world_size}")

    def to_json(self) -> dict:
        return {"hetero_config": list(self.hetero_config), "pp_partition": list(self.pp_partition)}
