"""Continuous batching: cache surgery, rows joining and leaving at token boundaries, residency.

Every output is compared with the engine's own ``generate_ids`` for the same request alone.
"""

from __future__ import annotations

import threading

import pytest
import torch
from serve_helpers import wait_until, write_adapters

import adaptkit as ak
from adaptkit.errors import EngineStateError, QueueFullError, UnsupportedAdapterError
from adaptkit.serving.batch import check_joinable, join_states, select_rows
from adaptkit.serving.residency import AdapterPool
from adaptkit.serving.scheduler import Finished, Request, Scheduler, Token

PROMPTS = {None: [5, 6, 7, 8, 9, 10, 11], "lora": [12, 13, 14], "prefix": [15, 16, 17, 18, 19],
           "prompt": [20, 21], "bottleneck": [22, 23, 24, 25]}


@pytest.fixture(scope="module")
def paths(tiny_llama, tmp_path_factory):
    return write_adapters(tiny_llama, tmp_path_factory.mktemp("sched-adapters"))


@pytest.fixture(scope="module")
def ref(tiny_llama, paths):
    """The reference: a separate engine, every request run alone with generate_ids."""
    eng = ak.Engine.from_pretrained(tiny_llama)
    for name, path in paths.items():
        eng.add_adapter(name, path)
    return eng


def alone(ref, entry, n: int, **sampling) -> list[int]:
    return ref.generate_ids([PROMPTS[entry]], [entry], max_new_tokens=n, eos_token_id=-1, **sampling)[0]


def make_scheduler(tiny_llama, paths, names=None, max_resident=None, **options) -> Scheduler:
    engine = ak.Engine.from_pretrained(tiny_llama)
    pool = AdapterPool(engine, max_resident)
    for name in names or paths:
        pool.register(name, paths[name], evict=False)
    return Scheduler(engine, pool, **options)


def request(entry, n: int, **fields) -> Request:
    return Request(prompt_ids=PROMPTS[entry], entry=entry, max_tokens=n, stop_ids=frozenset(), **fields)


class Recorder:
    """on_event target: the tokens and the end of one request."""

    def __init__(self):
        self.tokens: list[int] = []
        self.end: Finished | None = None
        self.done = threading.Event()

    def __call__(self, event):
        if isinstance(event, Token):
            self.tokens.append(event.id)
        else:
            self.end = event
            self.done.set()


def pause(scheduler: Scheduler) -> threading.Event:
    """Hold the scheduler thread at its next token boundary; set the returned event to let it go on."""
    entered, gate = threading.Event(), threading.Event()
    scheduler.call(lambda: (entered.set(), gate.wait()))
    entered.wait()
    return gate


def test_joined_states_decode_like_rows_alone(ref):
    """Two prefilled states of different lengths joined, decoded, then the longer row dropped: each row's logits
    equal its own decoding alone, and the padding no row uses any more is cropped."""
    long_prompt, short_prompt = PROMPTS["prefix"] + [30, 31], PROMPTS["lora"][:2]
    _, long_alone = ref.prefill([long_prompt], ["prefix"])
    first_short, short_alone = ref.prefill([short_prompt], ["lora"])
    _, joined = ref.prefill([long_prompt], ["prefix"])
    joined = join_states(joined, ref.prefill([short_prompt], ["lora"])[1])
    assert joined.entries == ("prefix", "lora") and joined.plan is None
    assert joined.length == 4 + len(long_prompt)  # the prefix's 4 virtual tokens + the prompt
    tokens = torch.tensor([40, int(first_short.argmax())])
    for _ in range(3):
        both = ref.decode_step(joined, tokens)
        torch.testing.assert_close(both[0:1], ref.decode_step(long_alone, tokens[0:1]), atol=1e-5, rtol=0)
        expected_short = ref.decode_step(short_alone, tokens[1:2])
        torch.testing.assert_close(both[1:2], expected_short, atol=1e-5, rtol=0)
        tokens = both.argmax(dim=-1)
    select_rows(joined, [1])
    assert joined.entries == ("lora",) and joined.length == short_alone.length == len(short_prompt) + 3
    torch.testing.assert_close(ref.decode_step(joined, tokens[1:2]), ref.decode_step(short_alone, tokens[1:2]),
                               atol=1e-5, rtol=0)


