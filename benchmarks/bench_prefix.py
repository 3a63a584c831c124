"""Prefix and prompt adapters: forward and decode latency vs the base and vs PEFT, measured in one run.

1. forward (one full-sequence logits call): base, adaptkit prefix, adaptkit prompt served as K/V
   computed once, adaptkit prompt with embeddings prepended per request, PEFT prefix, PEFT prompt
2. decode (ms per new token, from generating 1 and 1+N tokens): the same cases through generate

Cases are timed interleaved; ratios are against the base measured in the same rounds, and the
prompt-as-cache path is also compared with a prefix of the same length (it should cost no more).
PEFT 0.21.2's ``generate`` under transformers 5.24 drops the prefix/prompt after the first step
(it injects ``past_key_values``, renamed ``cache``), so its tokens are wrong; it is timed as users
get it, flagged, together with ``use_cache=False`` (re-runs the whole sequence per token).

    python benchmarks/bench_prefix.py [--out bench-results/prefix.json] [--repeats 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import adaptkit as ak
from adaptkit.benchmarking.timing import format_table, time_interleaved, write_results
from adaptkit.demo import build_tiny_model

MODEL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=4096)
VIRTUAL_TOKENS = 20


def _peft_adapter(base: Path, out: Path, kind: str, seed: int) -> Path:
    """A PEFT prefix (P-tuning v2) or prompt-tuning adapter with random weights, saved by PEFT."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cls = PrefixTuningConfig if kind == "prefix" else PromptTuningConfig
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, attn_implementation="eager")
    model = get_peft_model(model, cls(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "prompt_encoder" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    model.save_pretrained(str(out))
    return out


def _peft_model(base: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, attn_implementation="eager").eval()
    return PeftModel.from_pretrained(model, str(adapter)).eval()


def _setup(root: Path):
    base = build_tiny_model(root / "base", "llama", **MODEL)
    paths = {kind: _peft_adapter(base, root / kind, kind, seed=i) for i, kind in enumerate(("prefix", "prompt"))}
    cached = ak.Engine.from_pretrained(base)
    prepended = ak.Engine.from_pretrained(base)
    prepended.prompt_as_cache = False
    for engine in (cached, prepended):
        for name, path in paths.items():
            engine.add_adapter(name, path)
    peft_models = {kind: _peft_model(base, path) for kind, path in paths.items()}
    return cached, prepended, peft_models


def _forward_cases(cached, prepended, peft_models, ids) -> dict:
    def peft_forward(kind):
        def run():
            with torch.inference_mode():
                peft_models[kind](input_ids=ids)
        return run

    return {
        "base": lambda: cached.logits(ids),
        "adaptkit prefix": lambda: cached.logits(ids, adapters="prefix"),
        "adaptkit prompt (K/V once)": lambda: cached.logits(ids, adapters="prompt"),
        "adaptkit prompt (prepend)": lambda: prepended.logits(ids, adapters="prompt"),
        "peft prefix": peft_forward("prefix"),
        "peft prompt": peft_forward("prompt"),
    }


def _generate_cases(cached, prepended, peft_models, ids, new_tokens: int) -> dict:
    rows = ids.tolist()

    def ours(engine, adapter):
        return lambda: engine.generate_ids(rows, adapters=adapter, max_new_tokens=new_tokens, eos_token_id=-1)

    def peft_generate(kind, use_cache):
        def run():
            with torch.inference_mode():
                peft_models[kind].generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=use_cache,
                                           pad_token_id=0)
        return run

    return {
        "base": ours(cached, None),
        "adaptkit prefix": ours(cached, "prefix"),
        "adaptkit prompt (K/V once)": ours(cached, "prompt"),
        "adaptkit prompt (prepend)": ours(prepended, "prompt"),
        "peft prefix (wrong tokens)": peft_generate("prefix", True),
        "peft prompt (wrong tokens)": peft_generate("prompt", True),
        "peft prompt (use_cache=False)": peft_generate("prompt", False),
    }


def bench(root: Path, seq: int, new_tokens: int, repeats: int) -> list[dict]:
    cached, prepended, peft_models = _setup(root)
    rows = []
    for batch in (1, 8):
        ids = torch.randint(3, MODEL["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(batch))
        forward = time_interleaved(_forward_cases(cached, prepended, peft_models, ids), "base", repeats, warmup=3)
        for name, t in forward.items():
            rows.append({"phase": "forward", "case": name, "batch": batch, "seq": seq, "median_ms": t.median * 1e3,
                         "p90_ms": t.p90 * 1e3, "ratio_vs_base": t.ratio,
                         "ratio_vs_prefix": t.median / forward["adaptkit prefix"].median})
        one = _generate_cases(cached, prepended, peft_models, ids, 1)
        many = _generate_cases(cached, prepended, peft_models, ids, 1 + new_tokens)
        cases = {f"{name} @1": fn for name, fn in one.items()} | {f"{name} @n": fn for name, fn in many.items()}
        timings = time_interleaved(cases, None, max(3, repeats // 2), warmup=1)
        per_token = {name: (timings[f"{name} @n"].median - timings[f"{name} @1"].median) / new_tokens for name in one}
        for name, value in per_token.items():
            rows.append({"phase": "decode", "case": name, "batch": batch, "seq": seq, "median_ms": value * 1e3,
                         "ratio_vs_base": value / per_token["base"],
                         "ratio_vs_prefix": value / per_token["adaptkit prefix"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-results/prefix.json")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16, help="decode: ms/token from 1 vs 1+N new tokens")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench(Path(tmp), args.seq, args.new_tokens, args.repeats)
    print(format_table(rows, ["phase", "case", "batch", "seq", "median_ms", "p90_ms", "ratio_vs_base", "ratio_vs_prefix"]))
    write_results(args.out, rows, dtype="float32", model=MODEL, virtual_tokens=VIRTUAL_TOKENS,
                  new_tokens=args.new_tokens, note="decode median_ms is per new token: (t(1+N) - t(1)) / N")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
