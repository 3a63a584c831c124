"""adaptkit on Ray Serve, the part inside the cluster: one adapter registry and N engine replicas.

Each :class:`AdapterReplica` is a whole single-process server (``Server``: an engine, its scheduler
with continuous batching, its adapter residency, the same FastAPI app). Requests reach it from the
front door (``gateway.py``) through a Serve deployment handle, one ASGI call each (:func:`asgi_call`).
The adapter a request names is the handle call's *multiplexed model id*: Ray Serve's router sends
it to a replica that already holds that adapter (Ray Serve model multiplexing), and a replica tells
the router what it holds through its ``@serve.multiplexed`` loader, sized like its residency
(``--max-resident``), so Ray's least-recently-used choice and the engine's agree.

:class:`AdapterRegistry` holds the adapters every replica serves (name -> folder) with a version
that runtime load/unload bump. A request carries the version the front door knows; a replica
behind it syncs first (so a just-loaded adapter is never unknown). Every ``REPORT_EVERY`` seconds
each replica reports its metrics, residency and health to the registry, which is how ``/metrics``,
``/v1/models`` and ``/health`` of the front door see the whole deployment.

Imports ray; loaded only for ``adaptkit serve --ray`` (``pip install 'adaptkit[ray]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import uuid
from collections import Counter

from ray import serve

log = logging.getLogger("adaptkit.serve")
REPORT_EVERY = 0.5  # seconds between a replica's reports to the registry
REPORT_FRESH = 5.0  # a replica silent for longer is counted as gone
SYNC_TIMEOUT = 30.0  # seconds a replica waits for the registry's table


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class AdapterRegistry:
    """The adapters every replica serves and the replicas' latest reports.

    Versions are ``(boot, changes)``: a registry that Serve restarted starts again from the deployment's
    table under a new boot id (runtime-loaded adapters are lost with it), and replicas follow whatever
    version differs from theirs, never only a higher one.

    Args:
        adapters: ``{name: {"path": folder, "root": folder it must stay inside or None, "kind": kind}}``.
    """

    def __init__(self, adapters: dict[str, dict]):
        self.adapters = dict(adapters)
        self.version = (uuid.uuid4().hex[:8], 0)
        self.reports: dict[str, dict] = {}

    def table(self) -> tuple[tuple, dict[str, dict]]:
        return self.version, self.adapters

    def _changed(self, adapters: dict[str, dict]) -> tuple:
        self.adapters = adapters
        self.version = (self.version[0], self.version[1] + 1)
        return self.version

    def register(self, name: str, entry: dict) -> tuple[tuple, bool]:
        """(the new version, False), or (the version, True) when ``name`` is taken."""
        if name in self.adapters:
            return self.version, True
        return self._changed({**self.adapters, name: entry}), False

    def unregister(self, name: str) -> tuple[tuple, bool]:
        """(the new version, True), or (the version, False) when no adapter is called ``name``."""
        if name not in self.adapters:
            return self.version, False
        return self._changed({k: v for k, v in self.adapters.items() if k != name}), True

    def report(self, replica: str, report: dict) -> tuple:
        """Record a replica's report; returns the current version (the replica syncs when it differs)."""
        self.reports[replica] = {**report, "received": time.monotonic()}
        return self.version

    def snapshot(self) -> tuple[tuple, dict[str, dict], dict[str, dict]]:
        """(version, adapters, the reports of replicas heard from within ``REPORT_FRESH`` seconds)."""
        now = time.monotonic()
        self.reports = {r: rep for r, rep in self.reports.items() if now - rep["received"] <= REPORT_FRESH}
        return self.version, self.adapters, self.reports


