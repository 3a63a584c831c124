"""``adaptkit serve --ray`` on a local Ray instance (127.0.0.1): 2 replicas, 4 adapters.

The reference is the single-process server over the same base and adapters, with the same limits
and key: every answer (text, finish reason, usage; error status and body) must be the same.
Routing: each replica keeps at most 2 adapters (``max_resident=2``), so 4 adapters fill both; once
placed, every request for an adapter must reach the replica holding it (the ``x-adaptkit-replica``
and ``x-adaptkit-routing`` response headers, and each replica's counters in ``/metrics``). Last, one
replica's process is killed while it decodes: every request must still be answered, identically.
"""

from __future__ import annotations

import json
import os
import re
import signal
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import openai
import psutil
import pytest
from serve_helpers import wait_until, write_adapters

import adaptkit as ak
from adaptkit.serving.cluster import RayServer
from adaptkit.serving.guards import Limits
from adaptkit.serving.server import BackgroundServer, Server

ADAPTERS = ("lora1", "lora2", "prefix", "prompt")
KEY = "ray-test-key"
LIMITS = Limits(max_body_bytes=32_000, max_prompt_chars=2_000)
PROMPTS = ["the quick brown fox", "adaptkit serves many adapters", "SELECT name FROM", "LoRA adds a low-rank"]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from adaptkit.demo import build_tiny_model

    root = tmp_path_factory.mktemp("ray")
    base = build_tiny_model(root / "base", "llama", max_position_embeddings=1024)
    adapter_dir = root / "adapters"
    paths = write_adapters(base, adapter_dir, ADAPTERS)
    write_adapters(base, adapter_dir, ("bottleneck", "lora3"), seed=7)  # loaded at runtime
    options = dict(adapter_dir=adapter_dir, allow_runtime_loading=True, api_key=KEY, limits=LIMITS, max_batch=16)
    single = Server(ak.Engine.from_pretrained(base), paths, **options)
    distributed = RayServer(base, paths, replicas=2, max_resident=2, **options)
    with BackgroundServer(single) as one, BackgroundServer(distributed) as ray_front:
        yield SimpleNamespace(single=one.url, ray=ray_front.url)


def client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"authorization": f"Bearer {KEY}"}, timeout=300)


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=300)


def answer(url: str, job: dict) -> dict:
    """What a request's answer says, without what differs between two servers (ids, times)."""
    oa = openai_client(url)
    if job["kind"] == "chat":
        out = oa.chat.completions.create(model=job["model"], messages=[{"role": "user", "content": job["prompt"]}],
                                         max_tokens=job["max_tokens"], temperature=job["temperature"], seed=job["seed"])
        text = out.choices[0].message.content
    elif job["kind"] == "stream":
        pieces = oa.completions.create(model=job["model"], prompt=job["prompt"], max_tokens=job["max_tokens"],
                                       temperature=job["temperature"], seed=job["seed"], stream=True)
        text = "".join(p.choices[0].text for p in pieces if p.choices)
        return {"text": text}
    else:
        out = oa.completions.create(model=job["model"], prompt=job["prompt"], max_tokens=job["max_tokens"],
                                    temperature=job["temperature"], seed=job["seed"])
        text = out.choices[0].text
    return {"text": text, "finish": out.choices[0].finish_reason, "usage": out.usage.model_dump()}


def jobs(count: int, models, max_tokens: int = 8) -> list[dict]:
    kinds = ("completion", "chat", "completion", "stream")
    return [{"model": models[i % len(models)], "prompt": PROMPTS[i % len(PROMPTS)], "kind": kinds[i % 4],
             "max_tokens": max_tokens, "temperature": 0.8 if i % 3 == 0 else 0.0, "seed": i} for i in range(count)]


def concurrently(url: str, work: list[dict], threads: int = 32) -> list[dict]:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda job: answer(url, job), work))


def metrics(url: str) -> dict[tuple, float]:
    """``{(name, frozenset of labels): value}`` of a Prometheus text page."""
    found = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            name, _, labels = head.partition("{")
            found[(name, frozenset(re.findall(r'(\w+)="([^"]*)"', labels)))] = float(value)
    return found


