"""Many adapters at the cost of one: batches mixing n distinct LoRAs, adaptkit vs PEFT, side by side.

(a) kernel: a random Llama (hidden 512, 4 layers), 64 rank-16 LoRAs on q/k/v/o loaded in both; one
    decode step of batch 32 over a 64-token cache, and the 64-token prefill of the same batch, with
    the rows spread round-robin over n = 1, 4, 16, 32, 64 adapters; also rows with no adapter, and
    plain transformers. Interleaved rounds, medians; ratios against plain transformers measured in
    the same rounds.
(b) serving (``--part serve``): ``adaptkit serve`` on 127.0.0.1 with ``--max-resident 16``, requests
    spread uniformly or Zipf(1.0) over 1, 10, 100 and 1000 registered adapters; throughput and
    p50/p99 latency against one adapter.

    python benchmarks/bench_many.py [--part kernel|serve|all] [--repeats 20] [--out bench-results/many.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from bench_lora import _peft_model

import adaptkit as ak
from adaptkit.benchmarking.timing import Case, format_table, time_interleaved, write_results
from adaptkit.demo import build_tiny_model, random_lora
from adaptkit.formats.peft import write_lora

MODEL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=4096, max_position_embeddings=512)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
COUNTS = (1, 4, 16, 32, 64)
BATCH, PROMPT = 32, 64


def build(root: Path, adapters: int) -> tuple[Path, dict[str, Path]]:
    base = build_tiny_model(root / "base", "llama", **MODEL)
    paths = {f"l{i}": write_lora(random_lora(base, TARGETS, r=16, alpha=32, seed=i, std=0.02), root / f"l{i}")
             for i in range(adapters)}
    return base, paths


def plain_model(model):
    """The transformers model under a PEFT wrapper (itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _cache_step(model, ids, mask, kwargs) -> dict:
    """A decode-step case for a plain/PEFT model: the cache is filled once, cropped back after each step."""
    from transformers import DynamicCache

    from adaptkit.measured import cache_argument

    cache = DynamicCache(config=model.config)
    name = cache_argument(plain_model(model))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{name: cache}, **kwargs)
    token = ids[:, -1:]
    step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)

    def run():
        with torch.inference_mode():
            model(input_ids=token, attention_mask=step_mask, position_ids=positions[:, -1:] + 1, use_cache=True,
                  **{name: cache}, **kwargs)

    return Case(run, teardown=lambda: cache.crop(-1))


def _engine_step(engine, prompts, rows) -> Case:
    """A decode-step case through the engine: ``decode_step`` from a prefilled state, rewound after."""
    _, state = engine.prefill(prompts, rows)
    mask, positions = state.mask, state.positions
    token = torch.tensor([p[-1] for p in prompts])

    def rewind():
        state.cache.crop(-1)
        state.mask, state.positions = mask, positions

    return Case(lambda: engine.decode_step(state, token), teardown=rewind)


