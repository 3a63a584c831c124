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


def _peft(base: Path, paths: dict[str, Path]):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = list(paths)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, attn_implementation="eager").eval()
    model = PeftModel.from_pretrained(model, str(paths[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(paths[name]), adapter_name=name)
    return model.eval()


def plain_model(model):
    """The transformers model under a PEFT wrapper (itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _cache_step(model, ids, mask, kwargs) -> dict:
    """A decode-step case for a plain/PEFT model: the cache is filled once, cropped back after each step."""
    from transformers import DynamicCache

    from adaptkit.generation import cache_argument

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
    peft = _peft(base, paths)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["kernel", "serve", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default="bench-results/many.json")
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
            from bench_many_serve import serve_part

            record["serve"] = serve_part(Path(tmp) / "serve", args)
    write_results(args.out, record.get("kernel", []), timings if "kernel" in record else None,
                  serve=record.get("serve"), model=MODEL, batch=BATCH, prompt=PROMPT, threads=torch.get_num_threads())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
