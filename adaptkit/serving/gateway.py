"""The front door of ``adaptkit serve --ray``: the OpenAI-compatible routes, forwarded to engine replicas.

This process holds no model. It answers from the registry (``replica.py``) what concerns the whole
deployment (``/v1/models``, ``/metrics`` with a ``replica`` label on every sample, ``/health``,
runtime load/unload), checks each request as the single-process server does (schema, known
model), and forwards it through the Serve deployment handle with the adapter as the multiplexed
model id, so Ray Serve's router picks a replica that holds it.

A request whose replica dies (killed, out of memory, its node gone) before its response started
is sent to another replica until ``retry_for`` seconds have passed; greedy and seeded requests get
the answer the first replica would have given (an unseeded sampled one, another sample). A stream
whose replica dies after its first chunk ends with an error event, as any mid-stream error does.
Past ``--max-queue`` requests waiting for a replica, the answer is 429, as from one process.
The front door runs under the same guards as the single-process server (``guards.py``).
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.concurrency import run_in_threadpool

from adaptkit.errors import AdaptkitError, QueueFullError, RequestError, UnknownAdapterError
from adaptkit.serving.api import (
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
    adapter_taken_error,
    check_adapter_name,
    contained_adapter_path,
    error_body,
    parse,
    read_client_adapter,
)
from adaptkit.serving.app import openai_app
from adaptkit.serving.metrics import federate
from adaptkit.serving.server import model_cards, require_runtime_loading, resolve_model

TABLE_TTL = 1.0  # seconds the front door trusts its copy of the registry (its own loads refresh it at once)
ROUTES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
          "/classify": ClassifyRequest, "/v1/classify": ClassifyRequest}


class Gateway:
    """What the front door knows: the registry's table (cached), the handles, and its own counters.

    Args:
        replicas: the ``AdapterReplica`` deployment handle; ``registry``: the ``AdapterRegistry`` handle.
        base_name: the ``model`` that means "no adapter"; base_path: for the model cards' ``created``.
        adapter_dir, allow_runtime_loading: as ``Server``'s (the folder must be visible to every replica).
        retry_for: seconds during which a request whose replica died is sent again.
    """

    def __init__(self, replicas, registry, base_name: str, base_path, adapter_dir=None,
                 allow_runtime_loading: bool = False, retry_for: float = 60.0):
        self.replicas, self.registry = replicas, registry
        self.base_name, self.base_path = base_name, base_path
        self.adapter_dir, self.allow_runtime_loading = adapter_dir, allow_runtime_loading
        self.retry_for = retry_for
        self.version, self.adapters, self.reports = None, {}, {}
        self.refreshed = float("-inf")
        self.retries = 0  # requests sent again because their replica died
        self.unanswered = 0  # requests no replica answered within retry_for
        self._asked = self._stored = 0  # refreshes asked for / the newest one stored (an older answer loses)
        self._table_fetch: asyncio.Future | None = None  # the one table fetch in flight, shared

    async def refresh(self) -> None:
        """The registry's table and the replicas' reports, now (``/metrics``, ``/health``, ``/v1/models``)."""
        self._asked += 1
        asked = self._asked
        version, adapters, self.reports = await self.registry.snapshot.remote()
        self._store(asked, version, adapters)

    async def refresh_table(self) -> None:
        """The registry's table, at most ``TABLE_TTL`` seconds old (request path: one fetch shared by all)."""
        if time.monotonic() - self.refreshed <= TABLE_TTL:
            return
        if self._table_fetch is None or self._table_fetch.done():
            self._asked += 1
            asked = self._asked

            async def fetch():
                version, adapters = await self.registry.table.remote()
                self._store(asked, version, adapters)

            self._table_fetch = asyncio.ensure_future(fetch())
        await asyncio.shield(self._table_fetch)

    def _store(self, asked: int, version, adapters: dict) -> None:
        if asked > self._stored:
            self._stored, self.version, self.adapters = asked, version, adapters
            self.refreshed = time.monotonic()

    def known(self) -> list[str]:
        return [self.base_name, *sorted(self.adapters)]

    def placement(self) -> dict[str, list[str]]:
        """Adapter -> the replicas it is resident on (as of their last reports)."""
        where: dict[str, list[str]] = {}
        for replica, report in sorted(self.reports.items()):
            for name in report["resident"]:
                where.setdefault(name, []).append(replica)
        return where

    async def forward(self, http_request: Request, adapter: str | None, body: bytes) -> Response:
        """The replicas' answer to ``http_request``, from one that holds ``adapter`` when possible."""
        payload = {"method": http_request.method, "path": http_request.url.path,
                   "query": http_request.url.query.encode(), "body": body, "version": self.version,
                   "headers": [(k, v) for k, v in http_request.headers.raw if k.lower() != b"authorization"]}
        handle = self.replicas.options(multiplexed_model_id=adapter or "", stream=True)
        deadline = time.monotonic() + self.retry_for
        delay = 0.05
        while True:
            stream = handle.forward.remote(payload)
            try:
                first = await _until_disconnect(http_request, _start(stream))
            except RayActorError as exc:
                stream.cancel()
                if time.monotonic() > deadline:
                    self.unanswered += 1
                    raise RequestError(f"no replica answered within {self.retry_for:.0f} s; the last one failed "
                                       f"with {type(exc).__name__}", status=503, code="replica_unavailable") from exc
                self.retries += 1
                await asyncio.sleep(delay)
                delay = min(2 * delay, 1.0)
                continue
            except BaseException as exc:
                stream.cancel()
                raise _served_error(exc) from exc
            if first is None:  # the client went away
                stream.cancel()
                return Response(status_code=499)
            start, chunks = first
            response = StreamingResponse(_rest(stream, chunks, start["headers"]), status_code=start["status"])
            response.raw_headers = start["headers"]
            return response


