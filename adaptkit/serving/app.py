"""The HTTP endpoints of ``adaptkit serve`` (FastAPI): OpenAI's completions, chat, models, plus
health, metrics and vLLM's runtime adapter load/unload.

Each generation becomes a :class:`~adaptkit.serving.scheduler.Request`; its tokens come back from the
scheduler thread into an ``asyncio.Queue`` of the event loop. A client that disconnects cancels
its requests (their rows leave the batch at the next token boundary). Streams wait for the first
token before sending headers, so a request refused at admission (unknown adapter, context too
long) still gets a proper status code.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from adaptkit.errors import AdaptkitError, QueueFullError, RequestError
from adaptkit.serving import scheduler as sched
from adaptkit.serving.api import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
    check_adapter_name,
    contained_adapter_path,
    error_body,
    parse,
    read_client_adapter,
)
from adaptkit.serving.text import TextStream, chat_prompt_ids


class Generation:
    """One request's life on the event loop: submit, receive tokens, turn them into text, record metrics."""

    def __init__(self, server, prompt_ids: list[int], entry, label: str, body, max_tokens: int, prompt_param: str):
        loop = asyncio.get_running_loop()
        self.server, self.label, self.prompt_tokens = server, label, len(prompt_ids)
        self.events: asyncio.Queue = asyncio.Queue()
        self.text = TextStream(server.engine.tokenizer, body.stops())
        self.started = time.monotonic()
        self.first_token: float | None = None
        self.generated = 0
        self.finish_reason: str | None = None
        self.request = sched.Request(
            prompt_ids=prompt_ids, entry=entry, max_tokens=max_tokens, temperature=body.temperature,
            top_p=body.top_p, top_k=max(body.top_k, 0), seed=body.seed,
            stop_ids=frozenset() if body.ignore_eos else None,
            timeout=body.timeout if body.timeout is not None else server.request_timeout,
            on_event=lambda event: _deliver(loop, self.events, event), prompt_param=prompt_param)

    def submit(self) -> None:
        try:
            self.server.scheduler.submit(self.request)
        except AdaptkitError as exc:
            self.server.metrics.rejected(self.label, "queue_full" if isinstance(exc, QueueFullError) else "invalid")
            raise

    async def pieces(self):
        """Yield text pieces as tokens arrive; then :attr:`finish_reason` is set. Raises the request's error."""
        while self.finish_reason is None:
            event = await self.events.get()
            if isinstance(event, sched.Token):
                self.generated += 1
                self.first_token = self.first_token or time.monotonic()
                piece = self.text.add(event.id)
                if self.text.stopped:  # a stop string: the row leaves the batch now
                    self.request.cancel()
                    self._end("stop")
                if piece:
                    yield piece
                continue
            if event.reason == "error" or event.reason == "timeout":
                self._end(event.reason)
                if event.reason == "timeout":
                    raise RequestError(f"the request timed out after {self.request.timeout} s",
                                       param="timeout", status=408, code="timeout")
                raise event.error
            self._end(event.reason)
            piece = self.text.finish()
            if piece:
                yield piece

    async def first(self):
        """Wait for the first piece (or the end); returns (pieces received so far, the iterator)."""
        it = self.pieces().__aiter__()
        try:
            return [await it.__anext__()], it
        except StopAsyncIteration:
            return [], it

    def cancel(self) -> None:
        if self.finish_reason is None:
            self.request.cancel()
            self._end("cancelled")

    def _end(self, reason: str) -> None:
        if self.finish_reason is not None:
            return
        self.finish_reason = reason
        now = time.monotonic()
        ttft = None if self.first_token is None else self.first_token - self.started
        self.server.metrics.finished(self.label, reason, self.prompt_tokens, self.generated, now - self.started, ttft)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.generated,
                "total_tokens": self.prompt_tokens + self.generated}


def _deliver(loop, queue: asyncio.Queue, event) -> None:
    try:
        loop.call_soon_threadsafe(queue.put_nowait, event)
    except RuntimeError:  # the event loop is closed: nobody is listening any more
        pass


async def _watch_disconnect(http_request: Request, generations: list[Generation]) -> None:
    """Cancel the generations when the client goes away (the body is read, so receive waits for that)."""
    while True:
        message = await http_request.receive()
        if message["type"] == "http.disconnect":
            for generation in generations:
                generation.cancel()
            return


