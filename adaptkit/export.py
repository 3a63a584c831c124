"""Standalone artifacts: merged checkpoints (checked against the unmerged engine)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from adaptkit.base import load_base
from adaptkit.engine import Engine
from adaptkit.merge import check_merge_weights, load_lora_adapters
from adaptkit.routing import Mix


def probe_ids(vocab_size: int, batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    """A fixed random batch of token ids used to compare two models."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch, length), generator=gen)


def verify_merged_checkpoint(
    base: str | os.PathLike, adapters: Sequence, merged: str | os.PathLike, weights: Sequence[float] | None = None
) -> float:
    """Max abs logit difference between ``merged`` (loaded as a plain model) and base + adapters unmerged."""
    loaded = load_lora_adapters(adapters)
    weights = check_merge_weights(loaded, weights)
    engine = Engine.from_pretrained(base)
    names = []
    for i, adapter in enumerate(loaded):
        names.append(f"a{i}")
        engine.add_adapter(names[-1], adapter)
    ids = probe_ids(engine.base.facts.vocab_size)
    entry = Mix(dict(zip(names, weights))) if len(names) > 1 or weights != [1.0] else names[0]
    expected = engine.logits(ids, adapters=entry)
    plain = load_base(merged).model
    with torch.inference_mode():
        out = plain(input_ids=ids)
    got = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return float((got.float() - expected.float()).abs().max())