def _served_error(exc: BaseException) -> BaseException:
    """What a client is told of a failure inside Ray: adaptkit's own error as raised, Serve's refusals as
    429/503, anything else a 500 with its type and first line (never a remote traceback)."""
    if isinstance(exc, BackPressureError):
        return QueueFullError("every replica's queue is full (--max-queue); retry later")
    if isinstance(exc, DeploymentUnavailableError):
        return RequestError("no replica is running; retry later", status=503, code="replica_unavailable")
    if isinstance(exc, RayTaskError):
        cause = exc.cause
        if isinstance(cause, AdaptkitError):
            return cause
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        return RequestError(f"internal error in a replica: {type(cause).__name__}: {first}", status=500,
                            code="internal_error")
    return exc


async def _start(stream) -> tuple[dict, list[bytes]]:
    """The response's start and its first body chunk (a whole JSON answer, or a stream's first event)."""
    start = await stream.__anext__()
    chunks = []
    try:
        chunks.append(await stream.__anext__())
    except StopAsyncIteration:
        pass
    return start, chunks


async def _until_disconnect(http_request: Request, awaitable):
    """``await awaitable``, or None when the client disconnects first."""
    work = asyncio.ensure_future(awaitable)

    async def disconnect():
        while (await http_request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnect())
    try:
        await asyncio.wait([work, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if work.done():
        return work.result()
    work.cancel()
    return None


async def _rest(stream, chunks: list[bytes], headers) -> object:
    """The body: the chunks already received, then the rest from the replica."""
    sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)
    try:
        for chunk in chunks:
            yield chunk
        async for chunk in stream:
            yield chunk
    except Exception as exc:  # the status line is out: a stream says so in the stream, as one process does
        if not sse:
            raise
        error = _served_error(exc)
        if isinstance(exc, RayActorError):
            error = RequestError(f"the replica serving this stream failed ({type(exc).__name__}); retry the "
                                 "request", status=503, code="replica_unavailable")
        yield f"data: {json.dumps(error_body(error)[1])}\n\ndata: [DONE]\n\n".encode()
    finally:
        stream.cancel()


def create_gateway_app(gateway: Gateway):
    """The front door's FastAPI app (wrapped by ``guards.guard`` like the single-process app)."""
    app = openai_app("adaptkit serve --ray")

    @app.get("/health")
    async def health():
        """ok while one replica or more is healthy; each replica's process, residency and registry version."""
        await gateway.refresh()
        replicas = {r: {key: report[key] for key in ("healthy", "pid", "resident", "version")}
                    for r, report in sorted(gateway.reports.items())}
        ok = any(report["healthy"] for report in replicas.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "replicas": replicas},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        await gateway.refresh()
        own = [
            "# HELP adaptkit_replicas Replicas that reported within the last seconds.",
            "# TYPE adaptkit_replicas gauge", f"adaptkit_replicas {len(gateway.reports)}",
            "# HELP adaptkit_gateway_retries_total Requests sent again because their replica died.",
            "# TYPE adaptkit_gateway_retries_total counter", f"adaptkit_gateway_retries_total {gateway.retries}",
            "# HELP adaptkit_gateway_unanswered_total Requests no replica answered in time (503).",
            "# TYPE adaptkit_gateway_unanswered_total counter",
            f"adaptkit_gateway_unanswered_total {gateway.unanswered}",
        ]
        text = federate({r: rep["metrics"] for r, rep in sorted(gateway.reports.items())})
        return PlainTextResponse(text + "\n".join(own) + "\n", media_type="text/plain; version=0.0.4")

    def cards() -> list[dict]:
        kinds = {name: entry["kind"] for name, entry in gateway.adapters.items()}
        return model_cards(gateway.base_name, gateway.base_path, kinds, gateway.placement())

    @app.get("/v1/models")
    async def models():
        await gateway.refresh()
        return {"object": "list", "data": cards()}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        await gateway.refresh()
        for card in cards():
            if card["id"] == model_id:
                return card
        raise _unknown(gateway, model_id)

    async def forwarded(http_request: Request):
        body = await http_request.body()
        request = parse(ROUTES[http_request.url.path], body)
        if hasattr(request, "check_supported"):
            request.check_supported()
        await gateway.refresh_table()
        entry, _ = resolve_model(request.model, request.adapters, gateway.base_name,
                                 lambda name: name in gateway.adapters, gateway.known)
        return await gateway.forward(http_request, entry if isinstance(entry, str) else None, body)

    for path in ROUTES:
        app.add_api_route(path, forwarded, methods=["POST"])

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(http_request: Request):
        require_runtime_loading(gateway.allow_runtime_loading)
        body = parse(LoadAdapterRequest, await http_request.body())
        check_adapter_name(body.lora_name, gateway.base_name)
        path = contained_adapter_path(gateway.adapter_dir, body.lora_path)
        from adaptkit.formats.detect import read_adapter

        adapter = await run_in_threadpool(read_client_adapter, read_adapter, path, body.lora_path)
        entry = {"path": str(path), "root": str(gateway.adapter_dir), "kind": adapter.kind}
        _, taken = await gateway.registry.register.remote(body.lora_name, entry)
        if taken:
            raise adapter_taken_error(body.lora_name)
        await gateway.refresh()
        return {"status": "ok", "name": body.lora_name, "kind": adapter.kind, "resident": False}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(http_request: Request):
        require_runtime_loading(gateway.allow_runtime_loading)
        body = parse(UnloadAdapterRequest, await http_request.body())
        _, removed = await gateway.registry.unregister.remote(body.lora_name)
        await gateway.refresh()
        if not removed:
            known = ", ".join(sorted(gateway.adapters)) or "none"
            raise UnknownAdapterError(f"no adapter named {body.lora_name!r} is served; served adapters: {known}")
        return {"status": "ok", "name": body.lora_name}

    return app


def _unknown(gateway: Gateway, name: str) -> RequestError:
    from adaptkit.serving.api import unknown_model_error

    return unknown_model_error(name, "model", gateway.known())