def test_requests_joining_mid_decode_equal_rows_alone(tiny_llama, paths, ref):
    """A base request is decoding; four requests (LoRA, prefix, prompt, bottleneck) arrive and are prefilled together,
    join it at a token boundary and leave at different lengths: every one equals the same request alone."""
    scheduler = make_scheduler(tiny_llama, paths, max_batch=8).start()
    try:
        first = Recorder()
        scheduler.submit(request(None, 14, on_event=first))
        wait_until(lambda: first.tokens, "the first token")
        gate = pause(scheduler)
        kinds = ["lora", "prefix", "prompt", "bottleneck"]
        recorders = {kind: Recorder() for kind in kinds}
        for i, kind in enumerate(kinds):
            scheduler.submit(request(kind, 5 + 2 * i, on_event=recorders[kind]))
        gate.set()
        for recorder in [first, *recorders.values()]:
            recorder.done.wait()
        assert first.tokens == alone(ref, None, 14) and first.end.reason == "length"
        for i, kind in enumerate(kinds):
            assert recorders[kind].tokens == alone(ref, kind, 5 + 2 * i), kind
            base = ref.generate_ids([PROMPTS[kind]], [None], max_new_tokens=5 + 2 * i, eos_token_id=-1)[0]
            assert recorders[kind].tokens != base, f"{kind} does not change the output"
        assert scheduler.stats["prefills"] == 2  # the base alone, then the four together
        assert scheduler.stats["rows_decoded"] > scheduler.stats["steps"]  # rows were decoded together
        assert scheduler.snapshot()["running"] == 0
    finally:
        scheduler.stop()


def test_a_faulty_request_fails_alone(tiny_llama, paths, ref):
    """A request whose entry the engine refuses (a weighted prefix) fails; those prefilled with it do not."""
    scheduler = make_scheduler(tiny_llama, paths)
    good = {kind: Recorder() for kind in ("lora", "prefix")}
    bad = Recorder()
    for kind, recorder in good.items():
        scheduler.submit(request(kind, 4, on_event=recorder))
    scheduler.submit(Request(PROMPTS["prefix"], ak.Mix({"prefix": 0.5}), max_tokens=4, on_event=bad))
    broken = Recorder()  # a token id outside the vocabulary: the forward itself raises
    scheduler.submit(Request([5, 10**6], "lora", max_tokens=4, on_event=broken))
    scheduler.start()
    try:
        bad.done.wait()
        assert bad.end.reason == "error" and isinstance(bad.end.error, UnsupportedAdapterError) and not bad.tokens
        broken.done.wait()
        assert broken.end.reason == "error" and isinstance(broken.end.error, IndexError) and not broken.tokens
        for kind, recorder in good.items():
            recorder.done.wait()
            assert recorder.tokens == alone(ref, kind, 4)
    finally:
        scheduler.stop()


def test_seeded_sampling_equals_the_engine(tiny_llama, paths, ref):
    scheduler = make_scheduler(tiny_llama, paths).start()
    try:
        sampling = dict(temperature=0.9, top_p=0.9, top_k=50, seed=7)
        tokens, reason = scheduler.generate(request("lora", 10, **sampling))
        assert tokens == alone(ref, "lora", 10, **sampling) and reason == "length"
        assert tokens != alone(ref, "lora", 10)  # really sampled, not greedy
    finally:
        scheduler.stop()


def test_cancelled_and_timed_out_rows_leave_the_batch(tiny_llama, paths, ref):
    scheduler = make_scheduler(tiny_llama, paths).start()
    try:
        a, b, c = Recorder(), Recorder(), Recorder()
        gate = pause(scheduler)
        req_a = scheduler.submit(request("prefix", 40, on_event=a))
        scheduler.submit(request("lora", 12, on_event=b))
        req_c = scheduler.submit(request("prompt", 40, on_event=c, timeout=60.0))
        gate.set()
        wait_until(lambda: scheduler.snapshot()["running"] == 3, "three running rows")
        gate = pause(scheduler)
        req_a.cancel()
        req_c.timeout = 0.0  # its deadline has passed
        gate.set()
        a.done.wait()
        c.done.wait()
        assert a.end.reason == "cancelled" and 0 < len(a.tokens) < 40
        assert c.end.reason == "timeout" and 0 < len(c.tokens) < 40
        assert a.tokens == alone(ref, "prefix", len(a.tokens)) and c.tokens == alone(ref, "prompt", len(c.tokens))
        b.done.wait()
        assert b.tokens == alone(ref, "lora", 12)  # the row that stayed is unaffected by the others leaving
        expired = Recorder()
        scheduler.submit(request("lora", 4, on_event=expired, timeout=0.0))
        expired.done.wait()
        assert expired.end.reason == "timeout" and expired.tokens == []
        assert scheduler.stats["finished_cancelled"] == 1 and scheduler.stats["finished_timeout"] == 2
    finally:
        scheduler.stop()


