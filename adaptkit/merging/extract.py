"""Extract a LoRA from a fully fine-tuned checkpoint and its base: truncated SVD of each difference.

For every target weight (by default every linear weight inside the transformer blocks)::

    D = W_ft - W_base = U S V^T          [out, in] (GPT-2 Conv1D stores [in, out]: transposed first)
    B = U_r sqrt(S_r),  A = sqrt(S_r) V_r^T,  scale 1 (lora_alpha == r)

which is the best rank-r approximation of D (Eckart-Young); the share of ``||D||_F^2`` it keeps is
reported per module. At ``r >= min(out, in)`` the fine-tuned weights are reconstructed exactly (up
to float32 rounding). Both checkpoints are read shard by shard (memory-mapped), so memory holds one
shard and the growing LoRA. Tensors outside the targets that differ (norms, embeddings) are
reported, since a LoRA cannot carry them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from adaptkit.adapters.lora import LoraAdapter, LoraConfig, LoraWeights
from adaptkit.arch import facts_from_config
from adaptkit.base import read_config
from adaptkit.errors import AdapterMismatchError, InvalidArgumentError, OutputExistsError
from adaptkit.lowrank import truncated_svd


@dataclass
class Extracted:
    """What :func:`extract_lora` made and what it could not carry."""

    adapter: LoraAdapter
    path: Path | None
    energy: dict[str, float]  # module -> share of ||W_ft - W_base||_F^2 kept at its rank
    unchanged: list[str] = field(default_factory=list)  # targets identical in both checkpoints (left out)
    other_changes: dict[str, float] = field(default_factory=dict)  # non-target key -> ||ft - base|| / ||base||


def block_linear_modules(shapes: dict[str, tuple[int, ...]], spec) -> dict[str, str]:
    """``{checkpoint key: module name}`` of every 2-D ``.weight`` inside the transformer blocks."""
    blocks = "|".join(re.escape(p) for p in spec.layers_paths)
    pattern = re.compile(rf"^(?:{blocks})\.\d+\..+\.weight$")
    return {key: key[: -len(".weight")] for key, shape in shapes.items() if len(shape) == 2 and pattern.match(key)}


def _check_same_architecture(ft: Path, base: Path):
    """The base's config and facts, after checking that ``ft`` has the same architecture and sizes."""
    base_config = read_config(base)
    ft_facts, base_facts = facts_from_config(read_config(ft)), facts_from_config(base_config)
    if ft_facts != base_facts:
        def describe(f):
            return f"{f.model_type}, hidden {f.hidden_size}, {f.num_layers} layers, vocab {f.vocab_size}"

        raise AdapterMismatchError(
            f"{ft} ({describe(ft_facts)}) is not a fine-tune of {base} ({describe(base_facts)}); "
            "give the base it was fine-tuned from"
        )
    return base_config, base_facts


def _select_targets(modules: dict[str, str], targets: Sequence[str] | None) -> dict[str, str]:
    if not targets:
        return modules
    leaves = {m.rpartition(".")[2] for m in modules.values()}
    unknown = sorted(set(targets) - leaves)
    if unknown:
        raise InvalidArgumentError(
            f"targets {', '.join(unknown)} name no linear layer of the blocks; known: {', '.join(sorted(leaves))}"
        )
    return {k: m for k, m in modules.items() if m.rpartition(".")[2] in targets}


class _ShardReader:
    """Read one tensor of a checkpoint by key without scanning every shard (safetensors headers once)."""

    def __init__(self, checkpoint):
        from safetensors import safe_open

        self.checkpoint = checkpoint
        self.where: dict[str, Path] = {}
        if checkpoint.is_safetensors:
            for shard in checkpoint.shards:
                with safe_open(str(shard), framework="pt") as f:
                    self.where.update(dict.fromkeys(f.keys(), shard))

    def __call__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if key not in self.where:
            return self.checkpoint.read_tensor(key)
        with safe_open(str(self.where[key]), framework="pt") as f:
            return f.get_tensor(key)


def extracted_config(ranks: dict[str, int], rank: int, all_modules: Sequence[str], fan_in_fan_out: bool) -> LoraConfig:
    """Scale 1 everywhere; leaf names as targets when they select exactly the extracted modules."""
    leaves = sorted({m.rpartition(".")[2] for m in ranks})
    selected = {m for m in all_modules if m.rpartition(".")[2] in leaves}
    targets = tuple(leaves) if selected == set(ranks) else tuple(ranks)
    pattern = {re.escape(m): k for m, k in ranks.items() if k != rank}
    return LoraConfig(r=rank, alpha=float(rank), target_modules=targets, fan_in_fan_out=fan_in_fan_out,
                      rank_pattern=pattern, alpha_pattern={m: float(k) for m, k in pattern.items()})


