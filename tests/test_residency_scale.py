"""Many adapters registered, few resident: folders registered by name, files read off the decode loop.

Every generated text is compared with the engine's own greedy output for the same request alone.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_helpers import wait_until

import adaptkit as ak
from adaptkit.demo import random_lora
from adaptkit.formats.peft import write_lora
from adaptkit.serving.residency import AdapterPool
from adaptkit.serving.scheduler import Request, Scheduler
from adaptkit.serving.server import BackgroundServer, Server

COUNT = 40
TARGETS = ("q_proj", "v_proj", "down_proj")


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama, tmp_path_factory):
    """40 LoRA folders of ranks 4/6/8 (6 pads to 8), and two folders that hold no adapter."""
    root = tmp_path_factory.mktemp("many")
    for i in range(COUNT):
        write_lora(random_lora(tiny_llama, TARGETS, r=(4, 6, 8)[i % 3], alpha=8, seed=i, std=0.2), root / f"a{i:02d}")
    (root / "notes").mkdir()
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{not json")
    return root


@pytest.fixture(scope="module")
def ref(tiny_llama, adapter_dir):
    engine = ak.Engine.from_pretrained(tiny_llama)
    for i in range(COUNT):
        engine.add_adapter(f"a{i:02d}", adapter_dir / f"a{i:02d}")
    return engine


def greedy(ref, name: str, prompt: list[int], n: int) -> list[int]:
    return ref.generate_ids([prompt], [name], max_new_tokens=n, eos_token_id=-1)[0]


def test_register_all_serves_every_folder_with_few_resident(tiny_llama, adapter_dir, ref):
    engine = ak.Engine.from_pretrained(tiny_llama)
    server = Server(engine, adapter_dir=adapter_dir, register_all=True, max_resident=4, max_batch=6)
    assert server.pool.count == COUNT and server.pool.resident == [] and engine.adapters == {}
    assert all(server.pool.kind_of(f"a{i:02d}") == "lora" for i in range(COUNT))  # read from the configs alone
    jobs = [(f"a{(7 * j) % COUNT:02d}", [5 + j % 7, 9, 11 + j % 3]) for j in range(30)]
    with BackgroundServer(server) as running:
        models = httpx.get(running.url + "/v1/models").json()["data"]
        assert len(models) == COUNT + 1 and {"notes", "broken"}.isdisjoint(m["id"] for m in models)

        def ask(job):
            name, prompt = job
            answer = httpx.post(running.url + "/v1/completions", timeout=120, json={
                "model": name, "prompt": prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": True})
            assert answer.status_code == 200, answer.text
            return answer.json()["choices"][0]["text"]

        with ThreadPoolExecutor(8) as threads:
            texts = list(threads.map(ask, jobs))
        metrics = httpx.get(running.url + "/metrics").text
    for (name, prompt), text in zip(jobs, texts):
        assert text == ref.tokenizer.decode(greedy(ref, name, prompt, 5), skip_special_tokens=True), name
    assert len(server.pool.resident) <= 4 and sum(server.pool.evictions.values()) >= len({n for n, _ in jobs}) - 4
    assert f"adaptkit_registered_adapters {COUNT}" in metrics
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
              if line.startswith("adaptkit_lora_stack")}
    assert values["adaptkit_lora_stack_bytes"] > values["adaptkit_lora_stack_padding_bytes"] > 0
    resident = [line for line in metrics.splitlines() if line.startswith("adaptkit_resident_adapter_bytes{")]
    assert len(resident) == len(server.pool.resident) and all(float(r.split()[-1]) > 0 for r in resident)


def test_a_cold_adapter_delays_its_own_request_not_the_batch(tiny_llama, adapter_dir, ref, monkeypatch):
    """While a01's files are being read (held back here), a00's request keeps decoding and finishes."""
    from adaptkit.formats import detect

    release, reading = threading.Event(), threading.Event()
    real_read = detect.read_adapter

    def slow_read(path):
        if path.name == "a01":
            reading.set()
            assert release.wait(60)
        return real_read(path)

    monkeypatch.setattr(detect, "read_adapter", slow_read)
    engine = ak.Engine.from_pretrained(tiny_llama)
    pool = AdapterPool(engine, max_resident=2)
    pool.register("a00", adapter_dir / "a00")
    pool.register("a01", adapter_dir / "a01", load=False)
    scheduler = Scheduler(engine, pool, max_batch=4).start()
    try:
        results = {}

        def run(name, n):
            results[name] = scheduler.generate(Request(prompt_ids=[5, 6, 7], entry=name, max_tokens=n,
                                                       stop_ids=frozenset()))[0]

        cold = threading.Thread(target=run, args=("a01", 4))
        cold.start()
        wait_until(reading.is_set, "the cold adapter's read to start")
        run("a00", 12)  # returns while a01 is still being read
        assert "a01" not in results and not release.is_set()
        assert results["a00"] == greedy(ref, "a00", [5, 6, 7], 12)
        release.set()
        cold.join(60)
        assert results["a01"] == greedy(ref, "a01", [5, 6, 7], 4)
        assert pool.loads["a01"] == 1
    finally:
        release.set()
        scheduler.stop()
        pool.close()


def test_a_folder_that_fails_to_read_fails_its_request_only(tiny_llama, adapter_dir, tmp_path):
    import shutil

    shutil.copytree(adapter_dir / "a00", tmp_path / "gone")
    engine = ak.Engine.from_pretrained(tiny_llama)
    pool = AdapterPool(engine, max_resident=2)
    pool.register("gone", tmp_path / "gone", load=False)
    pool.register("a02", adapter_dir / "a02", load=False)
    (tmp_path / "gone" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    scheduler = Scheduler(engine, pool, max_batch=4).start()
    try:
        with pytest.raises(ak.AdaptkitError, match="gone"):
            scheduler.generate(Request(prompt_ids=[5, 6], entry="gone", max_tokens=3))
        tokens, _ = scheduler.generate(Request(prompt_ids=[5, 6], entry="a02", max_tokens=3, stop_ids=frozenset()))
        assert len(tokens) == 3
    finally:
        scheduler.stop()
        pool.close()


def test_inspect_reports_the_stacked_size_and_its_padding(adapter_dir):
    from click.testing import CliRunner

    from adaptkit.cli.main import main

    result = CliRunner().invoke(main, ["inspect", str(adapter_dir / "a01")])  # rank 6 pads to 8
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("resident for batched serving"))
    # q (64 -> 64), v (64 -> 32), down (128 -> 64): 8 x (128 + 96 + 192) x 2 layers x 4 bytes, a quarter padding
    assert "26.0 KiB in the layers' stacks, of which 6.5 KiB rank padding" in line