def test_the_queue_is_bounded(tiny_llama, paths):
    scheduler = make_scheduler(tiny_llama, paths, names=[], max_queue=2)
    scheduler.submit(request(None, 2))
    scheduler.submit(request(None, 2))
    with pytest.raises(QueueFullError, match="2 requests are waiting"):
        scheduler.submit(request(None, 2))
    assert scheduler.snapshot()["waiting"] == 2


def test_residency_evicts_idle_adapters_and_reloads_them(tiny_llama, paths, ref):
    """At most two adapters in memory: the least recently used idle one is evicted, and reloaded on demand with the
    same outputs."""
    scheduler = make_scheduler(tiny_llama, paths, names=["lora", "prefix", "bottleneck"], max_resident=2).start()
    pool = scheduler.pool
    try:
        assert pool.resident == ["lora", "prefix"]  # registered while there was room
        first, _ = scheduler.generate(request("lora", 6))
        scheduler.generate(request("prefix", 6))
        scheduler.generate(request("bottleneck", 6))  # evicts lora, the least recently used
        assert pool.resident == ["prefix", "bottleneck"] and pool.evictions == {"lora": 1}
        assert sorted(scheduler.engine.adapters) == ["bottleneck", "prefix"]
        again, _ = scheduler.generate(request("lora", 6))  # reloaded from disk, prefix evicted
        assert again == first == alone(ref, "lora", 6)
        assert pool.loads["lora"] == 2 and pool.evictions == {"lora": 1, "prefix": 1}
    finally:
        scheduler.stop()


def test_an_adapter_in_use_is_never_evicted(tiny_llama, paths, ref):
    """One resident slot: a request for another adapter waits while a running request uses the resident one."""
    scheduler = make_scheduler(tiny_llama, paths, names=["lora", "prefix"], max_resident=1).start()
    try:
        running, waiting = Recorder(), Recorder()
        req = scheduler.submit(request("lora", 60, on_event=running))
        wait_until(lambda: running.tokens, "the first token")
        scheduler.submit(request("prefix", 5, on_event=waiting))
        seen = len(running.tokens)
        wait_until(lambda: len(running.tokens) >= seen + 5, "five more steps")
        assert scheduler.snapshot()["waiting"] == 1 and scheduler.pool.resident == ["lora"]
        unload = scheduler.call(lambda: scheduler.pool.unregister("lora", scheduler.in_use()))
        with pytest.raises(EngineStateError, match="in use by running requests"):
            unload.result()
        req.cancel()
        waiting.done.wait()
        assert waiting.tokens == alone(ref, "prefix", 5)
        assert scheduler.pool.resident == ["prefix"] and scheduler.pool.evictions == {"lora": 1}
        assert running.tokens == alone(ref, "lora", len(running.tokens))
    finally:
        scheduler.stop()


def test_sliding_window_caches_are_refused_for_batching():
    from transformers import DynamicCache, LlamaConfig, MistralConfig

    assert len(check_joinable(DynamicCache(config=LlamaConfig(num_hidden_layers=2)))) == 2
    with pytest.raises(EngineStateError, match="DynamicSlidingWindowLayer.*--max-batch 1"):
        check_joinable(DynamicCache(config=MistralConfig(num_hidden_layers=2, sliding_window=64)))


def test_a_scheduler_serves_the_adapters_its_engine_holds(tiny_llama, paths, ref):
    engine = ak.Engine.from_pretrained(tiny_llama)
    engine.add_adapter("lora", paths["lora"])
    scheduler = Scheduler(engine).start()
    try:
        assert scheduler.pool.names == ["lora"] and scheduler.pool.kind_of("lora") == "lora"
        assert scheduler.generate(request("lora", 5))[0] == alone(ref, "lora", 5)
    finally:
        scheduler.stop()
