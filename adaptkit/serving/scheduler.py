"""Continuous batching: one thread owns the Engine and decodes every running request in one batch.

    scheduler = Scheduler(engine, AdapterPool(engine), max_batch=8)
    scheduler.start()
    tokens, reason = scheduler.generate(Request(prompt_ids=[5, 6, 7], entry="sql", max_tokens=16))

Each iteration is one token boundary:

1. commands from other threads run (adapter load / unload, through :meth:`Scheduler.call`);
2. cancelled and timed-out requests leave (their rows are dropped from the cache);
3. waiting requests are admitted, up to ``max_batch`` rows, once their adapters are resident;
4. the admitted ones are prefilled as their own mini-batch (prefix / prompt K/V in front, exactly
   as ``Engine.generate_ids``), their first token sampled, and they join the running batch
   (``batch.join_states``: K/V left-padded to a common length, concatenated on the batch axis);
5. one decode step runs for the whole batch, each row with its own adapter (the routing plan is
   rebuilt only when the rows changed); finished rows leave.

Greedy rows give the tokens the same request gives alone. Tokens and the end of each request are
reported through the request's ``on_event`` callback, called on the scheduler thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from adaptkit.compositions import RowEntry, members_of
from adaptkit.errors import (
    AdaptkitError,
    EngineStateError,
    InvalidArgumentError,
    QueueFullError,
    RequestError,
)
from adaptkit.generation import MIN_TEMPERATURE, Penalties, check_sampling, new_cache, sample_next
from adaptkit.serving.batch import DecodeState, check_joinable, join_states, select_rows
from adaptkit.serving.residency import AdapterPool

log = logging.getLogger(__name__)
READ_WAIT_S = 0.005  # how long admission waits for a cold adapter's files when a row is free


@dataclass(frozen=True)
class Token:
    """One generated token of a request; with ``Request.logprobs``, its log-probability under the model
    (``log_softmax`` of the raw logits) and the ``top`` most likely (token, log-probability) pairs."""

    id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] | None = None


@dataclass(frozen=True)
class Finished:
    """The end of a request: ``reason`` is stop, length, cancelled, timeout or error."""

    reason: str
    tokens: int
    error: Exception | None = None


Event = Token | Finished


@dataclass(eq=False)
class Request:
    """One generation: prompt token ids, the row's adapter entry, sampling and limits."""

    prompt_ids: list[int]
    entry: RowEntry = None
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_ids: frozenset[int] | None = None  # None: the model's eos ids; empty: never stop early
    timeout: float | None = None  # seconds from submission
    logprobs: int | None = None  # report each token's log-probability and this many alternatives
    penalties: Penalties | None = None  # logit_bias, min_tokens, repetition / frequency / presence
    on_event: Callable[[Event], None] = field(default=lambda event: None, repr=False)
    prompt_param: str = "prompt"  # the request field a too-long prompt is reported on
    submitted: float = field(default_factory=time.monotonic)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    _finished: bool = field(default=False, repr=False)  # its Finished event was sent; nothing more is

    def cancel(self) -> None:
        """Stop this request at the next token boundary (its row leaves the batch)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def expired(self, now: float) -> bool:
        return self.timeout is not None and now - self.submitted > self.timeout


@dataclass(eq=False)
class _Row:
    request: Request
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    produced: int = 0
    next_token: int = 0
    counts: torch.Tensor | None = None  # [V] output token counts (penalties only)
    seen: torch.Tensor | None = None  # [V] tokens of the prompt or the output (penalties only)

    def shaped(self, logits: torch.Tensor) -> torch.Tensor:
        """This row's logits [V] after its penalties (unchanged without any)."""
        penalties = self.request.penalties
        if penalties is None or not penalties.active:
            return logits
        if self.counts is None:
            self.counts = torch.zeros(logits.shape[-1], device=logits.device)
            self.seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            self.seen[torch.tensor(self.request.prompt_ids, device=logits.device)] = True
        return penalties.apply(logits, self.counts, self.seen, self.produced, self.stop_ids)

    def record(self, token: int) -> None:
        if self.counts is not None:
            self.counts[token] += 1
            self.seen[token] = True


