"""``adaptkit serve`` through the official ``openai`` client, on 127.0.0.1 with an ephemeral port.

Every generated text is compared with the engine's own greedy output for the same request alone.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from click.testing import CliRunner
from serve_helpers import KINDS, reference_engine, wait_until, write_adapters

import adaptkit as ak
from adaptkit.chat import chat_prompt_ids, chat_text
from adaptkit.cli.main import main
from adaptkit.serving.server import BackgroundServer, Server
from adaptkit.serving.text import TextStream

PROMPTS = ["SELECT name FROM", "the quick brown", "Prefix tuning adds", "adaptkit serves many", "0123"]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "LoRA adds what?"}]


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-adapters")
    write_adapters(tiny_llama, root)
    write_adapters(tiny_llama, root / "spare", names=("lora2",), seed=5)  # for runtime loading
    return root


@pytest.fixture(scope="module")
def ref(tiny_llama, adapter_dir):
    """The reference: the engine's own greedy generation, each request alone."""
    return reference_engine(tiny_llama, {**{name: adapter_dir / name for name in KINDS},
                                         "lora2": adapter_dir / "spare" / "lora2"})


def expected(ref, prompt, model, n: int, chat: bool = False) -> str:
    ids = chat_prompt_ids(ref.tokenizer, prompt) if chat else ref.encode([prompt])[0]
    entry = None if model == "base" else model
    tokens = ref.generate_ids([ids], [entry], max_new_tokens=n)[0]
    return ref.tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.fixture(scope="module")
def running(tiny_llama, adapter_dir):
    engine = ak.Engine.from_pretrained(tiny_llama)
    server = Server(engine, {name: adapter_dir / name for name in KINDS}, adapter_dir=adapter_dir,
                    allow_runtime_loading=True, max_batch=16)
    with BackgroundServer(server) as bg:
        yield bg


@pytest.fixture(scope="module")
def client(running):
    return openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)


