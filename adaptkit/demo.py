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
    from adaptkit.base import checkpoint_fingerprint, read_config
    from adaptkit.formats.checkpoint import open_checkpoint

    fingerprint = checkpoint_fingerprint(open_checkpoint(base_dir), read_config(base_dir))
    return LoraAdapter(config=lora_config, layers=layers, base_class=type(model).__name__, fingerprint=fingerprint)


def _base_facts(base_dir):
    """(sizes, transformers class name, fingerprint) of a saved base, read without loading weights."""
    from adaptkit.arch import facts_from_config
    from adaptkit.base import checkpoint_fingerprint, model_class_for, read_config
    from adaptkit.formats.checkpoint import open_checkpoint

    config = read_config(base_dir)
    return (facts_from_config(config), model_class_for(config).__name__,
            checkpoint_fingerprint(open_checkpoint(base_dir), config))


def random_prefix(base_dir: str | os.PathLike, num_virtual_tokens: int = 8, seed: int = 0, std: float = 0.5):
    """A prefix (P-tuning v2 form) with random keys and values [L, H_kv, P, D] for the base."""
    from adaptkit.adapters.prefix import PrefixAdapter, PrefixConfig

    facts, base_class, fingerprint = _base_facts(base_dir)
    config = PrefixConfig(num_virtual_tokens, facts.num_layers, facts.num_kv_heads, facts.head_dim)
    shape = (facts.num_layers, facts.num_kv_heads, num_virtual_tokens, facts.head_dim)
    gen = torch.Generator().manual_seed(seed)
    keys, values = (torch.randn(shape, generator=gen) * std for _ in range(2))
    return PrefixAdapter(config, keys, values, fingerprint=fingerprint, base_class=base_class)


def random_prompt(base_dir: str | os.PathLike, num_virtual_tokens: int = 8, seed: int = 0, std: float = 0.5):
    """A soft prompt with random embeddings [P, hidden] for the base."""
    from adaptkit.adapters.prompt import PromptAdapter, PromptConfig

    facts, base_class, fingerprint = _base_facts(base_dir)
    gen = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(num_virtual_tokens, facts.hidden_size, generator=gen) * std
    return PromptAdapter(PromptConfig(num_virtual_tokens, facts.hidden_size), embeddings, fingerprint=fingerprint,
                         base_class=base_class)


def random_bottleneck(base_dir: str | os.PathLike, name: str, parallel: bool = False, seed: int = 0, std: float = 0.05):
    """A bottleneck adapter after every FFN with random weights, as AdapterHub's defaults place it.

    Series: ``SeqBnConfig`` (Pfeiffer, reduction factor 16). Parallel: ``ParBnConfig`` (reduction
    factor 2, scaling 4, the adapter reading the sub-block's input).
    """
    from adaptkit.adapters.bottleneck import BottleneckAdapter, BottleneckConfig, BottleneckLayer

    facts, base_class, _ = _base_facts(base_dir)
    config = BottleneckConfig(reduction_factor=16)
    if parallel:
        config = BottleneckConfig(reduction_factor=2, is_parallel=True, scaling=4.0, original_ln_before=False,
                                  residual_before_ln=False)
    gen = torch.Generator().manual_seed(seed)
    hidden, sites = facts.hidden_size, {}
    for layer in range(facts.num_layers):
        d = config.bottleneck_size(hidden, layer)
        tensors = {"down.weight": torch.randn(d, hidden, generator=gen) * std, "down.bias": torch.zeros(d),
                   "up.weight": torch.randn(hidden, d, generator=gen) * std, "up.bias": torch.zeros(hidden)}
        sites[(layer, "output")] = BottleneckLayer(config, tensors)
    return BottleneckAdapter(config, sites, hub_name=name, base_class=base_class)


def random_fusion(base_dir: str | os.PathLike, adapter_names: tuple[str, ...], seed: int = 0, std: float = 0.05):
    """An AdapterFusion over bottleneck adapters after every FFN (as :func:`random_bottleneck` places them)."""
    from adaptkit.adapters.fusion import FusionAdapter, FusionConfig, FusionLayer

    facts, base_class, _ = _base_facts(base_dir)
    hidden = facts.hidden_size
    gen = torch.Generator().manual_seed(seed)

    def square(eye: bool = False):
        noise = torch.randn(hidden, hidden, generator=gen) * std
        return noise + torch.eye(hidden) if eye else noise

    sites = {(layer, "output"): FusionLayer(FusionConfig(), {
        "query.weight": square(), "query.bias": torch.zeros(hidden), "key.weight": square(),
        "key.bias": torch.zeros(hidden), "value.weight": square(eye=True)}) for layer in range(facts.num_layers)}
    return FusionAdapter(FusionConfig(), tuple(adapter_names), sites, hub_name=",".join(adapter_names),
                         base_class=base_class)


def write_demo_adapters(base_dir: str | os.PathLike, out_dir: str | os.PathLike, lora_rank: int = 8) -> dict[str, Path]:
    """One random adapter of every kind for ``base_dir`` (two LoRAs, two series bottlenecks for the
    fusion), written in their formats under ``out_dir``; returns {engine name: folder}."""
    from adaptkit.formats.adapterhub import write_bottleneck, write_fusion
    from adaptkit.formats.peft import write_lora, write_prefix, write_prompt

    out = Path(out_dir)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    if _base_facts(base_dir)[0].family == "gpt2":
        targets = ("c_attn", "c_proj")
    paths = {
        "lora_a": write_lora(random_lora(base_dir, targets, r=lora_rank, alpha=2 * lora_rank, seed=1, std=0.02),
                             out / "lora_a"),
        "lora_b": write_lora(random_lora(base_dir, targets, r=lora_rank, alpha=2 * lora_rank, seed=2, std=0.02),
                             out / "lora_b"),
        "prefix": write_prefix(random_prefix(base_dir, seed=3), out / "prefix"),
        "prompt": write_prompt(random_prompt(base_dir, seed=4), out / "prompt"),
    }
    for name, parallel, seed in (("bn_series", False, 5), ("bn_series_b", False, 6), ("bn_parallel", True, 7)):
        paths[name] = write_bottleneck(random_bottleneck(base_dir, name, parallel=parallel, seed=seed), out / name)
    paths["fusion"] = write_fusion(random_fusion(base_dir, ("bn_series", "bn_series_b"), seed=8), out / "fusion")
    return paths


def run_demo(workdir: str | os.PathLike | None = None, progress: bool = True) -> list[str]:
    """Build a tiny Llama and two LoRAs, route a mixed batch, generate, merge and verify.

    Everything is made locally; returns the lines to print.
    """
    import tempfile
    import time

    import adaptkit as ak
    from adaptkit.formats.peft import write_lora
    from adaptkit.merging.checkpoint import probe_ids, verify_merged_checkpoint

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
