"""Tiny random models, tokenizers and LoRAs built locally (no downloads) for the demo and tests."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaptkit.adapters.lora import LoraAdapter, LoraConfig, LoraWeights
from adaptkit.chat import chat_prompt_ids

_CORPUS = (
    "adaptkit serves many adapters over one base model. LoRA adds a low-rank update to linear layers. "
    "Prefix tuning adds keys and values to attention. Prompt tuning prepends soft tokens. "
    "SELECT name FROM users WHERE id = 1; the quick brown fox jumps over the lazy dog. 0123456789"
)


def build_tokenizer(vocab_size: int = 320, corpus: str = _CORPUS):
    """A byte-level BPE tokenizer trained on ``corpus`` (a built-in sentence set), with bos/eos/pad tokens."""
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
    tok.train_from_iterator([corpus] * 4, trainer=trainer)
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
                     max_shard_size: str | None = None, corpus: str = _CORPUS, **overrides) -> Path:
    """Save a tiny random model (+ a tokenizer trained on ``corpus``) of ``arch`` with ``save_pretrained``."""
    from transformers import AutoModelForCausalLM, BertForMaskedLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar for writing a 100 kB model is noise
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
    build_tokenizer(config.vocab_size, corpus).save_pretrained(str(out_dir))
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
    from adaptkit.base import checkpoint_fingerprint, meta_model, read_config
    from adaptkit.formats.checkpoint import open_checkpoint
    from adaptkit.measured import facts_of

    config = read_config(base_dir)
    skeleton = meta_model(base_dir)
    return (facts_of(skeleton), type(skeleton).__name__,
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
    from adaptkit.formats.peft import write_lora
    from adaptkit.formats.peft_prompt import write_prefix, write_prompt

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


# the demo's task: answer "What is the capital of X?" as one line of JSON instead of a sentence
CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Greece", "Athens"),
    ("Turkey", "Ankara"), ("Russia", "Moscow"), ("Ireland", "Dublin"), ("Belgium", "Brussels"),
    ("Netherlands", "Amsterdam"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Australia", "Canberra"),
    ("Cuba", "Havana"),
)
HELD_OUT = ("Hungary", "Switzerland", "Morocco")  # never seen in training
ADAPTER = "json-capitals"
# the random fallback's tokenizer learns whole words from the demo's and README's texts (as a real one has them)
DEMO_CORPUS = " ".join(
    [f"user: What is the capital of {c}? assistant: The capital of {c} is {k}. "
     f'{json.dumps({"country": c, "capital": k})}' for c, k in CAPITALS]
    + [_CORPUS, "It was good. It was bad. It was great. a wonderful film, a dull plot, great acting, boring and slow, "
                "the plot was thin. yes no Hi Hello"])


@dataclass
class DemoRun:
    """What the demo did, for scripts and tests (the CLI prints the lines as they come)."""

    base: Path
    real_model: bool
    adapter: Path
    base_texts: list[str] = field(default_factory=list)
    adapter_texts: list[str] = field(default_factory=list)
    mixed_vs_alone: float = float("nan")  # max logit difference, mixed batch vs each row alone
    merged_vs_unmerged: float = float("nan")  # Engine.merge in place
    checkpoint_vs_unmerged: float = float("nan")  # the merged checkpoint under plain transformers
    train_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)


def question_ids(tokenizer, country: str) -> list[int]:
    """The question as a chat turn, tokenized as the server's chat route and ``generate --chat`` do."""
    return chat_prompt_ids(tokenizer, [{"role": "user", "content": f"What is the capital of {country}?"}])