def settled_metrics(url: str) -> dict[tuple, float]:
    """``/metrics`` once two reads a report interval apart agree (replicas report every REPORT_EVERY s)."""
    import time

    from adaptkit.serving.replica import REPORT_EVERY

    last = None

    def same_twice():
        nonlocal last
        now = metrics(url)
        same, last = now == last, now
        if not same:
            time.sleep(2 * REPORT_EVERY)
        return same and now

    return wait_until(same_twice, "the replicas' reports to settle", limit=60, every=0)


def per_replica(values: dict, name: str, **labels) -> dict[str, float]:
    """``{replica: value}`` of the samples of ``name`` carrying ``labels``, summed over their other labels."""
    out: dict[str, float] = {}
    for (metric, sample), value in values.items():
        sample = dict(sample)
        if metric == name and all(sample.get(k) == v for k, v in labels.items()):
            out[sample["replica"]] = out.get(sample["replica"], 0) + value
    return out


@pytest.mark.parametrize("case", ["replicas without ray", "no base", "bad adapter"])
def test_cli_refuses_bad_input_before_deploying(tmp_path, tiny_llama, case):
    from click.testing import CliRunner

    from adaptkit.cli.main import main

    base, extra = str(tiny_llama), ["--ray"]
    if case == "replicas without ray":
        extra = ["--replicas", "2"]
    elif case == "no base":
        base = str(tmp_path / "missing")
    else:
        (tmp_path / "junk").mkdir()
        extra += ["--adapters", f"junk={tmp_path / 'junk'}"]
    result = CliRunner().invoke(main, ["serve", base, *extra])
    expected = {"replicas without ray": (2, "--replicas needs --ray"), "no base": (1, "no config.json"),
                "bad adapter": (1, "junk")}[case]
    assert (result.exit_code, expected[1] in result.output) == (expected[0], True), result.output
    assert "Traceback" not in result.output


def test_32_concurrent_requests_equal_the_single_process_server(servers):
    work = jobs(32, ["base", *ADAPTERS])
    assert concurrently(servers.ray, work) == concurrently(servers.single, work)


def placed(url: str) -> dict[str, str]:
    """Send each adapter one request at a time until a whole round is served by the replicas already
    holding them (Ray Serve's router learns what a replica holds a moment after it loads it)."""
    previous = {}

    def round_is_stable():
        nonlocal previous
        with client(url) as http:
            seen = {}
            for name in ADAPTERS:
                reply = http.post("/v1/completions", json={"model": name, "prompt": "warm", "max_tokens": 1})
                assert reply.status_code == 200, reply.text
                seen[name] = (reply.headers["x-adaptkit-replica"], reply.headers["x-adaptkit-routing"])
        stable = seen == previous and all(outcome == "hit" for _, outcome in seen.values())
        previous = seen
        return stable

    wait_until(round_is_stable, "every adapter resident on one replica", limit=120, every=0.2)
    return {name: replica for name, (replica, _) in previous.items()}


def test_requests_for_an_adapter_go_to_the_replica_that_holds_it(servers):
    home = placed(servers.ray)
    assert len(set(home.values())) == 2  # 2 adapters per replica: both replicas hold some
    before = settled_metrics(servers.ray)
    work = [{"model": ADAPTERS[i % 4], "prompt": PROMPTS[i % 4], "max_tokens": 6} for i in range(32)]

    def send(job):
        with client(servers.ray) as http:
            reply = http.post("/v1/completions", json=job)
            assert reply.status_code == 200, reply.text
            return job["model"], reply.headers["x-adaptkit-replica"], reply.headers["x-adaptkit-routing"]

    with ThreadPoolExecutor(32) as pool:
        served = list(pool.map(send, work))
    for name, replica, outcome in served:
        assert (replica, outcome) == (home[name], "hit"), name
    after = settled_metrics(servers.ray)  # each replica's own counters say the same, no load in between
    for name in ADAPTERS:
        for replica in set(home.values()):
            for outcome, expected in (("hit", 8 if replica == home[name] else 0), ("miss", 0)):
                grew = (per_replica(after, "adaptkit_routing_total", adapter=name, outcome=outcome).get(replica, 0)
                        - per_replica(before, "adaptkit_routing_total", adapter=name, outcome=outcome).get(replica, 0))
                assert grew == expected, (name, replica, outcome)
            requests = (per_replica(after, "adaptkit_requests_total", model=name).get(replica, 0)
                        - per_replica(before, "adaptkit_requests_total", model=name).get(replica, 0))
            assert requests == (8 if replica == home[name] else 0), (name, replica)
    assert per_replica(after, "adaptkit_adapter_loads_total") == per_replica(before, "adaptkit_adapter_loads_total")
    cards = {card["id"]: card for card in client(servers.ray).get("/v1/models").json()["data"]}
    assert {name: cards[name]["replicas"] for name in ADAPTERS} == {name: [home[name]] for name in ADAPTERS}