@serve.deployment
class AdapterReplica:
    """One engine over the base with every registered adapter servable, behind the same app as ``adaptkit serve``.

    Args:
        registry: the :class:`AdapterRegistry` handle.
        base: the base model's folder (or Hub id); ``engine_options``: ``Engine.from_pretrained``'s dtype,
            quantize, device.
        table: the adapters at deployment (a replica serves them from the start, then follows the registry).
        server_options: ``Server``'s options (max_batch, max_queue, max_resident, limits, ...).
        threads: torch's CPU threads in this replica (the CPUs Ray reserved for it).
    """

    def __init__(self, registry, base: str, table: dict[str, dict], engine_options: dict, server_options: dict,
                 threads: int | None = None):
        import torch

        from adaptkit.engine import Engine
        from adaptkit.serving.server import Server

        if threads:
            torch.set_num_threads(threads)
        self.registry = registry
        self.id = serve.get_replica_context().replica_id.unique_id
        engine = Engine.from_pretrained(base, **engine_options)
        self.server = Server(engine, **server_options).start()
        self.app = self.server.app()
        self._tasks: set[asyncio.Task] = set()  # requests' apps still finishing after their caller left
        self.routing: Counter[tuple[str, str]] = Counter()  # (adapter, hit | miss)
        self._routing_lock = threading.Lock()  # counted on the event loop, read by the report thread
        self.version = None  # the registry version this replica serves
        self.applied: dict[str, dict] = {}  # the registry entries the pool serves, by name
        self._sync_lock = threading.Lock()
        self._apply(None, table)

        async def placement(name: str) -> str:  # the request itself attaches the adapter when admitted
            return name

        # Ray's LRU over the same K as the pool's, touched by the same requests: both drop the same adapter
        self._place = serve.multiplexed(max_num_models_per_replica=self.server.pool.max_resident or -1)(placement)
        self._stopped = threading.Event()
        threading.Thread(target=self._report_loop, name="adaptkit-ray-report", daemon=True).start()

    async def forward(self, request: dict):
        """Answer one HTTP request (``gateway.py``'s payload): yields ``{"status", "headers"}``, then the body."""
        if request["version"] != self.version:  # a load or unload this replica has not seen yet
            version, table = await asyncio.wait_for(self.registry.table.remote(), SYNC_TIMEOUT)
            await asyncio.to_thread(self._apply, version, table)
        name = serve.get_multiplexed_model_id()
        headers = [(b"x-adaptkit-replica", self.id.encode())]
        if name and self.server.pool.serves(name):
            outcome = "hit" if name in self.server.pool.resident else "miss"
            with self._routing_lock:
                self.routing[(name, outcome)] += 1
            headers.append((b"x-adaptkit-routing", outcome.encode()))
            await self._place(name)  # tells Ray's router this replica holds it
        async with contextlib.aclosing(asgi_call(self.app, request, self._tasks)) as messages:
            async for message in messages:
                if isinstance(message, dict):
                    message = {**message, "headers": [*message["headers"], *headers]}
                yield message

    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose scheduler thread ended is replaced."""
        if not self.server.healthy():
            raise RuntimeError(f"replica {self.id}: the scheduler thread has stopped")

    def _apply(self, version, table: dict[str, dict]) -> None:
        """Serve exactly the adapters of ``table`` (a changed folder: removed, then added again); one that a
        running request uses is removed at a later sync, and the version is taken only once all is done."""
        from adaptkit.errors import AdaptkitError

        with self._sync_lock:
            if version is not None and version == self.version:
                return

            def change() -> bool:
                pool, in_use, complete = self.server.pool, self.server.scheduler.in_use(), True
                for name in [n for n in self.applied if table.get(n) != self.applied[n]]:
                    if name in in_use:
                        complete = False
                        continue
                    pool.unregister(name)
                    del self.applied[name]
                for name, entry in table.items():
                    if name not in self.applied and not pool.serves(name):
                        try:
                            pool.register(name, entry["path"], load=False, root=entry["root"], kind=entry["kind"])
                            self.applied[name] = entry
                        except AdaptkitError as exc:  # checked by the front door; gone since: its requests get 404
                            log.warning("replica %s: adapter %s: %s", self.id, name, exc)
                return complete

            if self.server.scheduler.call(change).result(timeout=SYNC_TIMEOUT) and version is not None:
                self.version = version

    def _report(self) -> dict:
        from adaptkit.serving.metrics import routing_lines

        pool = self.server.pool
        text = self.server.metrics.render(self.server.scheduler, self.server.base_name)
        with self._routing_lock:
            routing = Counter(self.routing)
        return {"pid": os.getpid(), "healthy": self.server.healthy(), "version": self.version,
                "resident": pool.resident, "metrics": text + routing_lines(routing)}

    def _report_loop(self) -> None:
        while not self._stopped.wait(REPORT_EVERY):
            try:
                version = self.registry.report.remote(self.id, self._report()).result(timeout_s=SYNC_TIMEOUT)
                if version != self.version:
                    self._apply(*self.registry.table.remote().result(timeout_s=SYNC_TIMEOUT))
            except Exception as exc:  # the registry restarting, or this replica stopping: try again next time
                log.debug("replica %s: report failed: %s", self.id, exc)

    def __del__(self):
        """Serve calls this when it stops the replica."""
        stopped = getattr(self, "_stopped", None)
        if stopped is not None and not stopped.is_set():
            stopped.set()
            self.server.stop()


async def asgi_call(app, request: dict, tasks: set):
    """Run one HTTP request through the ASGI ``app`` in this process.

    ``request``: method, path, query (bytes), headers (byte pairs), body (bytes). Yields
    ``{"status", "headers"}`` when the response starts, then its body chunks. When the caller stops
    iterating (its client went away, Serve cancelled the call), the app sees ``http.disconnect``,
    which cancels the request's rows; the app's task finishes on its own (kept in ``tasks`` meanwhile).
    """
    messages: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    sent = False
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request["method"],
             "scheme": "http", "path": request["path"], "raw_path": request["path"].encode(),
             "query_string": request.get("query", b""), "root_path": "", "headers": request["headers"],
             "client": None, "server": None}

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": request["body"], "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        messages.put_nowait(message)

    task = asyncio.ensure_future(app(scope, receive, send))
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                yield {"status": message["status"], "headers": list(message.get("headers", []))}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    return
        task.result()  # the app ended without a whole response: its error goes to the caller
        raise RuntimeError(f"{request['path']}: the app ended without a response")
    finally:
        disconnected.set()
