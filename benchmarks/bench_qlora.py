"""QLoRA deployment costs on a random Llama of a few hundred MB (built locally, under /tmp).

1. load: wall time, bytes held and peak RSS of the base in float32, bfloat16, NF4 quantized at load,
   and NF4 saved by ``adaptkit quantize`` (each load in its own subprocess so that its peak RSS is its
   own; every mode twice, interleaved)
2. forward latency, interleaved, ratios vs the NF4 base: QLoRA unmerged (NF4 + LoRA), merged in
   place (``Engine.merge``: re-quantized NF4), and the dequantize-path merged checkpoint (dense fp32)
3. merge: wall time of ``merge_qlora_checkpoint`` and the relative logit error of each merge path

    python benchmarks/bench_qlora.py [--out bench-results/qlora.json] [--repeats 10] [--workdir /tmp/x]
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

MODEL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=16000)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# mode -> (dtype, quantize, folder): "base" quantizes at load, "nf4" is the folder adaptkit quantize wrote
LOAD_MODES = {"float32": ("float32", None, "base"), "bfloat16": ("bfloat16", None, "base"),
              "nf4 (fp32 compute)": ("float32", "nf4", "base"), "nf4 (bf16 compute)": ("bfloat16", "nf4", "base"),
              "nf4 saved by adaptkit quantize": ("bfloat16", None, "nf4")}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build(root: Path) -> tuple[Path, Path]:
    """The base (float32 safetensors, 100 MB shards), its NF4 copy and a rank-16 LoRA on every linear layer."""
    from adaptkit.demo import build_tiny_model, random_lora
    from adaptkit.formats.peft import write_lora

    base = root / "base"
    if not (base / "config.json").is_file():
        build_tiny_model(base, "llama", max_shard_size="100MB", **MODEL)
    adapter = root / "lora"
    if not (adapter / "adapter_config.json").is_file():
        write_lora(random_lora(base, TARGETS, r=16, alpha=32, seed=1, std=0.02), adapter)
    if not (root / "nf4" / "config.json").is_file():
        ak.quantize_base(base, root / "nf4", compute_dtype="bfloat16")
    return base, adapter


def load_worker(mode: str, root: str) -> None:
    """Runs in a subprocess: one load, its time, bytes held and peak RSS, as one JSON line."""
    from adaptkit.describe import measure_load

    dtype, quantize, folder = LOAD_MODES[mode]
    print(json.dumps(measure_load(Path(root) / folder, dtype=dtype, quantize=quantize)))


def bench_load(root: Path) -> list[dict]:
    rows = []
    for _ in range(2):
        for mode in LOAD_MODES:
            cmd = [sys.executable, __file__, "--load-worker", mode, str(root)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            got = json.loads(out)
            say(f"load {mode}: {got['load_s']:.2f} s")
            rows.append({"case": f"load {mode}", "load_s": got["load_s"], "model_mb": got["model_bytes"] / 2**20,
                         "peak_rss_mb": got["peak_rss"] / 2**20,
                         "rss_added_mb": (got["peak_rss"] - got["peak_rss_before"]) / 2**20})
    return rows


def bench_latency(base: Path, adapter: Path, merged_dir: Path, repeats: int, seq: int) -> list[dict]:
    unmerged = ak.Engine.from_pretrained(base, quantize="nf4", compute_dtype="float32")
    unmerged.add_adapter("a", adapter)
    in_place = ak.Engine.from_pretrained(base, quantize="nf4", compute_dtype="float32")
    in_place.add_adapter("a", adapter)
    in_place.merge("a")  # re-quantized NF4, zero added work per forward
    dense = ak.Engine.from_pretrained(merged_dir, dtype="float32")
    rows = []
    for batch in (1, 4):
        ids = torch.randint(3, MODEL["vocab_size"], (batch, seq))
        cases = {  # ids bound per batch size (default arguments)
            "nf4 base": lambda ids=ids: unmerged.logits(ids, adapters=None),
            "qlora unmerged (nf4 + lora)": lambda ids=ids: unmerged.logits(ids, adapters="a"),
            "qlora merged in place (nf4, requantized)": lambda ids=ids: in_place.logits(ids, adapters="a"),
            "qlora merged checkpoint (dense fp32)": lambda ids=ids: dense.logits(ids),
        }
        say(f"timing batch {batch}")
        for name, t in time_interleaved(cases, baseline="nf4 base", repeats=repeats, warmup=2).items():
            rows.append({"case": name, "batch": batch, "seq": seq, "median_ms": t.median * 1e3,
                         "p90_ms": t.p90 * 1e3, "ratio_vs_nf4_base": t.ratio, "samples_s": t.samples})
    return rows


def bench_merge(base: Path, adapter: Path, root: Path) -> tuple[list[dict], Path]:
    from adaptkit.merging.qlora import qlora_merge_error

    rows = []
    paths = {"dequantize (fp32)": ("merged-fp32", {}), "dequantize (bf16)": ("merged-bf16", {"dtype": "bfloat16"}),
             "requantize (nf4)": ("merged-nf4", {"requantize": True})}
    for name, (folder, options) in paths.items():
        start = time.perf_counter()
        out = ak.merge_qlora_checkpoint(base, [adapter], root / folder, force=True, progress=False, **options)
        wall = time.perf_counter() - start
        say(f"merge {name}: {wall:.1f} s")
        rows.append({"case": f"merge {name}", "wall_s": wall, "relative_logit_error": qlora_merge_error(base, [adapter], out),
                     "output_mb": sum(p.stat().st_size for p in out.glob("*.safetensors")) / 2**20})
    rows.append({"case": "reference: base weights rounded to bf16 (no adapter)", "relative_logit_error":
                 bf16_storage_error(base)})
    return rows, root / "merged-fp32"


def bf16_storage_error(base: Path) -> float:
    """What bf16 storage alone costs this model: every weight rounded to bf16, computed in fp32."""
    from adaptkit.merging.checkpoint import probe_ids
    from adaptkit.merging.qlora import relative_logit_error

    engine = ak.Engine.from_pretrained(base, dtype="float32")
    ids = probe_ids(MODEL["vocab_size"])
    reference = engine.logits(ids)
    with torch.no_grad():
        for param in engine.model.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    return relative_logit_error(reference, engine.logits(ids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-results/qlora.json")
    parser.add_argument("--workdir", default=None, help="Keep the model here (default: a temporary folder in /tmp).")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--load-worker", nargs=2, metavar=("MODE", "ROOT"))
    args = parser.parse_args()
    if args.load_worker:
        load_worker(*args.load_worker)
        return
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        root = Path(args.workdir or tmp)
        base, adapter = build(root)
        checkpoint_mb = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 2**20
        load = bench_load(root)
        merge, merged_dir = bench_merge(base, adapter, root)
        latency = bench_latency(base, adapter, merged_dir, args.repeats, args.seq)
    print(f"model: random Llama {MODEL}, {checkpoint_mb:.0f} MB float32 on disk; LoRA r=16 on {', '.join(TARGETS)}\n")
    print(format_table(load, ["case", "load_s", "model_mb", "peak_rss_mb", "rss_added_mb"]))
    print()
    print(format_table(latency, ["case", "batch", "seq", "median_ms", "p90_ms", "ratio_vs_nf4_base"]))
    print()
    print(format_table(merge, ["case", "wall_s", "output_mb", "relative_logit_error"]))
    write_results(args.out, load + latency + merge, model=MODEL, checkpoint_mb=checkpoint_mb, compute_dtype="float32")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
