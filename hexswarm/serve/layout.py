"""The swarm's serving layout: replicas of pipelines, each stage on one peer at some TP degree,
numbered by epoch; and the deterministic choice of the head peer."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from hexswarm.errors import ProtocolError


@dataclass(frozen=True)
class StageAssignment:
    peer: str
    tp: int
    layer_start: int
    layer_end: int
    gpus: tuple[int, ...] = ()  # device ordinals on the peer; () means 0..tp-1

    def to_wire(self) -> dict:
        return {"peer": self.peer, "tp": self.tp, "layers": [self.layer_start, self.layer_end], "gpus": list(self.gpus)}

    @classmethod
    def from_wire(cls, d: Any) -> "StageAssignment":
        if not isinstance(d, dict):
            raise ProtocolError("stage is not a map")
        a, b = d["layers"]
        st = cls(str(d["peer"]), int(d["tp"]), int(a), int(b), tuple(int(g) for g in d.get("gpus") or ()))
        if st.tp < 1 or not (0 <= st.layer_start < st.layer_end) or (st.gpus and len(st.gpus) != st.tp):
            raise ProtocolError(f"bad stage {d!r}")
        return st


@dataclass(frozen=True)
class SwarmLayout:
    epoch: int
    head: str
    model: str  # fingerprint of the checkpoint's config.json: every stage serves the same model
    view: tuple[str, ...]  # the up peers the plan was made from
    replicas: tuple[tuple[StageAssignment, ...], ...]
    predicted: dict = field(default_factory=dict, compare=False)
    # per replica: (epoch, replica) of the committed layout it repeats stage for stage, whose stages
    # are kept loaded and serve on (StageSet.load_epoch), or None: loaded fresh.  () when none does.
    # The head decides it once, so every peer of a replica reuses or none does.
    continues: tuple[tuple[int, int] | None, ...] = ()
    # the head term (wall clock // term_s) its head made it in: peers accept it only from that term's head
    term: int = 0

    def to_wire(self) -> dict:
        wire = {
            "epoch": self.epoch, "head": self.head, "term": self.term, "model": self.model, "view": list(self.view),
            "replicas": [[s.to_wire() for s in r] for r in self.replicas], "predicted": self.predicted,
        }
        if any(c is not None for c in self.continues):  # absent otherwise: older peers' layouts read the same
            wire["continues"] = [None if c is None else list(c) for c in self.continues]
        return wire

    def continued(self, replica: int) -> tuple[int, int] | None:
        return self.continues[replica] if replica < len(self.continues) else None

    @classmethod
    def from_wire(cls, d: Any, n_layers: int | None = None) -> "SwarmLayout":
        try:
            layout = cls(
                epoch=int(d["epoch"]), head=str(d["head"]), model=str(d["model"]),
                view=tuple(str(p) for p in d["view"]),
                replicas=tuple(tuple(StageAssignment.from_wire(s) for s in r) for r in d["replicas"]),
                predicted=dict(d.get("predicted") or {}),
                continues=tuple(None if c is None else (int(c[0]), int(c[1])) for c in d.get("continues") or ()),
                term=_wire_int(d["term"]),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as e:  # int(inf) overflows
            raise ProtocolError(f"malformed layout: {type(e).__name__}: {e}") from None
        layout.check(n_layers)
        return layout

    def check(self, n_layers: int | None) -> None:
        if not self.replicas:
            raise ProtocolError("layout has no replicas")
        for r in self.replicas:
            if not r or r[0].layer_start != 0 or any(a.layer_end != b.layer_start for a, b in zip(r, r[1:])):
                raise ProtocolError("a replica's stages must cover the layers contiguously from 0")
            if n_layers is not None and r[-1].layer_end != n_layers:
                raise ProtocolError(f"a replica covers {r[-1].layer_end} of {n_layers} layers")
        if self.continues and (len(self.continues) != len(self.replicas) or any(
                c is not None and not (0 <= c[0] < self.epoch and 0 <= c[1]) for c in self.continues)):
            raise ProtocolError("continues: one [older epoch, replica] or null per replica")

    def stages_of(self, peer: str) -> list[tuple[int, int]]:
        """(replica, stage index) pairs this peer serves."""
        return [(ri, si) for ri, r in enumerate(self.replicas) for si, s in enumerate(r) if s.peer == peer]

    @property
    def peers(self) -> set[str]:
        return {s.peer for r in self.replicas for s in r}

    def describe(self) -> list[dict]:
        return [{"hetero_config": [s.tp for s in r], "pp_partition": [s.layer_end - s.layer_start for s in r],
                 "stages": [s.to_wire() for s in r]} for r in self.replicas]


def _wire_int(v: Any) -> int:
    if type(v) is not int:
        raise TypeError(f"{v!r} is not an integer")
    return v


def rendezvous_rank(peers: list[str], term: int) -> list[str]:
    """Peers ordered by highest-random-weight for this term: everyone computes the same order."""
    def weight(p: str) -> bytes:
        return hashlib.sha256(f"{term}:{p}".encode()).digest()

    return sorted(peers, key=weight, reverse=True)


def head_for(candidates: list[str], term: int) -> str | None:
    ranked = rendezvous_rank(candidates, term)
    return ranked[0] if ranked else None
