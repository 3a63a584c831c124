"""Latency that bottleneck adapters and AdapterFusion add to a forward, vs the bare base, in one run.

A random Llama (built locally under /tmp) with random bottleneck adapters of AdapterHub's standard
configs: Pfeiffer (series after the FFN, rf 16), Houlsby (series after attention and FFN, rf 16),
parallel (He et al., rf 2, scaling 4), a Stack of two, a Fusion over two, and a mixed batch where
each row uses another of them. Every case is timed round-robin with the base (ratios vs the base
measured in the same rounds); "base, adapters loaded" shows what the site wrappers cost rows that
use no adapter.

    python benchmarks/bench_bottleneck.py [--out bench-results/bottleneck.json] [--repeats 20] [--seq 64]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import adaptkit as ak
from adaptkit.adapters.bottleneck import BottleneckAdapter, BottleneckConfig, BottleneckLayer
from adaptkit.adapters.fusion import FusionAdapter, FusionConfig, FusionLayer
from adaptkit.benchmarking.timing import format_table, time_interleaved, write_results
from adaptkit.demo import build_tiny_model

MODEL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=4096)
CONFIGS = {
    "pfeiffer": BottleneckConfig(),  # SeqBnConfig
    "houlsby": BottleneckConfig(mh_adapter=True, original_ln_before=False, non_linearity="swish"),  # DoubleSeqBnConfig
    "parallel": BottleneckConfig(is_parallel=True, reduction_factor=2, scaling=4.0, original_ln_before=False),  # ParBn
    "pfeiffer_b": BottleneckConfig(reduction_factor=8, non_linearity="gelu"),
}


def random_bottleneck(config: BottleneckConfig, hidden: int, layers: int, seed: int) -> BottleneckAdapter:
    """A bottleneck adapter with N(0, 0.02) weights at every site its config names."""
    gen = torch.Generator().manual_seed(seed)
    sites = {}
    for layer in range(layers):
        for site in [s for s, on in (("mh", config.mh_adapter), ("output", config.output_adapter)) if on]:
            d = config.bottleneck_size(hidden, layer)
            tensors = {"down.weight": torch.randn(d, hidden, generator=gen) * 0.02, "down.bias": torch.zeros(d),
                       "up.weight": torch.randn(hidden, d, generator=gen) * 0.02, "up.bias": torch.zeros(hidden)}
            sites[(layer, site)] = BottleneckLayer(config, tensors)
    return BottleneckAdapter(config, sites, hub_name=f"bn{seed}", base_class="LlamaForCausalLM")


def random_fusion(names: tuple[str, ...], hidden: int, layers: int, seed: int) -> FusionAdapter:
    gen = torch.Generator().manual_seed(seed)
    sites = {}
    for layer in range(layers):
        tensors = {f"{p}.weight": torch.randn(hidden, hidden, generator=gen) * 0.02 for p in ("query", "key", "value")}
        tensors.update({f"{p}.bias": torch.zeros(hidden) for p in ("query", "key")})
        sites[(layer, "output")] = FusionLayer(FusionConfig(), tensors)
    return FusionAdapter(FusionConfig(), names, sites, hub_name=",".join(names), base_class="LlamaForCausalLM")


def bench(root: Path, seq: int, repeats: int) -> tuple[list[dict], dict[str, int]]:
    base = build_tiny_model(root / "base", "llama", **MODEL)
    hidden, layers = MODEL["hidden_size"], MODEL["num_hidden_layers"]
    bare = ak.Engine.from_pretrained(base)
    engine = ak.Engine.from_pretrained(base)
    for seed, (name, config) in enumerate(CONFIGS.items()):
        engine.add_adapter(name, random_bottleneck(config, hidden, layers, seed))
    engine.add_adapter("fusion", random_fusion(("pfeiffer", "pfeiffer_b"), hidden, layers, seed=9))
    entries = {
        "series, Pfeiffer (after FFN)": "pfeiffer",
        "series, Houlsby (after attention + FFN)": "houlsby",
        "parallel (He et al.)": "parallel",
        "Stack(pfeiffer, pfeiffer_b)": ak.Stack("pfeiffer", "pfeiffer_b"),
        "Fuse(pfeiffer, pfeiffer_b)": ak.Fuse("pfeiffer", "pfeiffer_b"),
    }
    mixed = [None, "pfeiffer", "houlsby", "parallel", ak.Stack("pfeiffer", "pfeiffer_b"), ak.Fuse("pfeiffer", "pfeiffer_b")]
    rows = []
    for batch in (1, 8):
        ids = torch.randint(3, MODEL["vocab_size"], (batch, seq))
        cases = {"base": lambda ids=ids: bare.logits(ids),
                 "base, adapters loaded (rows use none)": lambda ids=ids: engine.logits(ids, adapters=None)}
        for label, entry in entries.items():
            cases[label] = lambda ids=ids, entry=entry: engine.logits(ids, adapters=entry)
        if batch > 1:
            row_entries = [mixed[i % len(mixed)] for i in range(batch)]
            cases["mixed batch (each row another of the above)"] = lambda ids=ids, r=row_entries: engine.logits(ids, adapters=r)
        for name, t in time_interleaved(cases, baseline="base", repeats=repeats, warmup=3).items():
            rows.append({"case": name, "batch": batch, "seq": seq, "median_ms": t.median * 1e3, "p90_ms": t.p90 * 1e3,
                         "ratio_vs_base": t.ratio, "samples_s": t.samples})
    return rows, {name: info.params for name, info in engine.adapters.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-results/bottleneck.json")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        rows, params = bench(Path(tmp), args.seq, args.repeats)
    print(format_table(rows, ["case", "batch", "seq", "median_ms", "p90_ms", "ratio_vs_base"]))
    print("\nadapter parameters: " + ", ".join(f"{name} {count:,}" for name, count in params.items()))
    write_results(args.out, rows, dtype="float32", model=MODEL, adapter_params=params,
                  configs={k: repr(v) for k, v in CONFIGS.items()})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