def metric(url: str, name: str, **labels) -> float:
    text = httpx.get(url + "/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{name}{{{re.escape(want)}}} (\S+)$" if labels else rf"^{name} (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_models_lists_the_base_and_each_adapter_with_its_parent(client):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) >= {"base", *KINDS}
    assert cards["base"].parent is None
    assert {cards[k].parent for k in KINDS} == {"base"}
    assert {k: cards[k].kind for k in KINDS} == {k: k for k in KINDS}


@pytest.mark.parametrize("model", ["base", "lora", "prefix"])
def test_completion_chat_and_streams_equal_the_engine(client, ref, model):
    want = expected(ref, PROMPTS[0], model, 8)
    got = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert got.choices[0].text == want and got.choices[0].finish_reason in ("length", "stop")
    assert got.usage.prompt_tokens == len(ref.encode([PROMPTS[0]])[0])
    assert got.usage.completion_tokens == 8 or got.choices[0].finish_reason == "stop"
    stream = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == want

    want_chat = expected(ref, CHAT, model, 6, chat=True)
    chat = client.chat.completions.create(model=model, messages=CHAT, max_tokens=6, temperature=0)
    assert chat.choices[0].message.content == want_chat and chat.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=6, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_chat
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_text_stream_holds_back_a_possible_stop_string(ref):
    ids = ref.tokenizer("SELECT name FROM users", add_special_tokens=False)["input_ids"]
    stream = TextStream(ref.tokenizer, ["FROM"])
    pieces = [stream.add(token) for token in ids]
    assert "".join(pieces) + stream.finish() == stream.text == "SELECT name " and stream.stopped
    plain = TextStream(ref.tokenizer)
    assert "".join(plain.add(token) for token in ids) + plain.finish() == "SELECT name FROM users"


def test_stop_strings_end_the_request(client, ref):
    full = expected(ref, PROMPTS[0], "prefix", 12)
    start = next(i for i in range(3, len(full) - 1) if full[i : i + 2].isascii() and full[i : i + 2].isalnum()
                 and full.find(full[i : i + 2]) == i)
    stop = full[start : start + 2]
    got = client.completions.create(model="prefix", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop])
    assert got.choices[0].text == full[:start] and got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens < 12
    stream = client.completions.create(model="prefix", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=stop,
                                       stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == full[:start] and chunks[-1].choices[0].finish_reason == "stop"


def test_adapters_change_outputs_and_the_fallback_chat_format(ref):
    """The reference itself: each adapter changes the text; the test tokenizer has no chat template."""
    base = expected(ref, PROMPTS[1], "base", 8)
    assert all(expected(ref, PROMPTS[1], kind, 8) != base for kind in KINDS)
    assert not getattr(ref.tokenizer, "chat_template", None)
    assert chat_text(ref.tokenizer, CHAT) == ("system: You are terse.\nuser: LoRA adds what?\nassistant:", True)


def test_a_weighted_mix_for_one_request(client, ref):
    mix = ak.Mix({"lora": 0.5, "bottleneck": 1.0})
    tokens = ref.generate_ids([ref.encode([PROMPTS[2]])[0]], [mix], max_new_tokens=6)[0]
    got = client.completions.create(model="base", prompt=PROMPTS[2], max_tokens=6, temperature=0,
                                    extra_body={"adapters": {"lora": 0.5, "bottleneck": 1.0}})
    assert got.choices[0].text == ref.tokenizer.decode(tokens, skip_special_tokens=True)


def test_32_concurrent_requests_over_4_kinds_equal_each_request_alone(client, ref, running):
    """8 threads, 32 requests (LoRA, prefix, prompt, bottleneck and the base, different lengths): each response
    equals the engine's output for that request alone and the server's answer to it sent alone."""
    models = [*KINDS, "base"]
    jobs = [(models[i % 5], PROMPTS[i % len(PROMPTS)], 3 + i % 6) for i in range(32)]

    def ask(job):
        model, prompt, n = job
        return client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0).choices[0].text

    steps, rows = metric(running.url, "adaptkit_decode_steps_total"), metric(running.url, "adaptkit_decoded_rows_total")
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, jobs))
    batched_steps = metric(running.url, "adaptkit_decode_steps_total") - steps
    batched_rows = metric(running.url, "adaptkit_decoded_rows_total") - rows
    sequential = [ask(job) for job in jobs]
    assert together == sequential == [expected(ref, prompt, model, n) for model, prompt, n in jobs]
    assert batched_rows > batched_steps  # requests for different adapters shared decode steps


def test_errors_have_the_openai_shape(client, running):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and "base, bottleneck, lora" in err.value.body["message"]
    cases = [({"model": "base", "prompt": "x", "max_tokens": 0}, "max_tokens"),
             ({"model": "base", "prompt": "x", "temperature": "hot"}, "temperature"),
             ({"model": "base"}, "prompt"),
             ({"model": "base", "prompt": "x", "n": 2, "stream": True}, "n"),
             ({"model": "base", "prompt": "x", "n": 17}, "n"),
             ({"model": "base", "prompt": "x", "logprobs": 21}, "logprobs"),
             ({"model": "base", "prompt": "x", "suffix": "y"}, "suffix"),
             ({"model": "base", "prompt": "x", "max_tokens": 0, "echo": True, "stream": True}, "stream"),
             ({"model": "lora", "prompt": "x", "adapters": {"prefix": 1.0}}, "adapters"),
             ({"model": "base", "prompt": "x " * 300, "max_tokens": 2}, "prompt"),
             ({"model": "base", "prompt": "x", "max_tokens": 256}, "max_tokens")]
    for body, field in cases:
        response = httpx.post(running.url + "/v1/completions", json=body)
        assert response.status_code == 400, body
        assert response.json()["error"]["param"] == field and response.json()["error"]["type"] == "invalid_request_error"
    too_long = httpx.post(running.url + "/v1/completions", json=cases[-2][0]).json()["error"]
    assert too_long["code"] == "context_length_exceeded" and "256" in too_long["message"]
    bad_json = httpx.post(running.url + "/v1/chat/completions", content=b"{not json")
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    assert httpx.get(running.url + "/health").json() == {"status": "ok"}