def kernel(root: Path, repeats: int) -> tuple[list[dict], dict]:
    base, paths = build(root, max(COUNTS))
    engine = ak.Engine.from_pretrained(base)
    for name, path in paths.items():
        engine.add_adapter(name, path)
    peft = _peft_model(base, paths)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, MODEL["vocab_size"], (BATCH, PROMPT), generator=gen)
    mask = torch.ones_like(ids)
    prompts = ids.tolist()
    names = list(paths)
    rows_for = {n: [names[i % n] for i in range(BATCH)] for n in COUNTS}

    decode = {"transformers": _cache_step(plain, ids, mask, {}), "adaptkit, rows without adapter":
              _engine_step(engine, prompts, [None] * BATCH)}
    for n in COUNTS:
        decode[f"adaptkit, {n} adapters"] = _engine_step(engine, prompts, rows_for[n])
        decode[f"PEFT, {n} adapters"] = _cache_step(peft, ids, mask, {"adapter_names": rows_for[n]})

    def engine_prefill(rows):
        return lambda: engine.prefill(prompts, rows)

    def peft_prefill(rows):
        def run():
            with torch.inference_mode():
                peft(input_ids=ids, attention_mask=mask, adapter_names=rows)
        return run

    def plain_prefill():
        with torch.inference_mode():
            plain(input_ids=ids, attention_mask=mask)

    prefill = {"transformers": plain_prefill, "adaptkit, rows without adapter": engine_prefill([None] * BATCH)}
    for n in COUNTS:
        prefill[f"adaptkit, {n} adapters"] = engine_prefill(rows_for[n])
        prefill[f"PEFT, {n} adapters"] = peft_prefill(rows_for[n])

    rows, timings = [], {}
    for phase, cases, reps in (("decode", decode, repeats), ("prefill", prefill, max(3, repeats // 4))):
        measured = time_interleaved(cases, baseline="transformers", repeats=reps, warmup=2)
        one = measured["adaptkit, 1 adapters"].median
        for name, t in measured.items():
            timings[f"{phase}/{name}"] = t
            rows.append({"phase": phase, "case": name, "median ms": t.median * 1e3, "p90 ms": t.p90 * 1e3,
                         "x transformers": t.ratio,
                         "x one adapter": t.median / one if name.startswith("adaptkit, ") and "without" not in name
                         else None})
    return rows, timings


# ----------------------------------------------------------------------------- (b) serving
SERVE_COUNTS = (1, 10, 100, 1000)


def zipf_names(count: int, requests: int, seed: int) -> list[str]:
    """``requests`` adapter names drawn Zipf(1.0) over ``count`` adapters (p(k) ~ 1/k)."""
    import random

    weights = [1 / (k + 1) for k in range(count)]
    return [f"s{k:04d}" for k in random.Random(seed).choices(range(count), weights=weights, k=requests)]


def serve_part(root: Path, args) -> list[dict]:
    """``adaptkit serve --register-all --max-resident 16`` over 1000 LoRA folders; load from client threads."""
    from bench_serve import MODEL as SERVE_MODEL
    from bench_serve import PROMPTS, ServerProcess, run_load

    base = build_tiny_model(root / "base", "llama", **SERVE_MODEL)
    folder = root / "adapters"
    first = random_lora(base, TARGETS, r=8, alpha=16, seed=0, std=0.05)
    gen = torch.Generator().manual_seed(0)
    for k in range(max(SERVE_COUNTS)):  # one LoRA's shapes, fresh random factors each
        for weights in first.layers.values():
            weights.lora_A.data = torch.randn(weights.lora_A.shape, generator=gen) * 0.05
            weights.lora_B.data = torch.randn(weights.lora_B.shape, generator=gen) * 0.05
        write_lora(first, folder / f"s{k:04d}")
    server = ServerProcess(base, {}, max_batch=args.serve_batch, max_queue=4 * args.serve_requests,
                           extra=["--adapter-dir", str(folder), "--register-all", "--max-resident", "16"])
    rows = []
    try:
        def jobs(names):
            return [{"model": name, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.serve_tokens,
                     "temperature": 0, "ignore_eos": True} for i, name in enumerate(names)]

        run_load(server, jobs(["s0000"] * 16), args.serve_batch)  # warm-up
        for round_ in range(args.serve_rounds):  # interleaved: every scenario once per round
            for count in SERVE_COUNTS:
                for spread in ("uniform", "zipf"):
                    if count == 1 and spread == "zipf":
                        continue
                    names = ([f"s{i % count:04d}" for i in range(args.serve_requests)] if spread == "uniform"
                             else zipf_names(count, args.serve_requests, seed=round_))
                    result = run_load(server, jobs(names), args.serve_batch)
                    result.pop("latencies_s"), result.pop("answers")
                    rows.append({"adapters": count, "spread": spread, "round": round_, **result})
    finally:
        server.close()
    return summarize_serving(rows)


def summarize_serving(rows: list[dict]) -> list[dict]:
    """Per scenario: medians over rounds, throughput vs one adapter."""
    import statistics

    scenarios = {}
    for row in rows:
        scenarios.setdefault((row["adapters"], row["spread"]), []).append(row)
    one = statistics.median(r["req_per_s"] for r in scenarios[(1, "uniform")])
    table = []
    for (count, spread), runs in scenarios.items():
        throughput = statistics.median(r["req_per_s"] for r in runs)
        table.append({"adapters": count, "spread": spread, "req_per_s": throughput,
                      "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
                      "p50_ms": statistics.median(r["p50_ms"] for r in runs),
                      "p99_ms": statistics.median(r["p99_ms"] for r in runs),
                      "mean_batch": statistics.median(r["mean_batch"] or 0 for r in runs),
                      "x one adapter": throughput / one, "rounds": len(runs)})
    return table


def plot_serving(table: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for spread, marker in (("uniform", "o"), ("zipf", "s")):
        rows = sorted((r for r in table if r["spread"] == spread or r["adapters"] == 1), key=lambda r: r["adapters"])
        counts = [r["adapters"] for r in rows]
        left.plot(counts, [r["x one adapter"] for r in rows], marker=marker, label=spread)
        right.plot(counts, [r["p99_ms"] for r in rows], marker=marker, label=spread)
    for axis, label in ((left, "throughput, x one adapter"), (right, "p99 latency (ms)")):
        axis.set_xscale("log")
        axis.set_xlabel("distinct adapters in the requests (16 resident)")
        axis.set_ylabel(label)
        axis.legend()
    left.axhline(0.9, color="grey", linestyle=":")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["kernel", "serve", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default="bench-results/many.json")
    parser.add_argument("--serve-requests", type=int, default=64, help="Requests per serving scenario and round.")
    parser.add_argument("--serve-tokens", type=int, default=64, help="Tokens each serving request generates.")
    parser.add_argument("--serve-batch", type=int, default=8, help="--max-batch of the server and client threads.")
    parser.add_argument("--serve-rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    record = {}
    with tempfile.TemporaryDirectory(prefix="adaptkit-many-") as tmp:
        if args.part in ("kernel", "all"):
            rows, timings = kernel(Path(tmp) / "kernel", args.repeats)
            print(format_table(rows, ["phase", "case", "median ms", "p90 ms", "x transformers", "x one adapter"]))
            record["kernel"] = rows
        if args.part in ("serve", "all"):
            record["serve"] = serve_part(Path(tmp) / "serve", args)
            print(format_table(record["serve"], ["adapters", "spread", "req_per_s", "tokens_per_s", "p50_ms", "p99_ms",
                                                 "mean_batch", "x one adapter"]))
            plot_serving(record["serve"], Path(args.out).with_suffix(".png"))
    write_results(args.out, record.get("kernel", []), timings if "kernel" in record else None,
                  serve=record.get("serve"), model=MODEL, batch=BATCH, prompt=PROMPT, threads=torch.get_num_threads())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