def create_app(server) -> FastAPI:
    """The FastAPI application over a :class:`~adaptkit.serving.server.Server`."""
    app = FastAPI(title="adaptkit serve", docs_url=None, redoc_url=None)

    @app.exception_handler(AdaptkitError)
    async def adaptkit_error(request: Request, exc: AdaptkitError):
        status, body = error_body(exc)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        body = {"error": {"message": str(exc.detail), "type": kind, "param": None, "code": None}}
        return JSONResponse(body, status_code=exc.status_code)

    @app.get("/health")
    async def health():
        if not server.healthy():
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(server.scheduler, server.base_name),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": server.model_cards()}

    @app.post("/v1/completions")
    async def completions(http_request: Request):
        body = parse(CompletionRequest, await http_request.body())
        body.check_supported()
        entry, label = server.resolve_model(body.model, body.adapters)
        prompts = await run_in_threadpool(lambda: [server.prompt_ids(p) for p in body.prompts()])  # off the loop
        if body.stream and len(prompts) > 1:
            raise RequestError("prompt: stream=true takes one prompt", param="prompt")
        return await _respond(http_request, server, body, entry, label, prompts, "prompt", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http_request: Request):
        body = parse(ChatCompletionRequest, await http_request.body())
        body.check_supported()
        entry, label = server.resolve_model(body.model, body.adapters)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        server.check_prompt_chars(sum(len(m["content"]) for m in messages), "messages")
        prompt = await run_in_threadpool(chat_prompt_ids, server.engine.tokenizer, messages)
        return await _respond(http_request, server, body, entry, label, [prompt], "messages", chat=True)

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(http_request: Request):
        server.require_runtime_loading()
        body = parse(LoadAdapterRequest, await http_request.body())
        check_adapter_name(body.lora_name, server.base_name)
        path = contained_adapter_path(server.adapter_dir, body.lora_path)
        from adaptkit.formats.detect import read_adapter

        adapter = await run_in_threadpool(read_client_adapter, read_adapter, path, body.lora_path)
        resident = await asyncio.wrap_future(server.scheduler.call(
            lambda: server.pool.register(body.lora_name, path, adapter, server.scheduler.in_use(),
                                         root=server.adapter_dir)))
        return {"status": "ok", "name": body.lora_name, "kind": adapter.kind, "resident": resident}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(http_request: Request):
        server.require_runtime_loading()
        body = parse(UnloadAdapterRequest, await http_request.body())
        await asyncio.wrap_future(server.scheduler.call(
            lambda: server.pool.unregister(body.lora_name, server.scheduler.in_use())))
        return {"status": "ok", "name": body.lora_name}

    return app


async def _respond(http_request, server, body, entry, label, prompts, prompt_param: str, chat: bool):
    max_tokens = (body.limit() if chat else body.max_tokens) or server.default_max_tokens
    generations = [Generation(server, ids, entry, label, body, max_tokens, prompt_param) for ids in prompts]
    for i, generation in enumerate(generations):
        try:
            generation.submit()
        except AdaptkitError:
            for earlier in generations[:i]:
                earlier.cancel()
            raise
    watcher = asyncio.create_task(_watch_disconnect(http_request, generations))
    meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": body.model}
    try:
        if body.stream:
            first, rest = await generations[0].first()  # errors before the first token: a plain error status
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            watcher.cancel()
            return StreamingResponse(_sse(generations[0], first, rest, meta, chat, include_usage, http_request),
                                     media_type="text/event-stream")
        texts = await asyncio.gather(*(_collect(g) for g in generations))
    except BaseException:
        for generation in generations:
            generation.cancel()
        raise
    finally:
        watcher.cancel()
    choices = []
    for index, (generation, text) in enumerate(zip(generations, texts)):
        if chat:
            choices.append({"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                            "finish_reason": generation.finish_reason})
        else:
            choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": generation.finish_reason})
    usage = {key: sum(g.usage()[key] for g in generations) for key in ("prompt_tokens", "completion_tokens",
                                                                        "total_tokens")}
    return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices, "usage": usage}


async def _collect(generation: Generation) -> str:
    return "".join([piece async for piece in generation.pieces()])


async def _sse(generation: Generation, first: list[str], rest, meta: dict, chat: bool, include_usage: bool,
               http_request: Request):
    """Server-sent events in OpenAI's chunk format, ``data: [DONE]`` last; a disconnect cancels the row."""
    watcher = asyncio.create_task(_watch_disconnect(http_request, [generation]))
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(piece: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": piece} if piece is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
        data = {**meta, "object": obj, "choices": [choice]}
        if include_usage:
            data["usage"] = None
        return f"data: {json.dumps(data)}\n\n"

    try:
        if chat:
            yield chunk(None, None, role=True)
        for piece in first:
            yield chunk(piece, None)
        try:
            async for piece in rest:
                yield chunk(piece, None)
        except Exception as exc:  # the status line is sent: the error goes in the stream, as OpenAI's does
            yield f"data: {json.dumps(error_body(exc)[1])}\n\n"
            yield "data: [DONE]\n\n"
            return
        yield chunk(None if chat else "", generation.finish_reason)
        if include_usage:
            yield f"data: {json.dumps({**meta, 'object': obj, 'choices': [], 'usage': generation.usage()})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        watcher.cancel()
        generation.cancel()
