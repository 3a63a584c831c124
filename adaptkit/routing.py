"""Which adapter each batch row uses, decided once per forward and read by every injected layer.

The engine turns ``adapters=[...]`` (one entry per row) into a :class:`RoutingPlan` and sets it in
a context variable around the forward; layers look up their groups in the plan. Nothing is
re-grouped per layer: index tensors are built once per plan.

A row entry is ``None`` (the bare base), an adapter name, or a composition (``compositions.py``:
``Stack``, ``Fuse``, ``Mix``, ``Average``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from adaptkit.compositions import RowEntry, members_of


@dataclass(frozen=True)
class AdapterGroup:
    """The rows that use one adapter. ``rows`` is None when it is every row of the batch.

    ``row_weights`` ([n, 1, 1]) is None when every weight is 1.
    """

    rows: torch.Tensor | None
    row_weights: torch.Tensor | None


@dataclass
class RoutingPlan:
    """Per-row adapter entries of one batch and the index tensors derived from them."""

    entries: tuple[RowEntry, ...]
    groups: dict[str, AdapterGroup]
    cache: dict = field(default_factory=dict)  # per-kind data derived once per plan
    device: torch.device | str = "cpu"  # where its index tensors live

    @property
    def batch_size(self) -> int:
        return len(self.entries)

    @functools.cached_property
    def one_row(self) -> RoutingPlan | None:
        """The plan of a single row with the batch's one entry, where every row has the same; else None.
        A layer whose input is not the batch's rows (DeBERTa's relative-position embeddings) applies it."""
        return route_rows(self.entries[:1], self.device) if len(set(self.entries)) == 1 else None

    def group(self, name: str) -> AdapterGroup | None:
        return self.groups.get(name)


class RowsNotSeparable(Exception):
    """Raised inside a forward where a layer's input is not the batch's rows and rows differ in adapters:
    the engine then runs each group of rows with the same entry on its own (internal; never reaches users)."""


def route_rows(entries: Sequence[RowEntry], device: torch.device | str = "cpu") -> RoutingPlan:
    """Group rows by adapter: one index tensor (and weight tensor) per adapter, built once."""
    entries = tuple(entries)
    rows_of: dict[str, list[int]] = {}
    weights_of: dict[str, list[float]] = {}
    for row, entry in enumerate(entries):
        for name, weight in members_of(entry).items():
            rows_of.setdefault(name, []).append(row)
            weights_of.setdefault(name, []).append(weight)
    groups = {}
    for name, rows in rows_of.items():
        weights = weights_of[name]
        index = None if len(rows) == len(entries) else torch.tensor(rows, dtype=torch.long, device=device)
        row_weights = None
        if any(w != 1.0 for w in weights):
            row_weights = torch.tensor(weights, dtype=torch.float32, device=device).view(-1, 1, 1)
        groups[name] = AdapterGroup(rows=index, row_weights=row_weights)
    return RoutingPlan(entries=entries, groups=groups, device=device)


_current_plan: contextvars.ContextVar[RoutingPlan | None] = contextvars.ContextVar("adaptkit_plan", default=None)


def current_plan() -> RoutingPlan | None:
    """The plan of the forward in progress (None outside ``use_plan``)."""
    return _current_plan.get()


@contextlib.contextmanager
def use_plan(plan: RoutingPlan) -> Iterator[RoutingPlan]:
    """Make ``plan`` the routing of every forward inside the block."""
    token = _current_plan.set(plan)
    try:
        yield plan
    finally:
        _current_plan.reset(token)


def by_groups(groups: list[list[int]], run, columns: torch.Tensor | None = None) -> torch.Tensor:
    """``run(rows)`` per group of rows, the results put back in row order (dim 0). ``columns`` (a [B, S]
    mask): each group ran on only the columns its rows use; its outputs go back to those columns."""
    outs = [(rows, run(rows)) for rows in groups]
    first = outs[0][1]
    shape = first.shape[1:] if columns is None else (columns.shape[1], *first.shape[2:])
    result = first.new_zeros(sum(len(r) for r in groups), *shape)
    for rows, out in outs:
        index = torch.tensor(rows, device=result.device)
        if columns is None:
            result[index] = out
        else:
            used = columns[index].any(dim=0).nonzero().flatten()
            result[index, int(used[0]):int(used[-1]) + 1] = out
    return result
