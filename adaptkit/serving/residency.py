"""Which servable adapters are in memory: at most K resident, idle ones evicted least-recently-used first.

    pool = AdapterPool(engine, max_resident=2)
    pool.register("sql", "adapters/sql")          # servable; loaded on first use
    pool.make_resident({"sql"}, in_use=set())      # -> True once "sql" is attached to the engine

An adapter some running request uses is never evicted: the caller passes those names as
``in_use``. When the adapters a request needs cannot all be resident without evicting one in use,
:meth:`AdapterPool.make_resident` returns False and the request waits. Evicting is
``Engine.remove_adapter``; reloading reads the adapter's files again (kind detected from them).

Not thread-safe: one thread (the scheduler's) owns the pool and the engine.
"""

from __future__ import annotations

import os
from collections import Counter, OrderedDict
from pathlib import Path

from adaptkit.errors import EngineStateError, InvalidArgumentError, UnknownAdapterError


class AdapterPool:
    """Servable adapters by name (their folders) and the resident ones in least-recently-used order."""

    def __init__(self, engine, max_resident: int | None = None):
        if max_resident is not None and max_resident < 1:
            raise InvalidArgumentError(f"max_resident must be >= 1 (or None for no limit), got {max_resident}")
        self.engine = engine
        self.max_resident = max_resident
        self._paths: dict[str, Path | None] = {}  # None: added as an object, cannot be reloaded, never evicted
        self._kinds: dict[str, str] = {}  # known once read
        self._recent: OrderedDict[str, None] = OrderedDict()  # resident names, least recently used first
        self.loads: Counter[str] = Counter()
        self.evictions: Counter[str] = Counter()
        for name, info in engine.adapters.items():  # adapters the engine already holds are served too
            self._paths[name] = Path(info.source) if info.source else None
            self._kinds[name] = info.kind
            self._recent[name] = None

    @property
    def names(self) -> list[str]:
        """Every servable adapter, resident or not."""
        return sorted(self._paths)

    @property
    def resident(self) -> list[str]:
        """Resident adapters, least recently used first."""
        return list(self._recent)

    def path_of(self, name: str) -> Path:
        self._require(name)
        return self._paths[name]

    def kind_of(self, name: str) -> str | None:
        """The adapter's kind (None until it has been read once)."""
        return self._kinds.get(name)

    def register(self, name: str, path: str | os.PathLike, adapter=None, in_use: frozenset[str] = frozenset(),
                 evict: bool = True) -> bool:
        """Make ``name`` servable from ``path``; load it now (``adapter``: already read from ``path``) when
        there is room, or (``evict``) an idle adapter to evict. Returns whether it is resident."""
        if name in self._paths:
            raise InvalidArgumentError(f"an adapter named {name!r} is already served; unload it first")
        self._paths[name] = Path(path)
        if adapter is not None:
            self._kinds[name] = adapter.kind
        full = self.max_resident is not None and len(self._recent) >= self.max_resident
        if (full and not evict) or not self._make_room(1, set(in_use)):
            return False
        try:
            self._load(name, adapter)
        except Exception:
            del self._paths[name]
            self._kinds.pop(name, None)
            raise
        return True

    def unregister(self, name: str, in_use: frozenset[str] = frozenset()) -> None:
        """Stop serving ``name`` (removed from memory too); refused while a running request uses it."""
        self._require(name)
        if name in in_use:
            raise EngineStateError(f"adapter {name!r} is in use by running requests; unload it when they finish")
        if name in self._recent:
            self.engine.remove_adapter(name)
            del self._recent[name]
        del self._paths[name]
        self._kinds.pop(name, None)

    def make_resident(self, names: set[str], in_use: set[str]) -> bool:
        """Load whichever of ``names`` are not in memory, evicting idle ones (never ``in_use`` or ``names``).

        Returns False, changing nothing, when there is not enough room; the caller retries later.
        """
        for name in names:
            self._require(name)
        missing = [n for n in sorted(names) if n not in self._recent]
        if missing and not self._make_room(len(missing), set(in_use) | set(names)):
            return False
        for name in missing:
            self._load(name)
        self.touch(names)
        return True

    def fits(self, names: set[str]) -> bool:
        """Whether ``names`` can ever be resident together (a request needing more than K never can)."""
        return self.max_resident is None or len(names) <= self.max_resident

    def touch(self, names) -> None:
        """Mark ``names`` as just used (most recent last)."""
        for name in names:
            if name in self._recent:
                self._recent.move_to_end(name)

    def _make_room(self, needed: int, pinned: set[str]) -> bool:
        if self.max_resident is None:
            return True
        excess = len(self._recent) + needed - self.max_resident
        if excess <= 0:
            return True
        idle = [n for n in self._recent if n not in pinned and self._paths[n] is not None]
        if len(idle) < excess:
            return False
        for name in idle[:excess]:
            self.engine.remove_adapter(name)
            del self._recent[name]
            self.evictions[name] += 1
        return True

    def _load(self, name: str, adapter=None) -> None:
        info = self.engine.add_adapter(name, adapter if adapter is not None else self._paths[name])
        self._kinds[name] = info.kind
        self._recent[name] = None
        self.loads[name] += 1

    def _require(self, name: str) -> None:
        if name not in self._paths:
            known = ", ".join(self.names) or "none"
            raise UnknownAdapterError(f"no adapter named {name!r} is served; served adapters: {known}")
