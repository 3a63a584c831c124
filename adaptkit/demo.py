"""Tiny random models, tokenizers and LoRAs built locally (no downloads) for the demo and tests."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from adaptkit.adapters.lora import LoraAdapter, LoraConfig, LoraWeights

_CORPUS = (
    "adaptkit serves many adapters over one base model. LoRA adds a low-rank update to linear layers. "
    "Prefix tuning adds keys and values to attention. Prompt tuning prepends soft tokens. "
    "SELECT name FROM users WHERE id = 1; the quick brown fox jumps over the lazy dog. 0123456789"
)


def build_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on a built-in sentence set, with bos/eos/pad tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_config(arch: str = "llama", vocab_size: int = 320, **overrides):
    """A transformers config of a 2-layer, 64-wide model of the given family."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    if arch == "llama":
        cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
        cfg.update(overrides)
        return LlamaConfig(**cfg)
    if arch == "gpt2":
        cfg = dict(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=256,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        cfg.update(overrides)
        return GPT2Config(**cfg)
    if arch == "bert":
        cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=256, pad_token_id=0,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        cfg.update(overrides)
        return BertConfig(**cfg)
    raise ValueError(f"unknown arch {arch!r}; use llama, gpt2 or bert")


def build_tiny_model(out_dir: str | os.PathLike, arch: str = "llama", seed: int = 0,
                     max_shard_size: str | None = None, **overrides) -> Path:
    """Save a tiny random model (+ tokenizer) of ``arch`` with ``save_pretrained``; returns the folder."""
    from transformers import AutoModelForCausalLM, BertForMaskedLM

    out_dir = Path(out_dir)
    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = BertForMaskedLM(config) if arch == "bert" else AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger than default init so that differences show up in logits
        for name, param in model.named_parameters():
            if param.ndim == 2 and "norm" not in name:
                param.normal_(0.0, 0.08)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out_dir), **kwargs)
    build_tokenizer(config.vocab_size).save_pretrained(str(out_dir))
    return out_dir


def random_lora(
    base_dir: str | os.PathLike,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    r: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
    std: float = 0.1,
    **config_fields,
) -> LoraAdapter:
    """A LoRA with random (non-zero) A and B for every target of the base, built without PEFT."""
    from adaptkit.base import meta_model
    from adaptkit.inject import base_modules, linear_shape

    model = meta_model(base_dir)
    lora_config = LoraConfig(r=r, alpha=alpha, target_modules=tuple(targets), **config_fields)
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in base_modules(model).items():
        shape = linear_shape(module)
        if shape is None or not lora_config.targets(name):
            continue
        out_f, in_f = shape
        rank = lora_config.rank_for(name)
        a = torch.randn(rank, in_f, generator=gen) * std
        b = torch.randn(out_f, rank, generator=gen) * std
        layers[name] = LoraWeights(a, b, lora_config.scale_for(name))
    from adaptkit.base import read_config
    from adaptkit.formats.checkpoint import open_checkpoint
    from adaptkit.merge import checkpoint_fingerprint

    fingerprint = checkpoint_fingerprint(open_checkpoint(base_dir), read_config(base_dir))
    return LoraAdapter(config=lora_config, layers=layers, base_class=type(model).__name__, fingerprint=fingerprint)


def run_demo(workdir: str | os.PathLike | None = None, progress: bool = True) -> list[str]:
    """Build a tiny Llama and two LoRAs, route a mixed batch, generate, merge and verify.

    Everything is made locally; returns the lines to print.
    """
    import tempfile
    import time

    import adaptkit as ak
    from adaptkit.export import probe_ids, verify_merged_checkpoint
    from adaptkit.formats.peft import write_lora

    start = time.perf_counter()
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="adaptkit-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    base = build_tiny_model(root / "base", "llama")
    write_lora(random_lora(base, ("q_proj", "v_proj"), r=4, alpha=8, seed=1), root / "sql")
    write_lora(random_lora(base, ("q_proj", "k_proj", "v_proj", "o_proj"), r=8, alpha=16, seed=2), root / "tone")
    lines = [f"built a tiny Llama and two LoRAs in {root}"]

    engine = ak.Engine.from_pretrained(base)
    for name in ("sql", "tone"):
        info = engine.add_adapter(name, root / name)
        lines.append(f"loaded {name}: {info.kind}, ranks {info.details['ranks']}, {info.params:,} parameters")

    rows = [None, "sql", "tone", ak.Mix({"sql": 0.5, "tone": 0.5})]
    ids = probe_ids(engine.base.facts.vocab_size, batch=len(rows))
    mixed = engine.logits(ids, adapters=rows)
    alone = max(float((engine.logits(ids[i : i + 1], adapters=[r]) - mixed[i : i + 1]).abs().max())
                for i, r in enumerate(rows))
    lines.append(f"one batch, rows [base, sql, tone, Mix(sql, tone)]: max difference vs each row alone {alone:.1e}")

    prompts = ["SELECT name", "the quick brown", "adaptkit serves"]
    texts = engine.generate(prompts, adapters=[None, "sql", "tone"], max_new_tokens=8)
    for prompt, adapter, text in zip(prompts, ["base", "sql", "tone"], texts):
        lines.append(f"generate [{adapter:>4}] {prompt!r} -> {text!r}")

    before = engine.logits(ids, adapters="sql")
    engine.merge("sql")
    merged = engine.logits(ids, adapters="sql")
    engine.unmerge()
    lines.append(f"merge('sql') in place: max logit difference vs unmerged {float((merged - before).abs().max()):.1e}; "
                 "unmerge() restored the weights")

    out = ak.merge_checkpoint(base, [root / "sql"], root / "merged-sql", force=True, progress=progress)
    diff = verify_merged_checkpoint(base, [root / "sql"], out)
    lines.append(f"merge_checkpoint -> {out}: loads with plain transformers, max logit difference {diff:.1e}")
    lines.append(f"done in {time.perf_counter() - start:.1f} s")
    return lines
