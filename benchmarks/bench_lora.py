"""LoRA serving and merging costs, measured side by side in one run.

1. forward latency: base vs adaptkit unmerged LoRA vs adaptkit merged vs PEFT unmerged, batch 1 and 8
2. mixed batch of 4 LoRAs (one per row group) vs a single-LoRA batch, vs PEFT's ``adapter_names``
3. merge_checkpoint wall time and peak RSS vs PEFT ``merge_and_unload`` + ``save_pretrained``
   (each in its own subprocess, on a model of a few hundred MB)

    python benchmarks/bench_lora.py [--out bench-results/lora.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import adaptkit as ak
from adaptkit.benchmarking.timing import format_table, time_interleaved, write_results
from adaptkit.demo import build_tiny_model
from adaptkit.describe import peak_rss_bytes
from adaptkit.formats.peft import write_lora

LATENCY_MODEL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                     num_key_value_heads=8, vocab_size=4096)
MERGE_MODEL = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                   num_key_value_heads=12, vocab_size=16000)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _lora(base: Path, out: Path, seed: int, r: int = 16) -> Path:
    from adaptkit.demo import random_lora

    return write_lora(random_lora(base, TARGETS, r=r, alpha=2 * r, seed=seed, std=0.02), out)


def _peft_model(base: Path, adapters: dict[str, Path]):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = list(adapters)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, attn_implementation="eager").eval()
    model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    return model.eval()


def _latency_cases(engine, merged, peft_model, ids, mixed) -> dict:
    """The timed callables for one batch; ``adapters=None`` runs the bare base through the same engine."""

    def run_peft(**kw):
        with torch.inference_mode():
            peft_model(input_ids=ids, **kw)

    cases = {
        "base": lambda: engine.logits(ids, adapters=None),
        "adaptkit lora (unmerged)": lambda: engine.logits(ids, adapters="l0"),
        "adaptkit lora (merged)": lambda: merged.logits(ids, adapters="l0"),
        "peft lora (unmerged)": run_peft,
    }
    if len(mixed) > 1:
        cases["adaptkit 4 loras mixed batch"] = lambda: engine.logits(ids, adapters=mixed)
        cases["peft 4 loras adapter_names"] = lambda: run_peft(adapter_names=mixed)
    return cases


def bench_latency(root: Path, seq: int, repeats: int) -> list[dict]:
    base = build_tiny_model(root / "latency-base", "llama", **LATENCY_MODEL)
    adapters = {f"l{i}": _lora(base, root / f"l{i}", seed=i) for i in range(4)}
    engine = ak.Engine.from_pretrained(base)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    merged = ak.Engine.from_pretrained(base)
    merged.add_adapter("l0", adapters["l0"])
    merged.merge("l0")
    peft_model = _peft_model(base, adapters)
    peft_model.set_adapter("l0")

    rows = []
    for batch in (1, 8):
        ids = torch.randint(3, LATENCY_MODEL["vocab_size"], (batch, seq))

        cases = _latency_cases(engine, merged, peft_model, ids, [f"l{i % 4}" for i in range(batch)])
        timings = time_interleaved(cases, baseline="base", repeats=repeats, warmup=3)
        for name, t in timings.items():
            rows.append({"case": name, "batch": batch, "seq": seq, "median_ms": t.median * 1e3,
                         "p90_ms": t.p90 * 1e3, "ratio_vs_base": t.ratio, "samples_s": t.samples})
    return rows


def merge_worker(tool: str, base: str, adapter: str, out: str) -> None:
    """Runs in a subprocess so that its peak RSS is its own."""
    start = time.perf_counter()
    if tool == "adaptkit":
        ak.merge_checkpoint(base, [adapter], out, progress=False)
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        merged.save_pretrained(out)
    print(json.dumps({"wall_s": time.perf_counter() - start, "peak_rss_mb": peak_rss_bytes() / 2**20}))


def bench_merge(root: Path) -> list[dict]:
    base = build_tiny_model(root / "merge-base", "llama", max_shard_size="100MB", **MERGE_MODEL)
    size_mb = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 2**20
    adapter = _lora(base, root / "merge-lora", seed=7)
    rows = []
    for tool in ("adaptkit", "peft", "adaptkit", "peft"):  # twice each, interleaved
        out = root / f"merged-{tool}-{len(rows)}"
        cmd = [sys.executable, __file__, "--merge-worker", tool, str(base), str(adapter), str(out)]
        result = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        rows.append({"case": f"merge ({tool})", "checkpoint_mb": size_mb, **result})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-results/lora.json")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-merge", action="store_true")
    parser.add_argument("--merge-worker", nargs=4, metavar=("TOOL", "BASE", "ADAPTER", "OUT"))
    args = parser.parse_args()
    if args.merge_worker:
        merge_worker(*args.merge_worker)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        latency = bench_latency(root, args.seq, args.repeats)
        merge = [] if args.skip_merge else bench_merge(root)
    print(format_table(latency, ["case", "batch", "seq", "median_ms", "p90_ms", "ratio_vs_base"]))
    if merge:
        print()
        print(format_table(merge, ["case", "checkpoint_mb", "wall_s", "peak_rss_mb"]))
    write_results(args.out, latency + merge, dtype="float32", model=LATENCY_MODEL, merge_model=MERGE_MODEL)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