def test_timeouts_and_a_client_that_gives_up(client, running):
    """A request past its ``timeout`` answers 408; a non-streaming client that disconnects cancels its request."""
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model="lora", prompt="x", max_tokens=4, extra_body={"timeout": 1e-9})
    assert err.value.status_code == 408 and err.value.body["code"] == "timeout"
    scheduler = running.server.scheduler
    cancelled = scheduler.stats["finished_cancelled"]
    entered, gate = threading.Event(), threading.Event()
    scheduler.call(lambda: (entered.set(), gate.wait()))  # hold the batch: the request stays queued
    entered.wait()
    try:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(running.url + "/v1/completions", json={"model": "bottleneck", "prompt": "x", "max_tokens": 50},
                       timeout=0.5)
        wait_until(lambda: metric(running.url, "adaptkit_requests_total", model="bottleneck", outcome="cancelled"),
                   "the server to see the disconnect")
    finally:
        gate.set()
    wait_until(lambda: scheduler.stats["finished_cancelled"] == cancelled + 1, "the cancelled request to leave")
    assert scheduler.snapshot()["waiting"] == 0


def test_runtime_load_and_unload(client, ref, running, adapter_dir):
    url = running.url
    response = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": "spare/lora2"})
    assert response.status_code == 200 and response.json()["kind"] == "lora"
    assert "extra" in {m.id for m in client.models.list().data}
    got = client.completions.create(model="extra", prompt=PROMPTS[3], max_tokens=6, temperature=0)
    assert got.choices[0].text == expected(ref, PROMPTS[3], "lora2", 6)
    again = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": "spare/lora2"})
    assert again.status_code == 400
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "extra"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="extra", prompt="x", max_tokens=2)
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "extra"}).status_code == 404


def test_runtime_loading_refuses_paths_outside_the_adapter_dir(running, adapter_dir, tiny_llama, tmp_path):
    outside = write_adapters(tiny_llama, tmp_path, names=("lora",))["lora"]
    (adapter_dir / "link_out").symlink_to(outside, target_is_directory=True)
    inner = adapter_dir / "inner_link"
    inner.mkdir()
    for name in os.listdir(outside):  # a folder inside whose files are links to the outside
        (inner / name).symlink_to(outside / name)
    attempts = {"../" + tmp_path.name: 400, "spare/../../x": 400, str(outside): 400, "link_out": 400,
                "inner_link": 400, "missing": 404}
    for path, status in attempts.items():
        response = httpx.post(running.url + "/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": path})
        assert response.status_code == status, path
        assert response.json()["error"]["param"] == "lora_path"
    for name in ("has space", "../x", "a" * 65, "base"):
        response = httpx.post(running.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "lora"})
        assert response.status_code == 400 and response.json()["error"]["param"] == "lora_name"
    assert "evil" not in {card["id"] for card in httpx.get(running.url + "/v1/models").json()["data"]}


def test_runtime_loading_is_off_by_default(tiny_llama, adapter_dir):
    server = Server(ak.Engine.from_pretrained(tiny_llama), {"lora": adapter_dir / "lora"})
    with BackgroundServer(server) as bg:
        response = httpx.post(bg.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "lora"})
        assert response.status_code == 403 and response.json()["error"]["code"] == "runtime_loading_disabled"


