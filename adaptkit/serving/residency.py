"""Which servable adapters are in memory: at most K resident, idle ones evicted least-recently-used first.

    pool = AdapterPool(engine, max_resident=16)
    pool.register("sql", "adapters/sql", load=False)   # servable; its files are read when first needed
    pool.prefetch({"sql"})                              # read in the background (a request is queued)
    pool.make_resident({"sql"}, in_use=set())           # -> True once "sql" is attached to the engine

Thousands of adapters can be registered (a name, a path and the kind read from the config files);
K are resident. Reading an adapter's files happens on a background thread as soon as a request
for it is queued (:meth:`prefetch`), so the decode loop only attaches what was read (for a LoRA:
copies its factors into the layers' stacks); a cold adapter delays its own request, not the batch.

An adapter some running request uses is never evicted: the caller passes those names as
``in_use``. When the adapters a request needs are not read yet, or cannot all be resident without
evicting one in use, :meth:`make_resident` returns False and the request waits. Evicting is
``Engine.remove_adapter``; reloading reads the adapter's files again.

One thread (the scheduler's) owns the pool and the engine; only the file reading runs elsewhere.
"""

from __future__ import annotations

import os
import threading
from collections import Counter, OrderedDict
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from pathlib import Path

from adaptkit.errors import EngineStateError, InvalidArgumentError, UnknownAdapterError


class AdapterPool:
    """Servable adapters by name (their folders) and the resident ones in least-recently-used order."""

    def __init__(self, engine, max_resident: int | None = None, readers: int = 1):
        if max_resident is not None and max_resident < 1:
            raise InvalidArgumentError(f"max_resident must be >= 1 (or None for no limit), got {max_resident}")
        self.engine = engine
        self.max_resident = max_resident
        self._reader = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="adaptkit-read")
        self._reading: dict[str, Future] = {}  # name -> its files being read (or read), not yet attached
        self._reading_lock = threading.Lock()  # prefetch may be called from request threads
        self.on_read = lambda: None  # called (on the reading thread) when a background read ends
        self._paths: dict[str, Path | None] = {}  # None: added as an object, cannot be reloaded, never evicted
        self._kinds: dict[str, str] = {}  # known once read
        self._roots: dict[str, Path] = {}  # the folder an adapter must stay inside (runtime-loaded ones)
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
    def count(self) -> int:
        """How many adapters are servable."""
        return len(self._paths)

    def serves(self, name: str) -> bool:
        """Whether ``name`` is a servable adapter (resident or not)."""
        return name in self._paths

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
                 evict: bool = True, load: bool = True, root: str | os.PathLike | None = None,
                 kind: str | None = None) -> bool:
        """Make ``name`` servable from ``path``; load it now (``adapter``: already read from ``path``) when
        ``load`` and there is room, or (``evict``) an idle adapter to evict. Returns whether it is resident.

        With ``load=False`` only the kind is read (from the config files; ``kind``: already read): registering
        is cheap.
        ``root``: the folder ``path`` must stay inside, checked again at every later read (a folder
        swapped for a link that leads elsewhere after an eviction is refused then).
        """
        if name in self._paths:
            raise InvalidArgumentError(f"an adapter named {name!r} is already served; unload it first")
        if root is not None:
            self._roots[name] = Path(root)
        if not load:
            from adaptkit.formats.detect import detect_kind

            self._kinds[name] = kind or detect_kind(path)  # a folder that is no adapter fails here, not at first use
            self._paths[name] = Path(path)
            return False
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
            self._roots.pop(name, None)
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
        self._roots.pop(name, None)
        with self._reading_lock:
            self._reading.pop(name, None)

    def evict(self, name: str, in_use: frozenset[str] = frozenset()) -> bool:
        """Take ``name`` out of memory (it stays servable; the next request reads it again). Returns False,
        changing nothing, when it is not resident, in use, or was added as an object (cannot be reloaded)."""
        if name not in self._recent or name in in_use or self._paths.get(name) is None:
            return False
        self.engine.remove_adapter(name)
        del self._recent[name]
        self.evictions[name] += 1
        return True

    def prefetch(self, names) -> None:
        """Start reading the files of whichever of ``names`` are neither resident nor being read."""
        with self._reading_lock:
            for name in names:
                path = self._paths.get(name)
                if path is not None and name not in self._recent and name not in self._reading:
                    self._reading[name] = self._reader.submit(_read_inside, path, self._roots.get(name))
                    self._reading[name].add_done_callback(lambda _: self.on_read())

    def close(self) -> None:
        """Stop the background reader (reads in progress finish; nothing more starts)."""
        self._reader.shutdown(wait=False, cancel_futures=True)

    def make_resident(self, names: set[str], in_use: set[str], wait: float | None = 0.0) -> bool:
        """Attach whichever of ``names`` are not in memory, evicting idle ones (never ``in_use`` or ``names``).

        Their files are read in the background (:meth:`prefetch`, started here if it was not). Until
        that is done (waiting up to ``wait`` seconds for it; None: as long as it takes), or when there
        is not enough room, returns False changing nothing, and the caller retries later. A read that
        failed raises its error here.
        """
        for name in names:
            self._require(name)
        missing = [n for n in sorted(names) if n not in self._recent]
        self.prefetch(missing)
        with self._reading_lock:
            reads = {n: self._reading[n] for n in missing}
        if not all(f.done() for f in reads.values()) and wait != 0:
            wait_for(reads.values(), timeout=wait, return_when=FIRST_EXCEPTION)
        if not all(f.done() for f in reads.values()):
            return False
        for name, read in reads.items():
            if read.exception() is not None:  # read again next time it is asked for
                with self._reading_lock:
                    self._reading.pop(name, None)
                raise read.exception()
        if missing and not self._make_room(len(missing), set(in_use) | set(names)):
            return False
        for name, read in reads.items():
            with self._reading_lock:
                self._reading.pop(name, None)
            self._load(name, read.result())
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
            self.evict(name)
        return True

    def _load(self, name: str, adapter=None) -> None:
        if adapter is None:
            adapter = _read_inside(self._paths[name], self._roots.get(name))
        info = self.engine.add_adapter(name, adapter)
        self._kinds[name] = info.kind
        self._recent[name] = None
        self.loads[name] += 1

    def _require(self, name: str) -> None:
        if name not in self._paths:
            known = ", ".join(self.names) or "none"
            raise UnknownAdapterError(f"no adapter named {name!r} is served; served adapters: {known}")


def _read_inside(path: Path, root: Path | None):
    """Read the adapter at ``path``, after checking (now, at the read) that it stays inside ``root``."""
    from adaptkit.formats.detect import read_adapter
    from adaptkit.serving.api import contained_adapter_path, read_client_adapter

    if root is None:
        return read_adapter(path)
    return read_client_adapter(read_adapter, contained_adapter_path(root, str(path)), str(path))
