"""Adapters of four kinds for the serving tests, and small waits for server state."""

from __future__ import annotations

import time
from pathlib import Path

KINDS = ("lora", "prefix", "prompt", "bottleneck")


def write_adapters(base: Path, root: Path, names=KINDS, seed: int = 0) -> dict[str, Path]:
    """One random adapter per name (its kind: the name up to a digit suffix) for ``base``, in its own format."""
    from adaptkit.demo import random_bottleneck, random_lora, random_prefix, random_prompt
    from adaptkit.formats.adapterhub import write_bottleneck
    from adaptkit.formats.peft import write_lora
    from adaptkit.formats.peft_prompt import write_prefix, write_prompt

    paths = {}
    for i, name in enumerate(names):
        kind, s = name.rstrip("0123456789"), seed + 10 * i + 1
        if kind == "lora":
            adapter = random_lora(base, ("q_proj", "v_proj", "down_proj"), r=4, alpha=8, seed=s, std=0.2)
            paths[name] = write_lora(adapter, root / name)
        elif kind == "prefix":
            paths[name] = write_prefix(random_prefix(base, num_virtual_tokens=4, seed=s), root / name)
        elif kind == "prompt":
            paths[name] = write_prompt(random_prompt(base, num_virtual_tokens=3, seed=s), root / name)
        elif kind == "bottleneck":
            paths[name] = write_bottleneck(random_bottleneck(base, name, seed=s, std=0.3), root / name)
        else:
            raise ValueError(name)
    return paths


def reference_engine(base: Path, paths: dict[str, Path]):
    """The reference for serving tests: a separate engine with the same adapters, each request run alone."""
    import adaptkit as ak

    engine = ak.Engine.from_pretrained(base)
    for name, path in paths.items():
        engine.add_adapter(name, path)
    return engine


def wait_until(condition, what: str, limit: float = 60.0, every: float = 0.01):
    """Poll ``condition()`` until it is truthy (a guard against hangs, not a timing assertion)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"gave up waiting for {what}")


def check_concurrent_completions(base: Path, paths: dict[str, Path], prompts: list[str], requests: int,
                                 threads: int, max_batch: int = 8) -> None:
    """``requests`` greedy completions over the adapters and the base, ``threads`` at a time, through the
    openai client against a server on 127.0.0.1: each answer equals the same request alone on an engine."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    import adaptkit as ak
    from adaptkit.serving.server import BackgroundServer, Server

    reference = reference_engine(base, paths)
    server = Server(ak.Engine.from_pretrained(base), adapters=paths, max_batch=max_batch)
    models = [*paths, server.base_name]
    jobs = [(prompts[i % len(prompts)], models[i % len(models)], 4 + i % 5) for i in range(requests)]
    with BackgroundServer(server) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)

        def ask(job):
            prompt, model, tokens = job
            return client.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0).choices[0].text

        with ThreadPoolExecutor(threads) as pool:
            answers = list(pool.map(ask, jobs))
    for (prompt, model, tokens), answer in zip(jobs, answers):
        entry = None if model == server.base_name else model
        assert answer == reference.generate([prompt], adapters=[entry], max_new_tokens=tokens)[0], (prompt, model)
