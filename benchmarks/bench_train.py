"""LoRA training throughput: adaptkit's training step vs PEFT vs a plain torch loop, on the same model.

One optimizer step (forward, loss, backward, AdamW) on the same batch of ``batch x seq`` tokens,
rank-16 LoRA on q/k/v/o of every block, fp32, eager attention, no dropout:

- ``adaptkit``: the step ``ak.train`` runs (``trainer.forward_logits`` + ``batch_loss``): the engine's
  ``LoraLinear`` layers, routed per forward, LoRA set up by ``train_methods.setup_lora``
- ``peft``: ``get_peft_model(model, LoraConfig(...))`` and ``model(input_ids, labels=...).loss``
- ``plain torch``: a 10-line LoRA linear swapped into the model by hand, the same loss (the baseline)

Steps are timed round-robin (``bench.time_interleaved``); tokens/s = batch * seq / median step time.
All three start from B = 0, so their first losses are the base model's: checked before timing.

    python benchmarks/bench_train.py [--out bench-results/train.json] [--quick]
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import adaptkit as ak
from adaptkit.benchmarking.timing import format_table, time_interleaved, write_results
from adaptkit.demo import build_tiny_model
from adaptkit.training.data import Batch, Objective
from adaptkit.training.loop import batch_loss, forward_logits
from adaptkit.training.methods import setup_method
from adaptkit.training.setup import SetupContext

MODEL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=4096)
QUICK_MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=1024)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANK, ALPHA, LR = 16, 32, 1e-4


def _hf(base: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, attn_implementation="eager")
    return model.eval().requires_grad_(False)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def adaptkit_step(base: Path, ids: torch.Tensor):
    engine = ak.Engine.from_pretrained(base)
    setup = setup_method("lora", SetupContext(engine, "bench", Objective("lm"), "bench"),
                         {"r": RANK, "alpha": ALPHA, "targets": TARGETS})
    optimizer = torch.optim.AdamW(list(setup.trainable.parameters()), lr=LR)
    batch = Batch(ids, torch.ones_like(ids), labels=ids)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = batch_loss(forward_logits(engine, setup, batch), batch, Objective("lm"))[0]
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def peft_step(base: Path, ids: torch.Tensor):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_hf(base), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


class PlainLoraLinear(nn.Module):
    """The baseline: ``base(x) + s * (x A^T) B^T``, nothing else."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * (x @ self.lora_A.T) @ self.lora_B.T


def plain_step(base: Path, ids: torch.Tensor):
    model = _hf(base)
    for name, module in list(model.named_modules()):
        if name.rpartition(".")[2] in TARGETS:
            parent = model.get_submodule(name.rpartition(".")[0])
            setattr(parent, name.rpartition(".")[2], PlainLoraLinear(module, RANK, ALPHA))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(model(input_ids=ids).logits, ids)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-results/train.json")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: as set)")
    parser.add_argument("--quick", action="store_true", help="a small model and few repeats (smoke test)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_config = QUICK_MODEL if args.quick else MODEL
    repeats = 3 if args.quick else args.repeats
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny_model(Path(tmp) / "base", "llama", **model_config)
        ids = torch.randint(3, model_config["vocab_size"], (args.batch, args.seq))
        cases = {"plain torch": plain_step(base, ids), "peft": peft_step(base, ids), "adaptkit": adaptkit_step(base, ids)}
        first = {name: step() for name, step in cases.items()}  # B = 0 everywhere: the base model's loss
        spread = max(first.values()) - min(first.values())
        assert spread < 1e-4, f"first-step losses differ: {first}"
        timings = time_interleaved(cases, baseline="plain torch", repeats=repeats, warmup=args.warmup)
    tokens = args.batch * args.seq
    rows = [{"case": name, "batch": args.batch, "seq": args.seq, "median_ms": t.median * 1e3, "p90_ms": t.p90 * 1e3,
             "tokens_per_s": tokens / t.median, "ratio_vs_plain": t.ratio} for name, t in timings.items()]
    print(format_table(rows, ["case", "batch", "seq", "median_ms", "p90_ms", "tokens_per_s", "ratio_vs_plain"]))
    write_results(args.out, rows, timings, dtype="float32", model=model_config, lora={"r": RANK, "alpha": ALPHA,
                  "targets": TARGETS}, first_step_loss=first, step="forward + loss + backward + AdamW")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