class Scheduler:
    """Owns an Engine on one thread; requests join and leave its running batch at token boundaries."""

    def __init__(self, engine, pool: AdapterPool | None = None, max_batch: int = 8, max_queue: int = 64,
                 context_length: int | None = None):
        if max_batch < 1 or max_queue < 0:
            raise InvalidArgumentError(f"max_batch must be >= 1 and max_queue >= 0 (got {max_batch}, {max_queue})")
        self.engine = engine
        self.pool = pool if pool is not None else AdapterPool(engine)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context_length = context_length
        self.seq2seq = engine.base.facts.spec.is_seq2seq  # encoder-decoders decode in waves (see _step_wave)
        # a causal LM that places tokens by their count (BlenderbotSmall) decodes only rows that started
        # together with prompts of one length: joined rows sit behind padding, which shifts its positions
        self.lockstep = not self.seq2seq and not engine.base.facts.pads_exactly
        if max_batch > 1 and not self.seq2seq:
            check_joinable(new_cache(engine.model))  # refuse a cache layout that cannot join now, not mid-run
        self.eos_ids, self.pad_id = engine.stop_and_pad_ids()
        self.stats: Counter[str] = Counter()  # steps, rows_decoded, prefills, finished_<reason>
        self._waiting: deque[Request] = deque()
        self._commands: deque[tuple[Callable, Future]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.pool.on_read = self._wake.set  # a cold adapter's files are read: admit its request now
        self._rows: list[_Row] = []
        self._state: DecodeState | None = None
        self._admitted: list[Request] = []  # admitted this step, until they join the batch
        self._wave: tuple[Callable, list[_Row]] | None = None  # encoder-decoders: (decoder step, the wave's rows)
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- other threads
    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._run, name="adaptkit-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Finish the running and waiting requests with an error and end the thread."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def alive(self) -> bool:
        """Whether the scheduler thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, request: Request) -> Request:
        """Queue ``request``; raises QueueFullError when ``max_queue`` requests already wait."""
        check_sampling(request.temperature, request.top_p, request.top_k, request.max_tokens)
        if not request.prompt_ids:
            raise InvalidArgumentError("the prompt has no tokens")
        if request.seed is not None and not (isinstance(request.seed, int) and 0 <= request.seed < 2**63):
            raise RequestError(f"seed must be an integer in [0, 2**63), got {request.seed!r}", param="seed")
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are waiting (the limit); retry later")
            self._waiting.append(request)
        self.pool.prefetch(members_of(request.entry))  # a cold adapter's files are read from now on
        self._wake.set()
        return request

    def call(self, fn: Callable[[], object]) -> Future:
        """Run ``fn`` on the scheduler thread between two steps (engine changes happen only there); once the
        scheduler is stopping, the future fails at once."""
        future: Future = Future()
        with self._lock:
            if self._stopping:
                future.set_exception(EngineStateError("the server is shutting down"))
                return future
            self._commands.append((fn, future))
        self._wake.set()
        return future

    def generate(self, request: Request) -> tuple[list[int], str]:
        """Submit and wait: (the new tokens, the finish reason). Raises the request's error, if any."""
        tokens, done = [], threading.Event()
        end: list[Finished] = []

        def collect(event: Event) -> None:
            if isinstance(event, Token):
                tokens.append(event.id)
            else:
                end.append(event)
                done.set()

        request.on_event = collect
        self.submit(request)
        done.wait()
        if end[0].error is not None:
            raise end[0].error
        return tokens, end[0].reason

    def snapshot(self) -> dict:
        """What the scheduler holds now: waiting and running counts, running rows' entries, resident adapters."""
        rows = list(self._rows)
        return {"waiting": len(self._waiting), "running": len(rows),
                "running_entries": [row.request.entry for row in rows], "resident": self.pool.resident}

    def in_use(self) -> frozenset[str]:
        """Adapters some running request uses (never evicted or unloaded)."""
        return frozenset(name for row in list(self._rows) for name in members_of(row.request.entry))

    # ----------------------------------------------------------------- the scheduler thread
    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopping:
                if not self._rows:
                    self._wake.wait(timeout=0.05)  # idle: wake on submit / call / stop (and check timeouts)
                self._wake.clear()
                try:
                    self._step()
                except Exception as exc:  # a failed forward ends every running row, never the thread
                    log.exception("decode step failed")
                    self._finish_rows(range(len(self._rows)), "error", exc)
                    self._finish_admitted(exc)
        error = EngineStateError("the server is shutting down")
        self._finish_rows(range(len(self._rows)), "error", error)
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
            commands, self._commands = list(self._commands), deque()
        for request in waiting:
            self._emit(request, Finished("error", 0, error))
        for _, future in commands:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)

    def _finish_admitted(self, error: Exception) -> None:
        """Requests admitted this step that have not ended (their step failed) end with ``error``."""
        for request in self._admitted:
            self._emit(request, Finished("error", 0, error))
        self._admitted = []

    def _step(self) -> None:
        if self.seq2seq:
            return self._step_wave()
        self._run_commands()
        now = time.monotonic()
        self._drop_left(now)
        self._admitted = admitted = [] if self.lockstep and self._rows else self._admit(now)
        if admitted and self.lockstep:
            admitted = self._first_group(admitted)
        if admitted:
            self._prefill(admitted)
        self._admitted = []
        if self._rows:
            self._decode()

    def _step_wave(self) -> None:
        """Encoder-decoders: requests decode in waves. When none is running, the waiting ones are admitted
        (up to ``max_batch``), their encoder runs once and their decoder steps together; a wave's rows leave
        as they finish, and new requests start the next wave (each row's cross-attention is its own prompt's)."""
        self._run_commands()
        now = time.monotonic()
        self._drop_left(now)
        if self._wave is None:
            self._admitted = admitted = self._admit(now)
            if admitted:
                self._start_wave(admitted)
            self._admitted = []
            return
        step, rows = self._wave
        tokens = torch.tensor([row.next_token if row in self._rows else self.pad_id for row in rows],
                              dtype=torch.long, device=self.engine.device)
        logits = step(tokens)
        self.stats["steps"] += 1
        self.stats["rows_decoded"] += len(self._rows)
        active = [i for i, row in enumerate(rows) if row in self._rows]
        keep = set(self._advance([rows[i] for i in active], logits[active]))
        done = [j for j in range(len(active)) if j not in keep]
        if done:
            self._remove_rows(done)

    def _first_group(self, requests: list[Request]) -> list[Request]:
        """The admitted requests that can share forwards with the first (``Engine._row_groups``: BART, one
        decoder prefix length; a count-placing causal LM, one prompt and virtual length); the others go back to
        the front of the queue, in order."""
        plan = self.engine.plan([r.entry for r in requests], len(requests))
        group = self.engine._row_groups(plan, [len(r.prompt_ids) for r in requests])[0]
        later = [r for i, r in enumerate(requests) if i not in group]
        if later:
            with self._lock:
                self._waiting.extendleft(reversed(later))
        self._admitted = [requests[i] for i in group]
        return self._admitted

    def _start_wave(self, requests: list[Request]) -> None:
        requests = self._first_group(requests)
        try:
            logits, step = self.engine.start_seq2seq([r.prompt_ids for r in requests], [r.entry for r in requests],
                                                     self.pad_id)
        except Exception as exc:
            for request in requests:
                self._emit(request, Finished("error", 0, exc))
            return
        self.stats["prefills"] += 1
        rows = [self._new_row(r) for r in requests]
        keep = self._advance(rows, logits)
        self._rows = [rows[i] for i in keep]
        self._wave = (step, rows) if self._rows else None

    def _run_commands(self) -> None:
        while self._commands:
            with self._lock:
                fn, future = self._commands.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as exc:
                    future.set_exception(exc)

    def _drop_left(self, now: float) -> None:
        """Cancelled or timed-out running rows leave the batch."""
        for reason, test in (("cancelled", lambda r: r.cancelled), ("timeout", lambda r: r.expired(now))):
            gone = [i for i, row in enumerate(self._rows) if test(row.request)]
            if gone:
                self._finish_rows(gone, reason)

    def _admit(self, now: float) -> list[Request]:
        """Waiting requests that fit in the batch and whose adapters are (made) resident, in arrival order."""
        admitted: list[Request] = []
        pinned = set(self.in_use())
        with self._lock:
            waiting = list(self._waiting)
        for request in waiting:
            if len(self._rows) + len(admitted) >= self.max_batch:
                break
            reason = "cancelled" if request.cancelled else "timeout" if request.expired(now) else None
            error = None
            names = set(members_of(request.entry))
            if reason is None:
                try:
                    if not self.pool.fits(names):
                        raise RequestError(f"{request.entry!r} needs {len(names)} adapters in memory at once; "
                                           f"this server holds at most {self.pool.max_resident}", param="adapters")
                    # a read in flight for a free row is worth a few ms: a decode step costs every row more
                    if not self.pool.make_resident(names, pinned, wait=READ_WAIT_S):
                        continue  # its adapters wait for their files or for room; later requests may still fit
                    self._check_context(request)
                except AdaptkitError as exc:
                    reason, error = "error", exc
            with self._lock:
                self._waiting.remove(request)
            if reason is not None:
                self._emit(request, Finished(reason, 0, error))
                continue
            admitted.append(request)
            pinned |= names
        return admitted

    def _check_context(self, request: Request) -> None:
        if self.context_length is None:
            return
        virtual = sum(self.engine.adapters[n].details.get("virtual_tokens", 0) for n in members_of(request.entry))
        used = len(request.prompt_ids) + virtual
        if used + request.max_tokens > self.context_length:
            param = request.prompt_param if used > self.context_length else "max_tokens"
            raise RequestError(
                f"this model's maximum context length is {self.context_length} tokens; the request needs "
                f"{used + request.max_tokens} ({len(request.prompt_ids)} prompt + {virtual} virtual tokens of its "
                f"adapters + max_tokens {request.max_tokens}); shorten the prompt or lower max_tokens",
                param=param, code="context_length_exceeded")

    def _prefill(self, requests: list[Request]) -> None:
        """Prefill the admitted requests together; if that fails, each alone (only the faulty one fails)."""
        try:
            groups = [(requests, self.engine.prefill([r.prompt_ids for r in requests], [r.entry for r in requests],
                                                     self.pad_id))]
        except Exception:  # find the faulty one: each alone
            groups = []
            for request in requests:
                try:
                    groups.append(([request], self.engine.prefill([request.prompt_ids], [request.entry], self.pad_id)))
                except Exception as exc:
                    self._emit(request, Finished("error", 0, exc))
        for group, (logits, state) in groups:
            self.stats["prefills"] += 1
            rows = [self._new_row(r) for r in group]
            keep = self._advance(rows, logits)
            if keep:
                state = select_rows(state, keep)
                self._state = join_states(self._state, state)
                self._rows += [rows[i] for i in keep]

    def _new_row(self, request: Request) -> _Row:
        generator = None
        if request.temperature >= MIN_TEMPERATURE:
            generator = torch.Generator(device=self.engine.device)
            if request.seed is not None:
                generator.manual_seed(request.seed)
            else:
                generator.seed()
        stop_ids = frozenset(self.eos_ids) if request.stop_ids is None else request.stop_ids
        return _Row(request, stop_ids, generator)

    def _decode(self) -> None:
        tokens = torch.tensor([row.next_token for row in self._rows], dtype=torch.long, device=self.engine.device)
        logits = self.engine.decode_step(self._state, tokens)
        self.stats["steps"] += 1
        self.stats["rows_decoded"] += len(self._rows)
        keep = set(self._advance(self._rows, logits))
        done = [i for i in range(len(self._rows)) if i not in keep]
        if done:
            self._remove_rows(done)

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """Sample each row's next token, report it, finish rows at a stop id or max_tokens; the rows that go on.

        A row whose logits are not finite (an adapter with broken weights), or whose sampling fails,
        ends alone with its error; the other rows go on.
        """
        tokens = self._sample(rows, logits)
        keep = []
        for i, (row, token) in enumerate(zip(rows, tokens)):
            if isinstance(token, Exception):
                self._emit(row.request, Finished("error", row.produced, token))
                continue
            row.record(token)
            row.produced += 1
            row.next_token = token
            self._emit(row.request, _token_event(token, logits[i], row.request.logprobs))
            if token in row.stop_ids:
                self._emit(row.request, Finished("stop", row.produced))
            elif row.produced >= row.request.max_tokens:
                self._emit(row.request, Finished("length", row.produced))
            else:
                keep.append(i)
                continue
            self.pool.touch(members_of(row.request.entry))
        return keep

    @staticmethod
    def _sample(rows: list[_Row], logits: torch.Tensor) -> list[int | Exception]:
        """Greedy rows in one argmax; sampled rows each with their own generator (as ``sample_next`` alone).

        A row that cannot be sampled gets its error in place of a token.
        """
        tokens: list[int | Exception] = logits.argmax(dim=-1).tolist()
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        for i, row in enumerate(rows):
            req = row.request
            if not finite[i]:
                tokens[i] = RequestError(
                    f"the model produced non-finite logits (NaN or inf) for this request with {req.entry!r}: the "
                    "adapter's weights are broken; other requests are unaffected", status=500, code="non_finite_logits")
                continue
            shaped = row.shaped(logits[i])
            if row.generator is None and shaped is logits[i]:
                continue  # plain greedy: the batch's argmax
            try:
                if row.generator is None:
                    tokens[i] = int(shaped.argmax())
                else:
                    tokens[i] = int(sample_next(shaped.unsqueeze(0), req.temperature, req.top_p, req.top_k,
                                                row.generator)[0])
            except Exception as exc:
                tokens[i] = exc
        return tokens

    def _finish_rows(self, indices, reason: str, error: Exception | None = None) -> None:
        indices = list(indices)
        for i in indices:
            row = self._rows[i]
            self._emit(row.request, Finished(reason, row.produced, error))
            self.pool.touch(members_of(row.request.entry))
        self._remove_rows(indices)

    def _remove_rows(self, indices: list[int]) -> None:
        gone = set(indices)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        self._rows = [self._rows[i] for i in keep]
        if self.seq2seq:  # the wave's decoder goes on feeding padding for the rows that left, until all have
            if not self._rows:
                self._wave = None
            return
        if not keep or self._state is None:
            self._state = None
        else:
            self._state = select_rows(self._state, keep)

    def _emit(self, request: Request, event: Event) -> None:
        if request._finished:
            return
        if isinstance(event, Finished):
            request._finished = True
            self.stats[f"finished_{event.reason}"] += 1
        try:
            request.on_event(event)
        except Exception:  # a consumer's failure must not stop the batch
            log.exception("on_event of a request failed")


def _token_event(token: int, logits: torch.Tensor, top: int | None) -> Token:
    """The event for ``token`` sampled from ``logits`` [V]; with ``top``, its log-probability and alternatives."""
    if top is None:
        return Token(token)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    alternatives = None
    if top > 0:
        values, indices = logprobs.topk(min(top, logprobs.shape[-1]))
        alternatives = tuple(zip(indices.tolist(), values.tolist()))
    return Token(token, float(logprobs[token]), alternatives)
