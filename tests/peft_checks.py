"""The check every adapter form gets against PEFT: alone, beside another LoRA and the bare base in one
batch, merged in place (and restored), and merged into a checkpoint that plain transformers loads."""

from __future__ import annotations

import torch
from conftest import make_peft_lora, peft_logits

import adaptkit as ak


def check_served_like_peft(base, adapter, ids, tmp_path, atol: float = 1e-4) -> None:
    """``adapter`` (a PEFT folder) on ``base`` equals PEFT everywhere adaptkit serves or merges it."""
    from transformers import AutoModelForCausalLM

    other = make_peft_lora(base, tmp_path / "other-lora", seed=4)
    expected, expected_other = peft_logits(base, adapter, ids), peft_logits(base, other, ids)
    engine = ak.Engine.from_pretrained(base)
    plain = engine.logits(ids)
    assert (expected - plain).abs().max() > 1e-2  # the adapter changes the output
    engine.add_adapter("checked", adapter)
    engine.add_adapter("other", other)
    torch.testing.assert_close(engine.logits(ids, adapters="checked"), expected, atol=atol, rtol=0)
    rows = ["checked", "other", None][: ids.shape[0]]
    mixed = engine.logits(ids, adapters=rows)
    for i, reference in enumerate((expected, expected_other, plain)[: len(rows)]):
        torch.testing.assert_close(mixed[i], reference[i], atol=atol, rtol=0)
    engine.merge("checked")
    torch.testing.assert_close(engine.logits(ids, adapters="checked"), expected, atol=atol, rtol=0)
    engine.unmerge()
    torch.testing.assert_close(engine.logits(ids), plain, atol=0, rtol=0)  # restored bit for bit
    merged = ak.merge_checkpoint(base, [adapter], tmp_path / "merged", progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=atol, rtol=0)


def save_random_base(model, folder, std: float = 0.08):
    """A tiny random model saved with the test tokenizer; its matrices drawn wider than transformers' init so
    that adapters' effects show in the logits."""
    from adaptkit.demo import build_tokenizer

    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(0.0, std)
    model.save_pretrained(str(folder))
    build_tokenizer().save_pretrained(str(folder))
    return folder


def save_trained(model, out, seed: int = 0, std: float = 0.5):
    """A PEFT model "trained" (its trainable parameters moved by seeded noise), saved with save_pretrained."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * std)
    model.save_pretrained(str(out))
    return out