def test_runtime_load_and_unload_reach_every_replica(servers):
    def registered() -> set[float]:
        return set(per_replica(metrics(servers.ray), "adaptkit_registered_adapters").values())

    def both(path: str, body: dict) -> list[httpx.Response]:
        return [client(url).post(path, json=body) for url in (servers.single, servers.ray)]

    body = {"lora_name": "tone", "lora_path": "bottleneck"}
    assert [r.status_code for r in both("/v1/load_lora_adapter", body)] == [200, 200]
    job = {"model": "tone", "prompt": "the quick", "kind": "completion", "max_tokens": 8, "temperature": 0.0,
           "seed": 0}
    assert answer(servers.ray, job) == answer(servers.single, job)  # at once: the request carries the version
    wait_until(lambda: registered() == {5.0}, "both replicas serving 5 adapters", limit=30, every=0.1)
    taken = both("/v1/load_lora_adapter", body)
    assert taken[0].status_code == taken[1].status_code == 400 and taken[0].json() == taken[1].json()
    # the same name from another folder at once (no report in between): the replica that held the old
    # weights (where its requests are routed) serves the new ones
    assert [r.status_code for r in both("/v1/unload_lora_adapter", {"lora_name": "tone"})] == [200, 200]
    assert [r.status_code for r in both("/v1/load_lora_adapter", {**body, "lora_path": "lora3"})] == [200, 200]
    expected = answer(servers.single, job)
    assert expected != answer(servers.single, {**job, "model": "base"})
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda _: answer(servers.ray, job), range(8))) == [expected] * 8
    assert [r.status_code for r in both("/v1/unload_lora_adapter", {"lora_name": "tone"})] == [200, 200]
    wait_until(lambda: registered() == {4.0}, "both replicas back to 4 adapters", limit=30, every=0.1)
    gone = both("/v1/completions", {"model": "tone", "prompt": "x"})
    assert [r.status_code for r in gone] == [404, 404] and gone[0].json() == gone[1].json()
    again = both("/v1/unload_lora_adapter", {"lora_name": "tone"})
    assert again[0].status_code == again[1].status_code == 404 and again[0].json() == again[1].json()


@pytest.mark.parametrize("case", ["no key", "wrong key", "unknown model", "bad field", "long prompt", "big body",
                                  "unknown mix member", "path outside adapter dir"])
def test_key_limits_and_errors_equal_the_single_process_server(servers, case):
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    path, body = "/v1/completions", {"model": "lora1", "prompt": "hi", "max_tokens": 2}
    if case == "no key":
        headers.pop("authorization")
    elif case == "wrong key":
        headers["authorization"] = "Bearer nope"
    elif case == "unknown model":
        body["model"] = "nobody"
    elif case == "bad field":
        body["temperature"] = -1
    elif case == "long prompt":
        body["prompt"] = "x" * 2_001
    elif case == "big body":
        body["prompt"] = [5] * 20_000
    elif case == "unknown mix member":
        body.update(model="base", adapters={"lora1": 0.5, "nobody": 0.5})
    elif case == "path outside adapter dir":
        path, body = "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "../base"}
    replies = [httpx.post(url + path, content=json.dumps(body), headers=headers) for url in servers.__dict__.values()]
    assert replies[0].status_code >= 400
    assert (replies[0].status_code, replies[0].json()) == (replies[1].status_code, replies[1].json())