def run_demo(workdir: str | os.PathLike | None = None, progress: bool = True, model: str = "auto",
             emit=print) -> DemoRun:
    """Teach SmolLM2-135M-Instruct a visible behaviour with a LoRA, then route, merge, verify and time it.

    ``model``: ``"smollm2"`` (the real model, see :mod:`adaptkit.demo_model`; an error if it cannot be
    had), ``"random"`` (a tiny random Llama built here: instant, its text meaningless) or ``"auto"``
    (the real one, else the random one, saying why). ``workdir`` keeps the files (the adapter, the
    merged checkpoint); without it they go to a temporary folder removed at the end. Each line is
    passed to ``emit`` as soon as it is known.
    """
    import tempfile

    from adaptkit.demo_model import find_smollm2
    from adaptkit.errors import BaseModelError

    if model not in ("auto", "smollm2", "random"):
        raise ValueError(f"model={model!r}; use auto, smollm2 or random")
    found = None
    if model != "random":
        found = find_smollm2(progress=progress)
        if found.path is None and model == "smollm2":
            raise BaseModelError(f"SmolLM2-135M-Instruct is not available: {found.source}; "
                                 "run `adaptkit demo --model random` for the tiny random model")
    with contextlib.ExitStack() as stack:
        if workdir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="adaptkit-demo-")))
        else:
            root = Path(workdir)
            root.mkdir(parents=True, exist_ok=True)
        if found is not None and found.path is not None:
            emit(f"model: SmolLM2-135M-Instruct (135M parameters, Apache-2.0) from {found.source}")
            base, real = found.path, True
            if workdir is not None:  # the kept folder names the base as demo/base, whichever model it is
                link = root / "base"
                if link.is_symlink() or not link.exists():
                    link.unlink(missing_ok=True)
                    link.symlink_to(found.path.resolve(), target_is_directory=True)
                    base = link
        else:
            if found is not None:
                emit(f"SmolLM2-135M-Instruct is not available ({found.source}); using a tiny random Llama instead: "
                     "its text is meaningless, the mechanics shown are the same")
            base, real = build_tiny_model(root / "base", "llama", vocab_size=1024, corpus=DEMO_CORPUS), False
            emit(f"model: a tiny random Llama (2 layers, 64 wide) built in {root / 'base'}; random weights: its "
                 "text is meaningless, so generated rows are shown as token ids")
        run = _demo_steps(base, real, root, progress, emit)
        emit("")
        emit("next:")
        for line in _next_commands(base, run.adapter if workdir is not None else None):
            emit(f"  {line}")
    return run


