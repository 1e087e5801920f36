"""Tables over "layers assigned" (index 0..L) and the two ways to combine them.

A table holds, for every layer count m, the best objective value of assigning
m consecutive layers to some set of stages, and remembers how (for
reconstruction). ``combine`` puts two parts side by side: with ``op="max"`` the
value is the bottleneck stage, with ``op="sum"`` the total; ``best_of`` takes the
elementwise best of alternatives (e.g. different TP splits of one block)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

INF = float("inf")


@dataclass
class Table:
    values: np.ndarray  # shape (L+1,)
    # how each entry is made: ("leaf", payload) | ("pair", left, right, choice) | ("alt", [tables], which)
    recipe: tuple

    def assignment(self, m: int) -> list[tuple[Any, int]]:
        """The (leaf payload, layers) pairs, left to right, that make entry m."""
        out: list[tuple[Any, int]] = []
        stack: list[tuple[Table, int]] = [(self, m)]
        while stack:
            t, k = stack.pop()
            kind = t.recipe[0]
            if kind == "leaf":
                if t.recipe[1] is not None and k > 0:
                    out.append((t.recipe[1], k))
            elif kind == "pair":
                _, left, right, choice = t.recipe
                l = int(choice[k])
                stack.append((right, l))  # popped after left: keeps left-to-right order
                stack.append((left, k - l))
            else:
                _, alts, which = t.recipe
                stack.append((alts[int(which[k])], k))
        return out


def empty(num_layers: int) -> Table:
    v = np.full(num_layers + 1, INF)
    v[0] = 0.0
    return Table(v, ("leaf", None))


def leaf(values: np.ndarray, payload: Any) -> Table:
    return Table(values, ("leaf", payload))


_INDEX_CACHE: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _indices(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(m - l + n - 1 per cell: the index into INF-padded left, INF padding, 0..n-1)."""
    if n not in _INDEX_CACHE:
        _INDEX_CACHE[n] = (np.arange(n)[:, None] - np.arange(n)[None, :] + (n - 1), np.full(n - 1, INF), np.arange(n))
    return _INDEX_CACHE[n]


def combine(left: Table, right: Table, op: str) -> Table:
    """out[m] = min over l of op(left[m - l], right[l])."""
    n = len(left.values)
    cells, pad, rows = _indices(n)
    a = np.concatenate((pad, left.values))[cells]  # a[m, l] = left[m - l], INF where l > m: one gather, no mask
    grid = np.maximum(a, right.values[None, :]) if op == "max" else a + right.values[None, :]
    choice = grid.argmin(axis=1)  # first minimum: deterministic
    return Table(grid[rows, choice], ("pair", left, right, choice))


def best_of(tables: list[Table]) -> Table:
    if len(tables) == 1:
        return tables[0]
    stacked = np.stack([t.values for t in tables])
    which = np.argmin(stacked, axis=0)
    return Table(stacked[which, np.arange(stacked.shape[1])], ("alt", tables, which))
