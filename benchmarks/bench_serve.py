"""Load test of ``adaptkit serve`` on 127.0.0.1: requests/s and latency vs concurrency.

The server runs in its own process (``adaptkit serve``, the CLI) over a small random Llama with
four adapters of different kinds (LoRA, prefix, prompt, bottleneck). A closed-loop client with C
threads (C = 1, 4, 16) sends a fixed number of completion requests (greedy, ``ignore_eos``, so
every request generates exactly ``--max-tokens`` tokens) and measures each request's latency:

- mixed:        requests cycle over the base and the four adapters (one batch across adapter kinds)
- one adapter:  every request uses the LoRA
- one at a time: the mixed requests against a server started with ``--max-batch 1`` (no batching)

Concurrency 1 is the same requests sent one after the other. The server's mean batch size comes
from its ``/metrics`` (decoded rows / decode steps).

With ``--ray``: the same mixed load (the four adapters, concurrency 16) against ``adaptkit serve --ray``
on a local Ray instance with 1 and with 2 replicas, next to the single-process server (the three up
together, rounds interleaved), each with all adapters resident and with ``--max-resident 2`` (then
4 adapters fit on 2 replicas only). Reported:
throughput, latency, and the routing hit rate (requests that reached a replica already holding their
adapter, from the replicas' ``adaptkit_routing_total``). On one machine the replicas share its cores:
more replicas add adapter capacity and isolation, not compute.

    python benchmarks/bench_serve.py [--out bench-results/serve.json] [--requests 32] [--max-tokens 16]
    python benchmarks/bench_serve.py --ray [--out bench-results/serve-ray.json] [--requests 64]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from adaptkit.benchmarking.timing import format_table, percentile, write_results
from adaptkit.demo import build_tiny_model, random_bottleneck, random_lora, random_prefix, random_prompt

MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=512)
PROMPTS = ["SELECT name FROM users WHERE", "the quick brown fox jumps over the lazy", "Prefix tuning adds keys and",
           "adaptkit serves many adapters over one base", "LoRA adds a low-rank update to"]
KINDS = ("lora", "prefix", "prompt", "bottleneck")


def build(root: Path) -> tuple[Path, dict[str, Path]]:
    from adaptkit.formats.adapterhub import write_bottleneck
    from adaptkit.formats.peft import write_lora
    from adaptkit.formats.peft_prompt import write_prefix, write_prompt

    base = build_tiny_model(root / "base", "llama", **MODEL)
    adapters = {
        "lora": write_lora(random_lora(base, ("q_proj", "k_proj", "v_proj", "o_proj"), r=16, alpha=32, seed=1),
                           root / "lora"),
        "prefix": write_prefix(random_prefix(base, num_virtual_tokens=16, seed=2), root / "prefix"),
        "prompt": write_prompt(random_prompt(base, num_virtual_tokens=16, seed=3), root / "prompt"),
        "bottleneck": write_bottleneck(random_bottleneck(base, "bottleneck", seed=4), root / "bottleneck"),
    }
    return base, adapters


class ServerProcess:
    """``adaptkit serve`` in a subprocess on 127.0.0.1 with a free port."""

    def __init__(self, base: Path, adapters: dict[str, Path], max_batch: int, max_queue: int, extra=()):
        spec = ",".join(f"{name}={path}" for name, path in adapters.items())
        command = [sys.executable, "-c", "from adaptkit.cli.main import main; main()", "serve", str(base),
                   *(["--adapters", spec] if spec else []), "--port", "0", "--host", "127.0.0.1",
                   "--max-batch", str(max_batch), "--max-queue", str(max_queue), *extra]
        self.ray = "--ray" in extra
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        for line in self.process.stderr:
            found = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
            if found:
                self.url = found.group(1)
                break
        else:
            raise RuntimeError("adaptkit serve did not start")
        # keep draining stderr so the server never blocks on a full pipe
        threading.Thread(target=lambda: [None for _ in self.process.stderr], daemon=True).start()

    def metric(self, name: str, **labels) -> float:
        """The sum of ``name``'s samples carrying ``labels`` (every replica's, behind ``--ray``)."""
        total = 0.0
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            head, _, value = line.rpartition(" ")
            if head.partition("{")[0] == name and all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def run_load(server: ServerProcess, jobs: list[dict], concurrency: int) -> dict:
    """Send ``jobs`` from ``concurrency`` threads (each takes the next job when its last one is answered)."""
    latencies: list[float] = []
    failures: list[str] = []
    answers: list[str | None] = [None] * len(jobs)  # each job's text, in job order
    lock = threading.Lock()
    queue = list(reversed(list(enumerate(jobs))))

    def worker() -> None:
        with httpx.Client(base_url=server.url, timeout=600) as client:
            while True:
                with lock:
                    if not queue:
                        return
                    index, job = queue.pop()
                start = time.perf_counter()
                response = client.post("/v1/completions", json=job)
                elapsed = time.perf_counter() - start
                with lock:
                    if response.status_code == 200:
                        latencies.append(elapsed)
                        answers[index] = response.json()["choices"][0]["text"]
                    else:
                        failures.append(response.text[:200])

    steps, rows = server.metric("adaptkit_decode_steps_total"), server.metric("adaptkit_decoded_rows_total")
    hits, misses = server.metric("adaptkit_routing_total", outcome="hit"), server.metric("adaptkit_routing_total", outcome="miss")
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if server.ray:
        from adaptkit.serving.replica import REPORT_EVERY

        time.sleep(2 * REPORT_EVERY)  # the replicas' counters reach /metrics with their next report
    steps = server.metric("adaptkit_decode_steps_total") - steps
    rows = server.metric("adaptkit_decoded_rows_total") - rows
    hits = server.metric("adaptkit_routing_total", outcome="hit") - hits
    misses = server.metric("adaptkit_routing_total", outcome="miss") - misses
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. {failures[0]}")
    tokens = sum(job["max_tokens"] for job in jobs)
    return {"requests": len(jobs), "wall_s": wall, "req_per_s": len(jobs) / wall, "tokens_per_s": tokens / wall,
            "p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99),
            "mean_batch": rows / steps if steps else None, "latencies_s": latencies, "answers": answers,
            "hit_rate": hits / (hits + misses) if hits + misses else None}


def make_jobs(models: list[str], count: int, max_tokens: int) -> list[dict]:
    return [{"model": models[i % len(models)], "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
             "temperature": 0, "ignore_eos": True} for i in range(count)]


def run_ray(args) -> None:
    """Single process vs ``--ray`` with 1 and 2 replicas, all adapters resident and at most 2 per replica.

    The three servers of a setting run at the same time and take turns, round after round, so each
    ratio compares rounds measured side by side; the median round of each is kept."""
    import os

    cores = os.cpu_count() or 1
    setups = (("one process", ()),
              ("ray, 1 replica", ("--ray", "--replicas", "1", "--cpus-per-replica", str(cores))),
              ("ray, 2 replicas", ("--ray", "--replicas", "2", "--cpus-per-replica", str(max(1, cores // 2)))))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters = build(Path(tmp))
        for resident in (None, 2):
            limit = ("--max-resident", str(resident)) if resident else ()
            servers = []
            try:
                for _, extra in setups:
                    servers.append(ServerProcess(base, adapters, max_batch=16, max_queue=4 * args.requests,
                                                 extra=(*limit, *extra)))
                rounds: dict[str, list[dict]] = {name: [] for name, _ in setups}
                for server in servers:
                    run_load(server, make_jobs(list(KINDS), 16, args.max_tokens), 4)  # warm-up: adapters placed
                for _ in range(args.repeats):
                    for (name, _), server in zip(setups, servers):
                        rounds[name].append(run_load(server, make_jobs(list(KINDS), args.requests, args.max_tokens), 16))
            finally:
                for server in servers:
                    server.close()
            for name, results in rounds.items():
                median = sorted(results, key=lambda r: r["req_per_s"])[len(results) // 2]
                rows.append({"setup": name, "max_resident": resident or "all", "concurrency": 16, **median})
    for row in rows:
        one = next(r for r in rows if r["setup"] == "one process" and r["max_resident"] == row["max_resident"])
        row["vs_one_process"] = row["req_per_s"] / one["req_per_s"]
    print(format_table(rows, ["setup", "max_resident", "requests", "req_per_s", "tokens_per_s", "p50_ms", "p99_ms",
                              "mean_batch", "hit_rate", "vs_one_process"]))
    write_results(args.out, rows, model=MODEL, max_tokens=args.max_tokens, adapters=list(KINDS), cores=cores,
                  note=f"one machine with {cores} cores shared by every replica: replicas add adapter capacity, "
                       "not compute; the three servers of a setting up together, rounds interleaved; server in "
                       "its own process, closed-loop client threads in this one")
    print(f"\nwrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="JSON record (default bench-results/serve.json, serve-ray.json).")
    parser.add_argument("--requests", type=int, default=32, help="Requests per cell (bounded load).")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--repeats", type=int, default=1, help="Rounds per --ray cell; the median round is kept.")
    parser.add_argument("--ray", action="store_true", help="adaptkit serve --ray with 1 and 2 replicas.")
    args = parser.parse_args()
    if args.ray:
        args.out = args.out or "bench-results/serve-ray.json"
        return run_ray(args)
    args.out = args.out or "bench-results/serve.json"
    levels = [int(c) for c in args.concurrency.split(",")]
    mixed_models = ["base", *KINDS]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters = build(Path(tmp))
        for scenario, max_batch, models in (("mixed", 16, mixed_models), ("one adapter", 16, ["lora"]),
                                            ("one at a time", 1, mixed_models)):
            server = ServerProcess(base, adapters, max_batch=max_batch, max_queue=4 * args.requests)
            try:
                run_load(server, make_jobs(models, 8, args.max_tokens), 4)  # warm-up
                for concurrency in levels:
                    if scenario == "one at a time" and concurrency == 1:
                        continue  # identical to mixed at concurrency 1
                    result = run_load(server, make_jobs(models, args.requests, args.max_tokens), concurrency)
                    rows.append({"scenario": scenario, "max_batch": max_batch, "concurrency": concurrency, **result})
            finally:
                server.close()
    sequential = next(r["req_per_s"] for r in rows if r["scenario"] == "mixed" and r["concurrency"] == 1)
    for row in rows:
        row["speedup_vs_sequential"] = row["req_per_s"] / sequential
    print(format_table(rows, ["scenario", "max_batch", "concurrency", "requests", "req_per_s", "tokens_per_s",
                              "p50_ms", "p99_ms", "mean_batch", "speedup_vs_sequential"]))
    write_results(args.out, rows, model=MODEL, max_tokens=args.max_tokens, adapters=list(KINDS),
                  note="server in its own process; closed-loop client threads in this process; same machine")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
