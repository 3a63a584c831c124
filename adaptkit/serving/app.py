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

from adaptkit.chat import chat_prompt_ids
from adaptkit.errors import AdaptkitError, QueueFullError, RequestError, UnsupportedAdapterError
from adaptkit.serving import scheduler as sched
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
from adaptkit.serving.text import TextStream


class Generation:
    """One request's life on the event loop: submit, receive tokens, turn them into text, record metrics."""

    def __init__(self, server, prompt_ids: list[int], entry, label: str, body, max_tokens: int, prompt_param: str,
                 seed: int | None = None, logprobs: int | None = None, penalties=None):
        loop = asyncio.get_running_loop()
        self.server, self.label, self.prompt_ids, self.prompt_tokens = server, label, prompt_ids, len(prompt_ids)
        self.events: asyncio.Queue = asyncio.Queue()
        self.text = TextStream(server.engine.tokenizer, body.stops())
        self.started = time.monotonic()
        self.first_token: float | None = None
        self.generated = 0
        self.finish_reason: str | None = None
        self.tokens: list[sched.Token] = []  # every token received, with its logprobs when asked for
        self.reported = 0  # tokens whose logprobs went out in a stream chunk
        self.request = sched.Request(
            prompt_ids=prompt_ids, entry=entry, max_tokens=max_tokens, temperature=body.temperature,
            top_p=body.top_p, top_k=max(body.top_k, 0), seed=seed,
            stop_ids=frozenset() if body.ignore_eos else None,
            timeout=body.timeout if body.timeout is not None else server.request_timeout,
            on_event=lambda event: _deliver(loop, self.events, event), prompt_param=prompt_param,
            logprobs=logprobs, penalties=penalties)

    @property
    def cumulative_logprob(self) -> float:
        return sum(t.logprob for t in self.tokens if t.logprob is not None)

    def unreported(self) -> list[sched.Token]:
        """Tokens received since the last call (for a stream chunk's logprobs)."""
        fresh, self.reported = self.tokens[self.reported :], len(self.tokens)
        return fresh

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
                self.tokens.append(event)
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


def openai_app(title: str) -> FastAPI:
    """A FastAPI app whose errors (adaptkit's, and Starlette's 404/405) are answered in OpenAI's error shape."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None)

    @app.exception_handler(AdaptkitError)
    async def adaptkit_error(request: Request, exc: AdaptkitError):
        status, body = error_body(exc)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        body = {"error": {"message": str(exc.detail), "type": kind, "param": None, "code": None}}
        return JSONResponse(body, status_code=exc.status_code)

    return app


def create_app(server) -> FastAPI:
    """The FastAPI application over a :class:`~adaptkit.serving.server.Server`."""
    app = openai_app("adaptkit serve")

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

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        for card in server.model_cards():
            if card["id"] == model_id:
                return card
        raise server.unknown_model(model_id, "model")

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

    @app.post("/classify")
    @app.post("/v1/classify")
    async def classify(http_request: Request):
        body = parse(ClassifyRequest, await http_request.body())
        entry, label = server.resolve_model(body.model, body.adapters)
        texts = body.texts()
        for text in texts:
            server.check_prompt_chars(len(text), "input")
        return await _classify(server, entry, label, texts)

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(http_request: Request):
        server.require_runtime_loading()
        body = parse(LoadAdapterRequest, await http_request.body())
        check_adapter_name(body.lora_name, server.base_name)
        if server.pool.serves(body.lora_name):
            raise adapter_taken_error(body.lora_name)
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
    max_tokens = (body.limit() if chat else body.max_tokens)
    max_tokens = server.default_max_tokens if max_tokens is None else max_tokens
    top = body.top() if chat else body.logprobs
    per_prompt = body.n if chat else body.choices()
    keep = body.n
    logprobs = 0 if top is None and per_prompt > keep else top  # best_of ranks by cumulative logprob
    penalties = body.penalties(server.engine.base.facts.vocab_size)
    echoed = [None] * len(prompts)
    if not chat and body.echo:  # the prompt's own logprobs, scored with the request's adapters
        echoed = await asyncio.gather(*(_score_prompt(server, ids, entry, top) for ids in prompts))
    generations = []
    if max_tokens > 0:
        generations = [Generation(server, ids, entry, label, body, max_tokens, prompt_param,
                                  seed=None if body.seed is None else (body.seed + j) % 2**63, logprobs=logprobs,
                                  penalties=penalties)
                       for ids in prompts for j in range(per_prompt)]
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
    tokenizer = server.engine.tokenizer
    try:
        if body.stream and generations:
            first, rest = await generations[0].first()  # errors before the first token: a plain error status
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            watcher.cancel()
            return StreamingResponse(_sse(generations[0], first, rest, meta, chat, include_usage, http_request,
                                          tokenizer, top, echoed[0]),
                                     media_type="text/event-stream")
        texts = await asyncio.gather(*(_collect(g) for g in generations))
    except BaseException:
        for generation in generations:
            generation.cancel()
        raise
    finally:
        watcher.cancel()
    choices = []
    for p, ids in enumerate(prompts):
        group = list(zip(generations[p * per_prompt : (p + 1) * per_prompt], texts[p * per_prompt : (p + 1) * per_prompt]))
        if per_prompt > keep:  # best_of: the n with the highest cumulative logprob
            group = sorted(group, key=lambda pair: -pair[0].cumulative_logprob)[:keep]
        for generation, text in group or [(None, "")]:
            index = len(choices)
            tokens = generation.tokens if generation is not None else []
            finish = generation.finish_reason if generation is not None else "length"
            if chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "logprobs": None if top is None else {"content": chat_logprobs(tokenizer, tokens)},
                                "finish_reason": finish})
                continue
            prefix = ""
            if echoed[p] is not None:
                prefix = tokenizer.decode(ids, skip_special_tokens=False)
            choices.append({"index": index, "text": prefix + text, "finish_reason": finish,
                            "logprobs": None if top is None else completion_logprobs(tokenizer, echoed[p], tokens)})
    usage = {"prompt_tokens": sum(len(ids) for ids in prompts),
             "completion_tokens": sum(g.generated for g in generations)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices, "usage": usage}


async def _classify(server, entry, label: str, texts: list[str]) -> dict:
    """Label probabilities of ``texts`` under ``entry`` (forwards of at most ``--max-batch`` rows on the
    scheduler thread, between decode steps), in vLLM's ``/classify`` response shape."""
    from adaptkit.compositions import members_of

    def run():
        names = set(members_of(entry))
        if not server.pool.make_resident(names, set(server.scheduler.in_use()), wait=None):
            raise RequestError("the adapters this request needs cannot be made resident now (all in use); retry",
                               status=503, code="adapters_busy")
        pet = isinstance(entry, str) and server.engine.adapters[entry].kind == "pet"
        size = server.scheduler.max_batch  # a long list runs as forwards of at most --max-batch rows
        chunks = [texts[i:i + size] for i in range(0, len(texts), size)]
        return [probs for chunk in chunks
                for probs in server.engine.classify(chunk, adapter=entry if pet else [entry] * len(chunk))]

    try:
        results = await asyncio.wrap_future(server.scheduler.call(run))
    except UnsupportedAdapterError as exc:  # no head to classify with: the request's fault, not the server's
        raise RequestError(str(exc), param="model") from exc
    tokens = sum(len(ids) for ids in server.engine.tokenizer(texts)["input_ids"])
    data = [{"index": i, "label": max(probs, key=probs.get), "probs": list(probs.values()),
             "labels": list(probs), "num_classes": len(probs)} for i, probs in enumerate(results)]
    return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": label,
            "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}


