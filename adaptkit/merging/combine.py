"""Combine several LoRAs into one LoRA, in delta-weight space.

For every module the adapters change, the deltas ``dW_i = s_i B_i A_i`` (rsLoRA, rank and alpha
patterns included) are combined by a merge method (:mod:`adaptkit.merging.methods`) and factored back:

- ``linear``: exactly, by concatenating the ranks (rank ``sum_i r_i``);
- ``svd``: the linear sum truncated to ``rank`` (the energy kept is reported per module);
- ``ties``, ``dare_*``, ``magnitude_prune``: the combined delta is generally full rank, so it is
  factored by truncated SVD at ``rank`` (default ``sum_i r_i``) and the energy kept is reported.

The result has scale 1 everywhere (``lora_alpha == r``, per-module ``rank_pattern``/``alpha_pattern``
where ranks differ): ``B`` carries every ``w_i s_i``. DoRA adapters are refused: their effective
delta depends on the base weights and is not low rank.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from adaptkit.adapters.lora import LoraAdapter, LoraConfig, LoraWeights, check_merge_weights
from adaptkit.arch import family_of_class
from adaptkit.errors import AdapterMismatchError, InvalidArgumentError, UnsupportedAdapterError
from adaptkit.formats.detect import load_lora_adapters
from adaptkit.lowrank import LowRank
from adaptkit.merging.methods import MergeMethod, check_method, make_method


@dataclass
class Combined:
    """What :func:`combine_adapters` made: the adapter, where it was written, the energy kept per module."""

    adapter: LoraAdapter
    path: Path | None
    energy: dict[str, float]  # module -> share of ||combined delta||_F^2 kept (1.0: exact)
    method: MergeMethod

    @property
    def exact(self) -> bool:
        return all(e == 1.0 for e in self.energy.values())


def check_same_base(adapters: Sequence[LoraAdapter]) -> None:
    """Raise :class:`AdapterMismatchError` when the adapters were made for different bases."""
    fingerprints = {a.fingerprint: a.source for a in adapters if a.fingerprint}
    if len(fingerprints) > 1:
        pairs = ", ".join(f"{src} -> {fp}" for fp, src in fingerprints.items())
        raise AdapterMismatchError(f"the adapters were made for different bases ({pairs}); combine adapters of one base")
    families = {family_of_class(a.base_class) or a.base_class: a.source for a in adapters if a.base_class}
    if len(families) > 1:
        pairs = ", ".join(f"{src} ({fam})" for fam, src in families.items())
        raise AdapterMismatchError(f"the adapters were made for different architectures: {pairs}")
    shapes: dict[str, tuple[tuple[int, int], str]] = {}
    for adapter in adapters:
        for module, factors in adapter.layers.items():
            shape = (factors.out_features, factors.in_features)
            seen = shapes.setdefault(module, (shape, adapter.source))
            if seen[0] != shape:
                raise AdapterMismatchError(
                    f"{module}: {seen[1]} has [out, in] = {list(seen[0])} but {adapter.source} has {list(shape)}; "
                    "the adapters were made for different bases"
                )


def _resolve_method(method, density, seed, rank, normalize=None) -> tuple[MergeMethod, int | None]:
    """The method object, and the rank at which a non-exact, non-``svd`` result is factored."""
    cls = type(method) if isinstance(method, MergeMethod) else check_method(method) if isinstance(method, str) else None
    if cls is not None and "rank" in cls.parameters:
        return make_method(method, density, seed, rank, normalize), None
    merge_method = make_method(method, density, seed, normalize=normalize)
    if merge_method.is_linear and rank is not None:
        raise InvalidArgumentError(
            f"method {merge_method.name!r} is exact as an adapter of rank sum(r_i), so it takes no rank; "
            f"to truncate to rank {rank}, use method 'svd' with rank={rank}"
        )
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise InvalidArgumentError(f"rank must be an integer >= 1, got {rank!r}")
    return merge_method, rank


def _saved_modules(adapters: Sequence[LoraAdapter], weights: Sequence[float]) -> dict:
    saved: dict[str, dict[str, torch.Tensor]] = {}
    for adapter, w in zip(adapters, weights):
        for module, params in adapter.saved_modules.items():
            if w != 1.0:
                raise UnsupportedAdapterError(f"{adapter.source}: modules_to_save ({module}) can only be combined with weight 1")
            if module in saved:
                raise UnsupportedAdapterError(f"{module} is replaced by two adapters (modules_to_save); keep one of them")
            saved[module] = params
    return saved


def _selection(adapters: Sequence[LoraAdapter], modules: Sequence[str]) -> dict:
    """Which modules the combined config targets: the inputs' shared rule, else the exact module names."""
    def rule(c: LoraConfig):
        return c.target_modules, c.layers_to_transform, c.layers_pattern, c.exclude_modules

    first = adapters[0].config
    if all(rule(a.config) == rule(first) for a in adapters):
        return dict(target_modules=first.target_modules, layers_to_transform=first.layers_to_transform,
                    layers_pattern=first.layers_pattern, exclude_modules=first.exclude_modules)
    return dict(target_modules=tuple(modules))