def test_queue_full_answers_429_and_a_closed_stream_leaves_the_batch(tiny_llama, adapter_dir, ref):
    """One row, one queue slot: a stream runs, a second request waits, a third gets 429. Closing the stream
    cancels its row (it leaves before max_tokens), and the waiting request then runs to the right answer."""
    server = Server(ak.Engine.from_pretrained(tiny_llama), {name: adapter_dir / name for name in KINDS},
                    max_batch=1, max_queue=1)
    scheduler = server.scheduler
    with BackgroundServer(server) as bg:
        client = openai.OpenAI(base_url=bg.url + "/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(model="prefix", prompt=PROMPTS[0], max_tokens=200, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        chunks = iter(stream)
        next(chunks)
        entered, gate = threading.Event(), threading.Event()
        scheduler.call(lambda: (entered.set(), gate.wait()))  # hold the batch at a token boundary
        entered.wait()
        result = {}
        waiting = threading.Thread(target=lambda: result.update(text=client.completions.create(
            model="lora", prompt=PROMPTS[1], max_tokens=5, temperature=0).choices[0].text))
        try:
            waiting.start()
            wait_until(lambda: scheduler.snapshot()["waiting"] == 1, "the second request to queue")
            with pytest.raises(openai.RateLimitError) as err:
                client.completions.create(model="base", prompt="x", max_tokens=2)
            assert err.value.status_code == 429 and err.value.body["code"] == "queue_full"
            stream.close()
            wait_until(lambda: metric(bg.url, "adaptkit_requests_total", model="prefix", outcome="cancelled") == 1,
                       "the server to see the disconnect")
        finally:
            gate.set()
        waiting.join()
        assert result["text"] == expected(ref, PROMPTS[1], "lora", 5)
        assert scheduler.stats["finished_cancelled"] == 1 and scheduler.snapshot()["running"] == 0
        assert 0 < metric(bg.url, "adaptkit_generation_tokens_total", model="prefix") < 200
        assert metric(bg.url, "adaptkit_requests_total", model="base", outcome="queue_full") == 1


def test_residency_through_the_server(tiny_llama, adapter_dir, ref):
    """--max-resident 2 with four adapters: each request still gets its adapter's output; loads and evictions show
    in /metrics."""
    server = Server(ak.Engine.from_pretrained(tiny_llama), {name: adapter_dir / name for name in KINDS},
                    max_resident=2)
    with BackgroundServer(server) as bg:
        client = openai.OpenAI(base_url=bg.url + "/v1", api_key="unused", max_retries=0)
        order = ["lora", "prefix", "prompt", "bottleneck", "lora", "prompt"]
        for model in order:
            text = client.completions.create(model=model, prompt=PROMPTS[4], max_tokens=4, temperature=0).choices[0].text
            assert text == expected(ref, PROMPTS[4], model, 4), model
        assert server.pool.resident == ["lora", "prompt"]
        assert metric(bg.url, "adaptkit_adapter_loads_total", adapter="lora") == 2
        assert metric(bg.url, "adaptkit_adapter_evictions_total", adapter="lora") == 1
        assert metric(bg.url, "adaptkit_resident_adapters") == 2


def test_cli_serve_starts_a_server(tiny_llama, adapter_dir):
    """``adaptkit serve BASE --adapters NAME=PATH,PATH --port 0`` in a subprocess, stopped with SIGTERM."""
    command = [sys.executable, "-c", "from adaptkit.cli.main import main; main()", "serve", str(tiny_llama),
               "--adapters", f"sql={adapter_dir / 'lora'},{adapter_dir / 'prefix'}", "--port", "0"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stderr:
            found = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
            if found:
                break
        else:
            pytest.fail("the server did not start")
        cards = httpx.get(found.group(1) + "/v1/models").json()["data"]
        assert [(c["id"], c["parent"]) for c in cards] == [("base", None), ("prefix", "base"), ("sql", "base")]
    finally:
        process.terminate()
        process.wait(60)
    bad = CliRunner().invoke(main, ["serve", str(tiny_llama), "--adapters", f"a={adapter_dir / 'lora'},a=x"])
    assert bad.exit_code != 0 and "unique" in bad.output