async def _score_prompt(server, ids: list[int], entry, top: int | None) -> list[sched.Token]:
    """The prompt's tokens with their logprobs (the first None), computed on the scheduler thread."""
    from adaptkit.compositions import members_of

    def score():
        names = set(members_of(entry))
        if not server.pool.make_resident(names, set(server.scheduler.in_use()), wait=None):
            raise RequestError("the adapters this request needs cannot be made resident now (all in use); retry",
                               status=503, code="adapters_busy")
        return server.engine.score([ids], adapters=[entry], top=top or 0)[0]

    scores = await asyncio.wrap_future(server.scheduler.call(score))
    return [sched.Token(t, lp, None if alt is None else tuple(alt))
            for t, lp, alt in zip(scores.token_ids, scores.logprobs, scores.top)]


def _piece(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(tokenizer, prompt: list[sched.Token] | None, tokens: list[sched.Token],
                        offset: int = 0) -> dict:
    """OpenAI's legacy ``logprobs`` object: each token's text, logprob, its alternatives (the chosen token
    always among them) and where its text starts; ``prompt`` first when echoed (its first logprob None)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token in [*(prompt or []), *tokens]:
        piece = _piece(tokenizer, token.id)
        out["tokens"].append(piece)
        out["token_logprobs"].append(token.logprob)
        if token.logprob is None:
            out["top_logprobs"].append(None)
        else:
            alternatives = {_piece(tokenizer, t): lp for t, lp in (token.top or ())}
            alternatives.setdefault(piece, token.logprob)
            out["top_logprobs"].append(alternatives)
        out["text_offset"].append(offset)
        offset += len(piece)
    return out


def chat_logprobs(tokenizer, tokens: list[sched.Token]) -> list[dict]:
    """OpenAI's chat ``logprobs.content``: one entry per token, with its ``top_logprobs``."""
    def entry(token_id, logprob):
        piece = _piece(tokenizer, token_id)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

    return [{**entry(t.id, t.logprob), "top_logprobs": [entry(a, lp) for a, lp in (t.top or ())]} for t in tokens]


async def _collect(generation: Generation) -> str:
    return "".join([piece async for piece in generation.pieces()])


async def _sse(generation: Generation, first: list[str], rest, meta: dict, chat: bool, include_usage: bool,
               http_request: Request, tokenizer=None, top: int | None = None, echoed=None):
    """Server-sent events in OpenAI's chunk format, ``data: [DONE]`` last; a disconnect cancels the row.

    With logprobs, each chunk carries those of the tokens that arrived since the previous chunk."""
    watcher = asyncio.create_task(_watch_disconnect(http_request, [generation]))
    obj = "chat.completion.chunk" if chat else "text_completion"
    offset = 0

    def chunk(piece: str | None, finish: str | None, role: bool = False, prompt=None) -> str:
        nonlocal offset
        logprobs = None
        if top is not None and not role:
            tokens = generation.unreported()
            if chat:
                logprobs = {"content": chat_logprobs(tokenizer, tokens)}
            else:
                logprobs = completion_logprobs(tokenizer, prompt, tokens, offset)
                offset += sum(len(p) for p in logprobs["tokens"])
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": piece} if piece is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece or "", "logprobs": logprobs, "finish_reason": finish}
        data = {**meta, "object": obj, "choices": [choice]}
        if include_usage:
            data["usage"] = None
        return f"data: {json.dumps(data)}\n\n"

    try:
        if chat:
            yield chunk(None, None, role=True)
        if echoed is not None:
            yield chunk(tokenizer.decode([t.id for t in echoed], skip_special_tokens=False), None, prompt=echoed)
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
