"""Compositions: what a batch row's entry may be besides ``None`` (the bare base) and an adapter name,
the adapters each uses, and the checks that an entry can be served.

- ``Stack("a", "b")``: apply a then b (for LoRA: both deltas; for bottleneck adapters: in sequence)
- ``Fuse("a", "b")``: AdapterFusion over the named bottleneck adapters
- ``Mix({"a": 0.7, "b": -0.3})``: base + sum_i w_i * delta_i
- ``Average("a", "b", weights=[0.25, 0.75])``: AdapterHub's Average of bottleneck adapters

How a composition computes at a bottleneck site is ``adapters/compose.py``; which rows use which adapter
in a forward is ``routing.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from adaptkit.adapters.bottleneck import KIND as BOTTLENECK
from adaptkit.adapters.fusion import KIND as FUSION
from adaptkit.errors import EngineStateError, InvalidArgumentError, UnsupportedAdapterError

MAX_MIX_WEIGHT = 100.0  # beyond this a delta swamps the base: logits overflow long before it is useful


@dataclass(frozen=True, init=False)
class _Names:
    """A composition of named adapters, each with weight 1 (``needs``: the fewest names it takes)."""

    names: tuple[str, ...]
    needs: ClassVar[tuple[int, str]] = (1, "one adapter name")

    def __init__(self, *names: str):
        if len(names) < self.needs[0]:
            raise InvalidArgumentError(f"{type(self).__name__} needs at least {self.needs[1]}")
        object.__setattr__(self, "names", tuple(names))

    def members(self) -> dict[str, float]:
        return dict.fromkeys(self.names, 1.0)


@dataclass(frozen=True, init=False)
class Stack(_Names):
    """Apply adapters one after the other: ``ak.Stack("a", "b")``."""


@dataclass(frozen=True, init=False)
class Fuse(_Names):
    """AdapterFusion over bottleneck adapters: ``ak.Fuse("a", "b")``."""

    needs: ClassVar[tuple[int, str]] = (2, "two adapter names")


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


def names_of(entry: RowEntry) -> tuple[str, ...]:
    """The adapter names of an entry, in order (duplicates kept)."""
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    if isinstance(entry, Mix):
        return tuple(name for name, _ in entry.weights)
    return entry.names


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


def check_row_entries(entries: Sequence[RowEntry], adapters: Mapping[str, object]) -> None:
    """Raise before a forward when an entry cannot be served (names are known to be loaded).

    Fuse and Average take bottleneck adapters only, and a Fuse needs a loaded fusion over exactly
    its adapters, in that order. A fusion is not a row entry by itself.
    """
    for entry in dict.fromkeys(entries):
        kinds = {name: adapters[name].kind for name in members_of(entry)}
        fusion_names = [name for name, kind in kinds.items() if kind == FUSION]
        if fusion_names:
            fusion = adapters[fusion_names[0]]
            fused = ", ".join(repr(n) for n in fusion.adapter_names)
            raise InvalidArgumentError(
                f"{fusion_names[0]!r} is an AdapterFusion layer, not a row adapter; route rows with ak.Fuse({fused})"
            )
        if isinstance(entry, (Fuse, Average)):
            others = sorted(name for name, kind in kinds.items() if kind != BOTTLENECK)
            if others:
                raise UnsupportedAdapterError(
                    f"{type(entry).__name__} combines bottleneck adapters only; {others} are not (use ak.Mix or ak.Stack)"
                )
        if isinstance(entry, Fuse):
            _check_fusion_loaded(entry, adapters)


def _check_fusion_loaded(entry: Fuse, adapters: Mapping[str, object]) -> None:
    fusions = {name: a for name, a in adapters.items() if a.kind == FUSION}
    if any(f.adapter_names == entry.names for f in fusions.values()):
        return
    wanted = ", ".join(repr(n) for n in entry.names)
    same_set = [name for name, f in fusions.items() if sorted(f.adapter_names) == sorted(entry.names)]
    if same_set:
        order = ", ".join(repr(n) for n in fusions[same_set[0]].adapter_names)
        raise EngineStateError(
            f"ak.Fuse({wanted}): the loaded fusion {same_set[0]!r} fuses these adapters in another order; "
            f"write ak.Fuse({order}) (the order decides which adapter's residual and layer norm apply)"
        )
    loaded = ", ".join(f"{name!r} over {f.adapter_names}" for name, f in sorted(fusions.items())) or "none"
    raise EngineStateError(
        f"ak.Fuse({wanted}): no fusion over exactly these adapters is loaded (loaded fusions: {loaded}); "
        f"load one with eng.add_adapter(name, 'path/to/fusion/{','.join(entry.names)}')"
    )