def _demo_steps(base: Path, real: bool, root: Path, progress: bool, emit) -> DemoRun:
    import time

    import adaptkit as ak
    from adaptkit.merging.checkpoint import probe_ids, verify_merged_checkpoint

    tokenizer = _tokenizer(base)
    data = root / "capitals.jsonl"
    with open(data, "w") as f:
        for country, capital in CAPITALS:
            completion = json.dumps({"country": country, "capital": capital})
            prompt = tokenizer.decode(question_ids(tokenizer, country))  # as text, special tokens spelled out
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    emit(f"teaching it to answer capital questions as JSON: {len(CAPITALS)} examples like "
         f"{json.dumps({'country': 'France', 'capital': 'Paris'})}")
    adapter = root / ADAPTER
    trained = ak.train("lora", base, data, adapter, epochs=3, lr=3e-3, batch_size=8, eval_split=0.0, seed=0,
                       progress=progress, force=True, r=8, alpha=16)
    run = DemoRun(base=base, real_model=real, adapter=adapter, train_seconds=trained.seconds, losses=trained.losses)
    emit(f"trained a rank-8 LoRA on q_proj/v_proj in {trained.seconds:.0f} s ({trained.steps} steps, loss "
         f"{trained.losses[0]:.2f} -> {trained.losses[-1]:.2f}) -> {adapter}")

    engine = ak.Engine.from_pretrained(base)
    engine.add_adapter(ADAPTER, adapter)
    prompts = [question_ids(tokenizer, c) for c in HELD_OUT]
    rows = [None, ADAPTER] * len(prompts)  # one mixed batch: each question to the base and to the adapter
    mixed = engine.generate_ids([p for p in prompts for _ in (0, 1)], adapters=rows, max_new_tokens=24)
    texts = [_shown(engine.tokenizer, ids, real) for ids in mixed]
    run.base_texts, run.adapter_texts = texts[0::2], texts[1::2]
    emit("")
    emit(f"questions it never saw, base and adapter rows in one batch of {len(rows)}:")
    width = max(len(c) for c in HELD_OUT)
    for country, plain, tuned in zip(HELD_OUT, run.base_texts, run.adapter_texts):
        emit(f"  {country:<{width}}  base:    {plain}")
        emit(f"  {'':<{width}}  {ADAPTER}: {tuned}")

    ids = probe_ids(engine.base.facts.vocab_size, batch=4)
    entries = [None, ADAPTER, ak.Mix({ADAPTER: 0.5}), ADAPTER]
    together = engine.logits(ids, adapters=entries)
    run.mixed_vs_alone = max(float((engine.logits(ids[i:i + 1], adapters=[e]) - together[i:i + 1]).abs().max())
                             for i, e in enumerate(entries))
    emit("")
    emit(f"rows [base, {ADAPTER}, Mix({ADAPTER}: 0.5), {ADAPTER}] in one forward vs each row alone: "
         f"max logit difference {run.mixed_vs_alone:.1e}")

    unmerged = engine.logits(ids, adapters=ADAPTER)
    engine.merge(ADAPTER)
    run.merged_vs_unmerged = float((engine.logits(ids, adapters=ADAPTER) - unmerged).abs().max())
    engine.unmerge()
    emit(f"merge('{ADAPTER}') in place (zero added latency): max logit difference vs unmerged "
         f"{run.merged_vs_unmerged:.1e}; unmerge() restored the weights bit for bit")
    merged = ak.merge_checkpoint(base, [adapter], root / "merged", force=True, progress=progress)
    run.checkpoint_vs_unmerged = verify_merged_checkpoint(base, [adapter], merged)
    emit(f"merge_checkpoint -> {merged}: loads with plain transformers, max logit difference vs unmerged "
         f"{run.checkpoint_vs_unmerged:.1e} (fp32: up to ~1e-4 is summation order)")
    del engine

    emit("")
    emit("added latency, measured side by side (batches of 1 and 4, 16-token prompts, 8 new tokens):")
    start = time.perf_counter()
    result = ak.bench(base, {ADAPTER: adapter}, batch=(1, 4), prompt_len=16, new_tokens=8, repeats=3, warmup=1,
                      progress=progress)
    for line in result.table().splitlines():
        if not line.startswith("skipped lora mixed"):  # batch 1 has no mixed case, as the table shows
            emit(line)
    emit(f"(measured in {time.perf_counter() - start:.0f} s on this machine; ratios are against the base in the "
         "same rounds)")
    return run


def _tokenizer(base: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base))


def _shown(tokenizer, ids: list[int], real: bool) -> str:
    """A generated row as text; a random model's as its token ids (its bytes rarely decode cleanly)."""
    if not real:
        return f"token ids {ids[:8]}{' ...' if len(ids) > 8 else ''}"
    return tokenizer.decode(ids, skip_special_tokens=True).strip().replace("\n", " ")


def _next_commands(base: Path, adapter: Path | None) -> list[str]:
    if adapter is None:
        return ["adaptkit demo --workdir demo        # keep the adapter and the merged checkpoint to try these:",
                f"adaptkit generate {base} --adapter {ADAPTER}=demo/{ADAPTER} --prompt \"...\"",
                f"adaptkit serve {base} --adapters {ADAPTER}=demo/{ADAPTER}",
                f"adaptkit inspect demo/{ADAPTER} --base {base}"]
    prompt = "What is the capital of Peru?"
    return [f"adaptkit inspect {adapter} --base {base}",
            f"adaptkit generate {base} --adapter {ADAPTER}={adapter} --chat --prompt \"{prompt}\"",
            f"adaptkit serve {base} --adapters {ADAPTER}={adapter}    # OpenAI-compatible, model=\"{ADAPTER}\"",
            f"adaptkit bench {base} --adapters {ADAPTER}={adapter}",
            f"adaptkit export onnx {base} --adapter {adapter} -o {adapter.parent / 'onnx'} --verify"]