def test_a_local_ray_instance_listens_on_127_0_0_1_only(servers):
    """Every socket of the local instance is on 127.0.0.1, but one: Ray Serve (>= 2.54) binds each replica's
    inter-deployment gRPC server to [::] and offers no setting for it (ray-project/ray#64544); that port
    must refuse any call without the instance's token (Ray's token authentication)."""
    import grpc

    listening, outside = set(), []
    for process in psutil.Process().children(recursive=True):
        try:
            for socket in process.net_connections(kind="inet"):
                if socket.status == psutil.CONN_LISTEN:
                    listening.add((process.name(), socket.laddr.ip, socket.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    assert listening, "found none of Ray's processes"
    for name, ip, port in sorted(listening):
        if ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
            continue
        outside.append(name)
        assert name.startswith("ray::ServeReplica:adaptkit:"), (name, ip, port)
        call = grpc.insecure_channel(f"127.0.0.1:{port}").unary_unary("/ray.serve.ASGIService/HandleRequest")
        with pytest.raises(grpc.RpcError) as refused:
            call(b"", timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, port)
    assert len(outside) <= 3  # the registry and the two engine replicas, one port each


def test_a_replica_killed_mid_run_every_request_is_still_answered(servers):
    """16 long requests over both replicas and one stream on the victim; the victim is SIGKILLed while all
    decode. Every request is answered as the single-process server answers it (the gateway sends the victim's
    again); the stream, whose first tokens were out, ends with an error event and [DONE] instead of hanging."""
    home = placed(servers.ray)
    victim = home["lora1"]
    pid = httpx.get(servers.ray + "/health").json()["replicas"][victim]["pid"]
    work = jobs(16, ADAPTERS, max_tokens=400)
    for job in work:
        job["kind"] = "completion" if job["kind"] == "stream" else job["kind"]  # streams are the case below
    expected = concurrently(servers.single, work, threads=16)
    retries = metrics(servers.ray)[("adaptkit_gateway_retries_total", frozenset())]
    stream = {"model": "lora1", "prompt": "stream", "max_tokens": 600, "stream": True, "ignore_eos": True}
    with client(servers.ray) as http, http.stream("POST", "/v1/completions", json=stream) as streamed, \
            ThreadPoolExecutor(16) as pool:
        assert streamed.headers["x-adaptkit-replica"] == victim
        events = streamed.iter_lines()
        first = next(line for line in events if line.startswith("data: "))
        answers = pool.map(lambda job: answer(servers.ray, job), work)

        def busy_replicas():
            running = per_replica(metrics(servers.ray), "adaptkit_running_requests")
            return len([n for n in running.values() if n > 0]) == 2

        wait_until(busy_replicas, "both replicas decoding", limit=60, every=0.05)
        os.kill(pid, signal.SIGKILL)
        answers = list(answers)
        rest = [line for line in events if line.startswith("data: ")]
    assert answers == expected
    assert metrics(servers.ray)[("adaptkit_gateway_retries_total", frozenset())] > retries
    assert json.loads(first[6:])["choices"][0]["text"] is not None
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["error"]["code"] == "replica_unavailable"


@pytest.mark.parametrize("case", ["backpressure", "adaptkit error", "other error"])
def test_failures_inside_ray_become_openai_errors_without_remote_tracebacks(case):
    from ray.exceptions import RayTaskError
    from ray.serve.exceptions import BackPressureError

    from adaptkit.errors import EngineStateError
    from adaptkit.serving.api import error_body
    from adaptkit.serving.gateway import _served_error

    trace = "Traceback (most recent call last):\n  File \"replica.py\", line 1, in forward\nsecret internals"
    raised = {"backpressure": BackPressureError(num_queued_requests=64, max_queued_requests=64),
              "adaptkit error": RayTaskError("forward", trace, EngineStateError("the server is shutting down")),
              "other error": RayTaskError("forward", trace, KeyError("slot"))}[case]
    status, body = error_body(_served_error(raised))
    expected = {"backpressure": (429, "every replica's queue is full (--max-queue); retry later"),
                "adaptkit error": (409, "the server is shutting down"),
                "other error": (500, "internal error in a replica: KeyError: 'slot'")}[case]
    assert (status, body["error"]["message"]) == expected
    assert "Traceback" not in json.dumps(body) and "secret" not in json.dumps(body)