def extract_lora(
    finetuned: str | os.PathLike,
    base: str | os.PathLike,
    rank: int,
    out: str | os.PathLike | None = None,
    targets: Sequence[str] | None = None,
    force: bool = False,
    progress: bool = True,
) -> Extracted:
    """A rank-``rank`` LoRA whose deltas best approximate ``finetuned - base``; written to ``out`` (PEFT layout).

    Args:
        finetuned, base: model folders of one architecture (single or sharded safetensors, or .bin).
        rank: the LoRA rank (capped per module at ``min(out, in)``, recorded in ``rank_pattern``).
        out: folder to write atomically; None keeps the adapter in memory.
        targets: leaf module names (``q_proj``, ``c_attn``); default every linear layer of the blocks.

    Example:
        >>> res = extract_lora("llama-ft", "llama", rank=16, out="llama-ft-lora")
        >>> min(res.energy.values())
        0.93...
    """
    from adaptkit.base import checkpoint_fingerprint
    from adaptkit.formats.checkpoint import atomic_output_dir, open_checkpoint
    from adaptkit.formats.peft import write_lora

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InvalidArgumentError(f"rank must be an integer >= 1, got {rank!r}")
    finetuned, base = Path(finetuned), Path(base)
    if out is not None and Path(out).exists() and not force:
        raise OutputExistsError(f"{out} already exists; choose another output folder or pass --force to replace it")
    base_config, facts = _check_same_architecture(finetuned, base)
    ft_ckpt, base_ckpt = open_checkpoint(finetuned), open_checkpoint(base)
    ft_shapes, base_shapes = ft_ckpt.keys_and_shapes(), base_ckpt.keys_and_shapes()
    mismatched = sorted(k for k in ft_shapes if k in base_shapes and ft_shapes[k] != base_shapes[k])
    missing = sorted(set(ft_shapes) ^ set(base_shapes))
    if mismatched or missing:
        bad = mismatched[0] if mismatched else missing[0]
        raise AdapterMismatchError(
            f"{finetuned} and {base} hold different tensors (e.g. {bad}: {ft_shapes.get(bad)} vs {base_shapes.get(bad)}); "
            "give the base it was fine-tuned from"
        )
    all_modules = block_linear_modules(base_shapes, facts.spec)
    chosen = _select_targets(all_modules, targets)
    if not chosen:
        raise InvalidArgumentError(f"{base}: found no linear weights inside the transformer blocks to extract")

    read_base = _ShardReader(base_ckpt)
    layers: dict[str, LoraWeights] = {}
    result = Extracted(adapter=None, path=None, energy={})
    conv1d = False
    shards = tqdm(ft_ckpt.iter_shards(), total=len(ft_ckpt.shards), desc="extracting", unit="shard", disable=not progress)
    for _, tensors in shards:  # one fine-tuned shard in memory at a time
        for key, tuned in tensors.items():
            original = read_base(key)
            if key not in chosen:
                if tuned.is_floating_point() and not torch.equal(tuned, original):
                    diff = (tuned.float() - original.float()).norm() / original.float().norm().clamp_min(1e-12)
                    result.other_changes[key] = float(diff)
                continue
            module = chosen[key]
            delta = tuned.float() - original.float()
            if module.rpartition(".")[2] in facts.spec.conv1d_modules:
                delta, conv1d = delta.T, True  # Conv1D weight is [in, out]
            if not torch.any(delta):
                result.unchanged.append(module)
                continue
            low_rank = truncated_svd(delta, rank)
            layers[module] = LoraWeights(low_rank.A, low_rank.B, 1.0)
            result.energy[module] = low_rank.energy
        del tensors
    if not layers:
        raise InvalidArgumentError(f"{finetuned} equals {base} on every target: there is no difference to extract")

    config = extracted_config({m: w.rank for m, w in layers.items()}, rank, list(all_modules.values()), conv1d)
    architectures = getattr(base_config, "architectures", None) or [None]
    result.adapter = LoraAdapter(config=config, layers=layers, fingerprint=checkpoint_fingerprint(base_ckpt, base_config),
                                 base_class=architectures[0])
    if out is not None:
        with atomic_output_dir(out, force=force, inputs=[finetuned, base]) as tmp:
            write_lora(result.adapter, tmp)
        result.path = Path(out)
        result.adapter.source = str(out)
    return result
