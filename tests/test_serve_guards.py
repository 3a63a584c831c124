"""``adaptkit serve`` under attack, on 127.0.0.1: each finding of the probe, reproduced and now handled.

Poison requests fail alone; limits answer 413/400 and cut slow or surplus connections; the API key;
containment at every read; client errors are 4xx on a connection that stays usable; the engine is
safe across threads.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from conftest import random_ids
from serve_helpers import wait_until, write_adapters

import adaptkit as ak
from adaptkit.demo import random_lora
from adaptkit.formats.peft import write_lora
from adaptkit.serving.guards import Limits
from adaptkit.serving.server import BackgroundServer, Server

PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("guard-adapters")
    write_adapters(tiny_llama, root, names=("lora", "prefix"))
    return root


def nan_lora(base):
    adapter = random_lora(base, ("q_proj", "v_proj"), seed=3)
    for weights in adapter.layers.values():
        weights.lora_B.data.fill_(float("nan"))
    return adapter


def complete(url: str, client=None, **fields) -> httpx.Response:
    body = {"model": "lora", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True, **fields}
    return (client or httpx).post(url + "/v1/completions", content=json.dumps(body),
                                  headers={"content-type": "application/json"}, timeout=120)


def greedy(engine, entry, n) -> str:
    tokens = engine.generate_ids([PROMPT], [entry], max_new_tokens=n, eos_token_id=-1)[0]
    return engine.tokenizer.decode(tokens, skip_special_tokens=True)


def test_a_poison_request_fails_alone_and_its_victims_finish(tiny_llama, adapter_dir):
    engine = ak.Engine.from_pretrained(tiny_llama)
    engine.add_adapter("broken", nan_lora(tiny_llama))
    server = Server(engine, {"lora": adapter_dir / "lora", "prefix": adapter_dir / "prefix"}, max_batch=12)
    reference = ak.Engine.from_pretrained(tiny_llama)
    reference.add_adapter("lora", adapter_dir / "lora")
    reference.add_adapter("prefix", adapter_dir / "prefix")
    with BackgroundServer(server) as running:
        victims = [("lora", 40), ("prefix", 40), (None, 40), ("lora", 30)]
        with ThreadPoolExecutor(len(victims)) as pool:
            futures = [pool.submit(complete, running.url, model=m or "base", max_tokens=n) for m, n in victims]
            wait_until(lambda: server.scheduler.snapshot()["running"] >= 3, "the victims to be decoding")
            poisons = {
                "seed 2**70": complete(running.url, seed=2**70, temperature=0.7),
                "mix 1e308": complete(running.url, model="base", adapters={"lora": 1e308}),
                "mix NaN": complete(running.url, model="base", adapters={"lora": float("nan")}),
                "mix Infinity": complete(running.url, model="base", adapters={"lora": float("inf")}),
                "temperature 1e-40": complete(running.url, temperature=1e-40),
                "NaN adapter, sampled": complete(running.url, model="broken", temperature=0.7, seed=1),
                "NaN adapter, greedy": complete(running.url, model="broken"),
            }
            answers = [f.result() for f in futures]
    for name in ("seed 2**70", "mix 1e308", "mix NaN", "mix Infinity"):
        assert poisons[name].status_code == 400, (name, poisons[name].text)
        assert poisons[name].json()["error"]["param"] in ("seed", "adapters"), name
    assert poisons["temperature 1e-40"].status_code == 200  # a vanishing temperature is greedy
    assert poisons["temperature 1e-40"].json()["choices"][0]["text"] == greedy(reference, "lora", 4)
    for name in ("NaN adapter, sampled", "NaN adapter, greedy"):
        assert poisons[name].status_code == 500 and poisons[name].json()["error"]["code"] == "non_finite_logits"
    for (model, n), answer in zip(victims, answers):
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == greedy(reference, model, n)


def test_request_size_limits_and_tokenizing_off_the_event_loop(tiny_llama, adapter_dir, monkeypatch):
    engine = ak.Engine.from_pretrained(tiny_llama)
    server = Server(engine, {"lora": adapter_dir / "lora"}, limits=Limits(max_body_bytes=64 * 1024,
                                                                         max_prompt_chars=10_000))
    with BackgroundServer(server) as running:
        big = complete(running.url, prompt="x" * 100_000)
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: counted as it arrives
            yield b'{"model": "lora", "prompt": "'
            for _ in range(20):
                yield b"y" * 8192
            yield b'"}'

        streamed = httpx.post(running.url + "/v1/completions", content=chunks(), timeout=60)
        assert streamed.status_code == 413
        long_prompt = complete(running.url, prompt="z" * 20_000)
        assert long_prompt.status_code == 400 and "--max-prompt-chars" in long_prompt.json()["error"]["message"]

        real_encode = engine.encode

        def slow_encode(prompts):
            time.sleep(2.0)  # a tokenizer busy with a long prompt
            return real_encode(prompts)

        monkeypatch.setattr(engine, "encode", slow_encode)
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(complete, running.url, prompt="slow to tokenize")
            time.sleep(0.3)
            start = time.monotonic()
            assert httpx.get(running.url + "/health", timeout=5).status_code == 200
            assert time.monotonic() - start < 1.0  # the event loop is not tokenizing
            assert slow.result().status_code == 200


def _open(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_slow_and_surplus_connections_are_cut(tiny_llama, adapter_dir):
    engine = ak.Engine.from_pretrained(tiny_llama)
    server = Server(engine, {"lora": adapter_dir / "lora"}, limits=Limits(read_timeout=0.5, max_connections=20))
    with BackgroundServer(server) as running:
        half = [_open(running.url) for _ in range(8)]
        for sock in half:  # headers that never end
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        trickle = _open(running.url)
        start = time.monotonic()
        cut = False
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\n":  # one byte every 0.1 s: the deadline still holds
            try:
                trickle.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                cut = True
                break
            time.sleep(0.1)
        assert cut or _closed_within(trickle, 2.0)
        assert time.monotonic() - start < 3.0
        assert all(_closed_within(sock, 2.0) for sock in half)
        crowd = [_open(running.url) for _ in range(30)]
        surplus = sum(_closed_within(sock, 0.3) for sock in crowd)
        assert surplus >= 10  # at most 20 stay open (the first are cut after their deadline too)
        wait_until(lambda: all(_closed_within(sock, 0.05) for sock in crowd), "the crowd to be cut", limit=10)
        start = time.monotonic()
        assert httpx.get(running.url + "/health", timeout=5).status_code == 200
        assert time.monotonic() - start < 1.0
        assert complete(running.url).status_code == 200
        for sock in half + crowd + [trickle]:
            sock.close()


def test_api_key(tiny_llama, adapter_dir):
    import openai

    engine = ak.Engine.from_pretrained(tiny_llama)
    server = Server(engine, {"lora": adapter_dir / "lora"}, api_key="s3cret-key")
    with BackgroundServer(server) as running:
        missing = httpx.get(running.url + "/v1/models")
        wrong = httpx.get(running.url + "/v1/models", headers={"authorization": "Bearer s3cret-kex"})
        for answer in (missing, wrong):
            assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
        assert complete(running.url).status_code == 401
        assert httpx.get(running.url + "/health").status_code == 200
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="s3cret-key", max_retries=0)
        text = client.completions.create(model="lora", prompt=PROMPT, max_tokens=3, temperature=0).choices[0].text
        assert isinstance(text, str) and text
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=running.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_serving_beyond_loopback_without_a_key_warns(caplog):
    from adaptkit.serving.server import warn_if_unprotected

    with caplog.at_level("WARNING", logger="adaptkit.serve"):
        assert not warn_if_unprotected("127.0.0.1", None) and not warn_if_unprotected("0.0.0.0", "key")
        assert not caplog.text
        assert warn_if_unprotected("0.0.0.0", None)
    assert "without an API key" in caplog.text and "--api-key" in caplog.text


def test_containment_is_checked_at_every_read(tiny_llama, adapter_dir, tmp_path):
    """A runtime-loaded adapter is evicted, its folder replaced by a link that leads outside: refused."""
    import shutil

    served = tmp_path / "served"
    shutil.copytree(adapter_dir / "lora", served / "x")
    shutil.copytree(adapter_dir / "prefix", served / "y")
    outside = tmp_path / "outside"
    write_lora(random_lora(tiny_llama, ("q_proj",), seed=9), outside / "evil")
    engine = ak.Engine.from_pretrained(tiny_llama)
    server = Server(engine, adapter_dir=served, allow_runtime_loading=True, max_resident=1)
    with BackgroundServer(server) as running:
        for name in ("x", "y"):
            loaded = httpx.post(running.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": name})
            assert loaded.status_code == 200, loaded.text
        assert server.pool.resident == ["y"]  # x was evicted
        shutil.rmtree(served / "x")
        (served / "x").symlink_to(outside / "evil", target_is_directory=True)
        refused = complete(running.url, model="x")
        assert refused.status_code == 400 and "outside the adapter directory" in refused.json()["error"]["message"]
        assert complete(running.url, model="y").status_code == 200


def test_bad_runtime_loads_are_400_and_the_connection_stays_usable(tiny_llama, tiny_gpt2, adapter_dir, tmp_path,
                                                                   monkeypatch):
    import shutil

    served = tmp_path / "served"
    shutil.copytree(adapter_dir / "lora", served / "good")
    for name, change in (("no_r", lambda c: c.pop("r")), ("r_four", lambda c: c.update(r="four"))):
        shutil.copytree(adapter_dir / "lora", served / name)
        config = json.loads((served / name / "adapter_config.json").read_text())
        change(config)
        (served / name / "adapter_config.json").write_text(json.dumps(config))
    write_lora(random_lora(tiny_gpt2, ("c_attn",), seed=1), served / "gpt2_lora")
    engine = ak.Engine.from_pretrained(tiny_llama)
    server = Server(engine, adapter_dir=served, allow_runtime_loading=True)
    with BackgroundServer(server) as running, httpx.Client(base_url=running.url, timeout=60) as client:
        cases = [("nul", "go\x00od"), ("no_r", "no_r"), ("r_four", "r_four"), ("other_base", "gpt2_lora"),
                 ("training", "good"), ("missing", "nothing_here")]
        for name, path in cases:
            answer = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
            assert 400 <= answer.status_code < 500, (name, answer.status_code, answer.text)
            assert answer.json()["error"]["message"], name
            assert client.get("/v1/models").status_code == 200  # the same kept-alive connection
        assert engine.adapters == {}  # nothing half-loaded
        assert client.post("/v1/load_lora_adapter", json={"lora_name": "good", "lora_path": "good"}).status_code == 200
        monkeypatch.setattr(server, "model_cards", lambda: 1 / 0)  # a genuine bug
        broken = client.get("/v1/models")
        assert broken.status_code == 500 and broken.json()["error"]["type"] == "server_error"
        assert complete(running.url, client=client, model="good").status_code == 200


def test_the_engine_is_safe_across_threads(tiny_llama):
    """merge/unmerge in one thread, logits of another adapter in another: every answer is right or refused."""
    engine = ak.Engine.from_pretrained(tiny_llama)
    engine.add_adapter("a", random_lora(tiny_llama, ("q_proj", "v_proj"), seed=1))
    engine.add_adapter("b", random_lora(tiny_llama, ("q_proj", "v_proj"), seed=2))
    ids = random_ids(batch=2, seed=4)
    expected = engine.logits(ids, adapters="b")
    stop = threading.Event()

    def merging():
        while not stop.is_set():
            engine.merge("a")
            time.sleep(0)  # let the other thread in between the two
            engine.unmerge()
            time.sleep(0)

    worker = threading.Thread(target=merging)
    worker.start()
    right = refused = 0
    try:
        for _ in range(3000):
            try:
                got = engine.logits(ids, adapters="b")
            except ak.AdaptkitError as exc:
                assert "merged into the weights" in str(exc)
                refused += 1
                continue
            assert torch.equal(got, expected)
            right += 1
    finally:
        stop.set()
        worker.join()
    assert right > 0 and refused > 0 and right + refused == 3000  # both interleavings happened