def combined_config(adapters: Sequence[LoraAdapter], ranks: dict[str, int], lora_bias: bool) -> LoraConfig:
    """A config with scale 1 on every module: ``alpha == r``, patterns for the modules whose rank differs."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
    modules_to_save = tuple(sorted({m for a in adapters for m in a.config.modules_to_save}))
    return LoraConfig(
        r=r, alpha=float(r), use_rslora=False, use_dora=False,
        fan_in_fan_out=any(a.config.fan_in_fan_out for a in adapters), lora_bias=lora_bias,
        rank_pattern=pattern, alpha_pattern={m: float(k) for m, k in pattern.items()},
        modules_to_save=modules_to_save, **_selection(adapters, list(ranks)),
    )


def combine_adapters(
    adapters: Sequence,
    weights: Sequence[float] | None = None,
    method: str | MergeMethod = "linear",
    out: str | os.PathLike | None = None,
    *,
    density: float | None = None,
    seed: int | None = None,
    rank: int | None = None,
    normalize: bool | None = None,
    force: bool = False,
    progress: bool = True,
) -> Combined:
    """Combine LoRA adapters (paths or loaded) into one LoRA; write it to ``out`` in the PEFT layout.

    Args:
        adapters: two or more LoRA folders (or :class:`LoraAdapter` objects) of one base.
        weights: one per adapter (default all 1); negative weights subtract (``linear``).
        method: a name from :data:`~adaptkit.merging.methods.MERGE_METHODS` or a method object.
        out: folder to write (atomically: nothing is left behind on failure); None keeps it in memory.
        density, seed: for ``ties``, ``dare_*``, ``magnitude_prune``; normalize: ``ties``, ``dare_ties``.
        rank: ``svd``: the target rank; ``ties``/``dare_*``/``magnitude_prune``: the rank the combined
            delta is factored at (default ``sum_i r_i``); not accepted by ``linear`` (exact).

    Example:
        >>> res = combine_adapters(["sql", "tone"], [0.7, 0.3], "linear", out="sql+tone")
        >>> res.exact
        True
    """
    merge_method, out_rank = _resolve_method(method, density, seed, rank, normalize)
    loaded = load_lora_adapters(adapters)
    weights = check_merge_weights(loaded, weights)
    merge_method.check_weights(weights)
    for adapter in loaded:
        if adapter.config.use_dora:
            raise UnsupportedAdapterError(
                f"{adapter.source}: DoRA adapters cannot be combined into a LoRA (the DoRA update depends on the base "
                "weights and is not low rank); merge it into the base with merge_checkpoint instead"
            )
        if adapter.needs_base_residual:
            raise UnsupportedAdapterError(
                f"{adapter.source}: init_lora_weights={adapter.config.init_lora_weights!r} changes the base weights "
                "(PEFT subtracts a part of them at load), which a combination without the base cannot carry; merge "
                "it into the base with merge_checkpoint instead")
        if any(getattr(w, "exact_only", False) for w in adapter.layers.values()):
            raise UnsupportedAdapterError(
                f"{adapter.source}: a {adapter.peft_type} adapter cannot be combined into a LoRA: its update is not a "
                "product of low-rank factors (LoHa: a Hadamard product, LoKr: a Kronecker product, IA3: a rescaling of "
                "the base weights), so a LoRA could only approximate it; merge it into the base with merge_checkpoint "
                "instead")
    check_same_base(loaded)
    saved = _saved_modules(loaded, weights)

    modules = list(dict.fromkeys(m for a in loaded for m in a.layers))
    layers: dict[str, LoraWeights] = {}
    energy: dict[str, float] = {}
    for module in tqdm(modules, desc=f"combining ({merge_method.name})", unit="module", disable=not progress):
        parts = [(a.layers[module], w, i) for i, (a, w) in enumerate(zip(loaded, weights)) if module in a.layers]
        deltas = [LowRank(B=f.scale * f.lora_B.float(), A=f.lora_A.float()) for f, _, _ in parts]
        ws, indices = [w for _, w, _ in parts], [i for _, _, i in parts]
        key = f"{module}.weight"
        k = None if "rank" in merge_method.parameters else out_rank or min(sum(d.rank for d in deltas), *deltas[0].shape)
        factors = merge_method.factor(deltas, ws, key, indices, k)
        energy[module] = factors.energy
        bias = None
        if any(f.lora_B_bias is not None for f, _, _ in parts):
            bias_deltas = [f.scale * (f.lora_B_bias.float() if f.lora_B_bias is not None else torch.zeros(f.out_features))
                           for f, _, _ in parts]
            bias = merge_method.combine(bias_deltas, ws, f"{module}.bias", indices)
        layers[module] = LoraWeights(factors.A.contiguous(), factors.B.contiguous(), 1.0, lora_B_bias=bias)

    config = combined_config(loaded, {m: w.rank for m, w in layers.items()}, any(w.lora_B_bias is not None for w in layers.values()))
    combined = LoraAdapter(
        config=config, layers=layers, saved_modules=saved,
        fingerprint=next((a.fingerprint for a in loaded if a.fingerprint), None),
        base_class=next((a.base_class for a in loaded if a.base_class), None),
    )
    path = None
    if out is not None:
        from adaptkit.formats.checkpoint import atomic_output_dir
        from adaptkit.formats.peft import write_lora

        with atomic_output_dir(out, force=force, inputs=adapters) as tmp:
            write_lora(combined, tmp)
        path = Path(out)
        combined.source = str(path)
    return Combined(adapter=combined, path=path, energy=energy, method=merge_method)
