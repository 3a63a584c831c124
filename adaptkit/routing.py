"""Which adapter each batch row uses, decided once per forward and read by every injected layer.

The engine turns ``adapters=[...]`` (one entry per row) into a :class:`RoutingPlan` and sets it in
a context variable around the forward; layers look up their groups in the plan. Nothing is
re-grouped per layer: index tensors are built once per plan.

A row entry is ``None`` (the bare base), an adapter name, or a composition:

- ``Stack("a", "b")``: apply a then b (for LoRA: both deltas; for bottleneck adapters: in sequence)
- ``Fuse("a", "b")``: AdapterFusion over the named bottleneck adapters
- ``Mix({"a": 0.7, "b": -0.3})``: base + sum_i w_i * delta_i
- ``Average("a", "b", weights=[0.25, 0.75])``: AdapterHub's Average of bottleneck adapters
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from adaptkit.errors import InvalidArgumentError

MAX_MIX_WEIGHT = 100.0  # beyond this a delta swamps the base: logits overflow long before it is useful


@dataclass(frozen=True)
class Stack:
    """Apply adapters one after the other: ``ak.Stack("a", "b")``."""

    names: tuple[str, ...]

    def __init__(self, *names: str):
        if len(names) < 1:
            raise InvalidArgumentError("Stack needs at least one adapter name")
        object.__setattr__(self, "names", tuple(names))

    def members(self) -> dict[str, float]:
        return dict.fromkeys(self.names, 1.0)


@dataclass(frozen=True)
class Fuse:
    """AdapterFusion over bottleneck adapters: ``ak.Fuse("a", "b")``."""

    names: tuple[str, ...]

    def __init__(self, *names: str):
        if len(names) < 2:
            raise InvalidArgumentError("Fuse needs at least two adapter names")
        object.__setattr__(self, "names", tuple(names))

    def members(self) -> dict[str, float]:
        return dict.fromkeys(self.names, 1.0)


@dataclass(frozen=True)
class Mix:
    """Base plus a weighted sum of adapter deltas: ``ak.Mix({"a": 0.7, "b": -0.3})``.

    With ``normalize=True`` the weights are divided by the sum of their absolute values.
    """

    weights: tuple[tuple[str, float], ...]
    normalize: bool = False

    def __init__(self, weights: Mapping[str, float], normalize: bool = False):
        if not weights:
            raise InvalidArgumentError("Mix needs at least one {name: weight} entry")
        items = tuple((str(k), float(v)) for k, v in weights.items())
        for name, weight in items:
            if not math.isfinite(weight) or abs(weight) > MAX_MIX_WEIGHT:
                raise InvalidArgumentError(f"Mix weight of {name!r} is {weight}; weights must be finite numbers "
                                           f"within +-{MAX_MIX_WEIGHT:g}")
        if normalize:
            total = sum(abs(v) for _, v in items)
            if total == 0:
                raise InvalidArgumentError("Mix(normalize=True) with all weights zero")
            items = tuple((k, v / total) for k, v in items)
        object.__setattr__(self, "weights", items)
        object.__setattr__(self, "normalize", normalize)

    def members(self) -> dict[str, float]:
        return dict(self.weights)


@dataclass(frozen=True)
class Average:
    """AdapterHub's ``Average`` of bottleneck adapters: ``ak.Average("a", "b", weights=[0.25, 0.75])``.

    Reproduced as ``adapters`` 1.3.0 computes it, at each site: ``(1/n) * sum_i w_i * a_i`` with the
    weights normalised to sum 1 (so they are divided by n twice), see ``adapters/compose.py``. For
    the textbook weighted average of adapter effects use :class:`Mix`.
    """

    names: tuple[str, ...]
    weights: tuple[float, ...]

    def __init__(self, *names: str, weights=None, normalize: bool = True):
        if len(names) < 1:
            raise InvalidArgumentError("Average needs at least one adapter name")
        values = [1.0 / len(names)] * len(names) if weights is None else [float(w) for w in weights]
        if len(values) != len(names):
            raise InvalidArgumentError(f"Average has {len(names)} adapters but {len(values)} weights")
        if weights is not None and normalize:
            total = sum(values)
            if total == 0:
                raise InvalidArgumentError("Average weights sum to zero and cannot be normalised")
            values = [v / total for v in values]
        object.__setattr__(self, "names", tuple(names))
        object.__setattr__(self, "weights", tuple(values))

    def members(self) -> dict[str, float]:
        return dict.fromkeys(self.names, 1.0)


RowEntry = str | Stack | Fuse | Mix | Average | None


def members_of(entry: RowEntry) -> dict[str, float]:
    """The adapters a row entry uses, with the weight of each one's delta."""
    if entry is None:
        return {}
    if isinstance(entry, str):
        return {entry: 1.0}
    if isinstance(entry, (Stack, Fuse, Mix, Average)):
        return entry.members()
    raise InvalidArgumentError(
        f"a row's adapter must be None, a name, ak.Stack, ak.Fuse, ak.Mix or ak.Average; got {entry!r} "
        f"({type(entry).__name__})"
    )


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
