"""LoRA merge math, and the streaming merge of adapters into a standalone checkpoint.

Merging is explicit and pure: :func:`merged_weight` computes a new weight from a base weight and
LoRA contributions; callers decide where it goes. All arithmetic is in float32 and cast once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from adaptkit.adapters.lora import (
    Contribution,
    LoraAdapter,
    TokenRows,
    check_merge_weights,
    check_saved_base_weights,
    fold_base_residual,
    fold_trained_biases,
    merged_bias,
    merged_weight,
)
from adaptkit.adapters.peft_types import bind_base_layers, layer_from_tensors, needs_base_layers
from adaptkit.arch import facts_from_config
from adaptkit.base import checkpoint_fingerprint, load_base, meta_model, parse_dtype, read_config
from adaptkit.compositions import Mix
from adaptkit.describe import check_fits_checkpoint
from adaptkit.engine import Engine
from adaptkit.errors import AdapterMismatchError, UnsupportedAdapterError
from adaptkit.formats.detect import load_lora_adapters
from adaptkit.hub import local_path
from adaptkit.inject import base_modules
from adaptkit.lowrank import LowRank
from adaptkit.merging.in_memory import merge_into_loaded_model, needs_loaded_model
from adaptkit.merging.methods import MERGE_METHODS, MergeMethod, check_method, make_method  # noqa: F401 (re-exported)


@dataclass
class _TensorUpdate:
    """What to do to one checkpoint tensor."""

    contributions: list[Contribution]
    transposed: bool = False  # GPT-2 Conv1D stores [in, out]
    is_bias: bool = False
    replacement: torch.Tensor | None = None  # modules_to_save
    module: str = ""  # the adapters' module name: the key that seeds random merge methods
    indices: list[int] = field(default_factory=list)  # position of each contribution's adapter in the merge


def _checkpoint_key(module: str, param: str, shapes: dict) -> str | None:
    """The checkpoint key of ``module.param``, allowing for a missing/extra base-model prefix."""
    candidates = [f"{module}.{param}"]
    for prefix in ("model.", "transformer.", "bert.", "roberta."):
        if module.startswith(prefix):
            candidates.append(f"{module[len(prefix):]}.{param}")
        else:
            candidates.append(f"{prefix}{module}.{param}")
    return next((c for c in candidates if c in shapes), None)


def plan_tensor_updates(
    adapters: Sequence[LoraAdapter], weights: Sequence[float], shapes: dict[str, tuple[int, ...]], spec, where: str,
    positions: Sequence[int] | None = None,
) -> tuple[dict[str, _TensorUpdate], dict[str, torch.Tensor]]:
    """Map every adapter tensor onto checkpoint keys, checking shapes before anything is written.

    ``positions``: each adapter's place in the whole merge (default 0, 1, ...), which seeds random methods.
    Returns the per-key updates and the new tensors that the checkpoint lacks (an untied lm_head).
    """
    updates: dict[str, _TensorUpdate] = {}
    added: dict[str, torch.Tensor] = {}
    positions = range(len(adapters)) if positions is None else positions
    for index, adapter, w in zip(positions, adapters, weights):
        source = adapter.source or "adapter"
        for module, factors in adapter.layers.items():
            key = _checkpoint_key(module, "weight", shapes)
            if key is None:
                raise AdapterMismatchError(f"{source}: {module}.weight is not in {where}; the adapter is for another base")
            transposed = module.rpartition(".")[2] in spec.conv1d_modules or getattr(factors, "embedding", False)
            expected = (factors.in_features, factors.out_features) if transposed else (factors.out_features, factors.in_features)
            if tuple(shapes[key]) != expected:
                raise AdapterMismatchError(
                    f"{source}: {key} has shape {tuple(shapes[key])} in {where} but the LoRA needs {expected}"
                )
            update = updates.setdefault(key, _TensorUpdate([], transposed=transposed, module=module))
            update.contributions.append((factors, w))
            update.indices.append(index)
            if factors.lora_B_bias is not None:
                bias_key = _checkpoint_key(module, "bias", shapes)
                if bias_key is None:
                    raise AdapterMismatchError(f"{source}: lora_bias needs {module}.bias, which {where} lacks")
                update = updates.setdefault(bias_key, _TensorUpdate([], is_bias=True, module=module))
                update.contributions.append((factors, w))
                update.indices.append(index)
        for module, params in adapter.saved_modules.items():
            if w != 1.0:
                raise UnsupportedAdapterError(f"{source}: modules_to_save ({module}) can only be merged with weight 1")
            for param, tensor in params.items():
                key = _checkpoint_key(module, param, shapes)
                if key is None:
                    added[f"{module}.{param}"] = tensor  # e.g. an lm_head tied to the embeddings in the base
                    continue
                if tuple(shapes[key]) != tuple(tensor.shape):
                    raise AdapterMismatchError(f"{source}: {key}: adapter has {tuple(tensor.shape)}, {where} has {shapes[key]}")
                if key in updates and updates[key].replacement is not None:
                    raise UnsupportedAdapterError(f"{key} is replaced by two adapters (modules_to_save); merge one of them")
                updates.setdefault(key, _TensorUpdate([])).replacement = tensor
    return updates, added


class FineTune:
    """A full fine-tune of the base as a merge source: its delta on a tensor is ``W_ft - W_base``.

    The fine-tune must hold every tensor of the base with the same shape (checked from the headers
    before anything is written); its tensors are read one at a time, as the base's shards stream by.
    """

    def __init__(self, folder: str | os.PathLike, base_shapes: dict[str, tuple[int, ...]], base_config):
        from adaptkit.formats.checkpoint import open_checkpoint

        self.folder = local_path(folder)
        self.checkpoint = open_checkpoint(self.folder)
        config = read_config(self.folder)
        for field_name in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
            mine, theirs = getattr(config, field_name, None), getattr(base_config, field_name, None)
            if mine != theirs:
                raise AdapterMismatchError(
                    f"{self.folder}: config.json has {field_name} = {mine!r} but the base has {theirs!r}; a full "
                    "fine-tune merges only into the model it was tuned from")
        shapes = self.checkpoint.keys_and_shapes()
        for key, shape in base_shapes.items():
            if key not in shapes:
                raise AdapterMismatchError(f"{self.folder}: has no tensor {key!r}, which the base has; "
                                           "a full fine-tune must hold every tensor of its base")
            if tuple(shapes[key]) != tuple(shape):
                raise AdapterMismatchError(f"{self.folder}: {key} has shape {tuple(shapes[key])}, the base "
                                           f"{tuple(shape)} (a resized vocabulary cannot be merged as a delta)")
        self.source = str(self.folder)

    def delta(self, key: str, base_tensor: torch.Tensor) -> torch.Tensor:
        return self.checkpoint.read_tensor(key).float() - base_tensor.float()


def apply_update(tensor: torch.Tensor, update: _TensorUpdate, method: MergeMethod | None = None) -> torch.Tensor:
    """The merged tensor (float32) for one checkpoint tensor; ``method`` combines the deltas (default linear)."""
    if update.replacement is not None:
        return update.replacement.float()
    if method is not None and not method.is_linear:
        return _apply_method(tensor, update, method)
    if update.is_bias:
        return merged_bias(tensor, update.contributions)
    weight = tensor.float().T if update.transposed else tensor.float()
    merged = merged_weight(weight, update.contributions)
    return merged.T.contiguous() if update.transposed else merged


def apply_with_fine_tunes(tensor: torch.Tensor, key: str, update: _TensorUpdate | None,
                          tuned: Sequence[tuple[int, FineTune, float]], method: MergeMethod) -> torch.Tensor:
    """``W + method(deltas)`` where full fine-tunes (``(position, fine-tune, weight)``) change this tensor too.

    Every delta is in the checkpoint's orientation; the method's seed key is the checkpoint key.
    """
    if update is not None and update.replacement is not None:
        raise UnsupportedAdapterError(f"{key} is replaced by an adapter's modules_to_save and changed by a full "
                                      "fine-tune; merge one of them")
    deltas, weights, positions = [], [], []
    for factors, w in update.contributions if update is not None else ():
        if update.is_bias:
            deltas.append(factors.scale * factors.lora_B_bias.float())
        else:
            low_rank = LowRank(B=factors.scale * factors.lora_B.float(), A=factors.lora_A.float())
            deltas.append(LowRank(B=low_rank.A.T, A=low_rank.B.T) if update.transposed else low_rank)
        weights.append(w)
    positions.extend(update.indices if update is not None else ())
    for position, fine_tune, w in tuned:
        deltas.append(fine_tune.delta(key, tensor))
        weights.append(w)
        positions.append(position)
    return tensor.float() + method.combine(deltas, weights, key, positions)


def _apply_method(tensor: torch.Tensor, update: _TensorUpdate, method: MergeMethod) -> torch.Tensor:
    """``W + method(w_i, dW_i)``: the method runs on the deltas (``s_i B_i A_i``, or ``s_i * bias_B_i``; the dense
    ``delta_weight()`` of weights with no low-rank factors: LoHa, LoKr, (IA)^3)."""
    weights = [w for _, w in update.contributions]
    if update.is_bias:
        deltas = [f.scale * f.lora_B_bias.float() for f, _ in update.contributions]
        return tensor.float() + method.combine(deltas, weights, f"{update.module}.bias", update.indices)
    deltas = [f.delta_weight() if getattr(f, "exact_only", False) else LowRank(B=f.scale * f.lora_B.float(),
                                                                                A=f.lora_A.float())
              for f, _ in update.contributions]
    combined = method.combine(deltas, weights, f"{update.module}.weight", update.indices)  # [out, in]
    return tensor.float() + (combined.T if update.transposed else combined)


def merge_checkpoint(
    base: str | os.PathLike,
    adapters: Sequence,
    out: str | os.PathLike,
    weights: Sequence[float] | None = None,
    dtype: str | torch.dtype | None = None,
    method: str | MergeMethod = "linear",
    force: bool = False,
    progress: bool = True,
    *,
    density: float | None = None,
    seed: int | None = None,
    rank: int | None = None,
    normalize: bool | None = None,
) -> Path:
    """Merge LoRA adapters (and full fine-tunes) into a base checkpoint, one shard at a time.

    ``out`` holds sharded safetensors (the base's shard layout), an index, the config, tokenizer and
    generation config: ``transformers.AutoModelForCausalLM.from_pretrained(out)`` loads it without
    adaptkit. Each merged tensor is ``W + sum_i w_i * dW_i`` computed in float32, then cast to
    ``dtype`` (default: the tensor's own dtype). Nothing is written to ``out`` unless it all works.

    An entry of ``adapters`` may also be a full fine-tune of ``base`` (a model folder): its delta
    on each tensor is ``W_ft - W`` (task arithmetic on checkpoints, as mergekit merges models).

    ``method`` (see :mod:`adaptkit.merging.methods`) combines the deltas of each tensor: ``linear``
    (default), ``svd`` (``rank``), ``ties``/``magnitude_prune`` (``density``), ``dare_linear``/``dare_ties``
    (``density``, ``seed``); ``ties``/``dare_ties`` take ``normalize``. For ``svd`` the energy kept per
    tensor is written to ``adaptkit_merge.json``.

    Example:
        >>> merge_checkpoint("tiny-llama", ["sql-lora", "tone-lora"], "merged", weights=[0.7, 0.3])
    """
    from adaptkit.formats.checkpoint import (
        atomic_output_dir,
        copy_side_files,
        open_checkpoint,
        write_shards,
    )
    from adaptkit.formats.detect import is_model_folder

    merge_method = make_method(method, density=density, seed=seed, rank=rank, normalize=normalize)
    base = local_path(base)
    config = read_config(base)
    checkpoint = open_checkpoint(base)
    shapes = checkpoint.keys_and_shapes()
    full = [i for i, a in enumerate(adapters) if not isinstance(a, LoraAdapter) and is_model_folder(a)]
    tuned = {i: FineTune(adapters[i], shapes, config) for i in full}
    lora_positions = [i for i in range(len(adapters)) if i not in tuned]
    facts = facts_from_config(config)
    loaded = load_lora_adapters([adapters[i] for i in lora_positions])
    out_dtype = None if dtype in (None, "auto") else parse_dtype(dtype)  # auto: as stored
    tied = tied_head(base, config, shapes)
    plan_shapes = shapes if tied is None else {**shapes, tied[0]: shapes[tied[1]]}  # the head, as its own tensor
    reason = None if tuned else needs_loaded_model(loaded, plan_shapes,
                                                   functools.cache(lambda: base_modules(meta_model(base))))
    if reason is not None:
        weights = check_merge_weights(adapters, weights)
        merge_method.check_weights(weights)
        check_fits_checkpoint(loaded, base)
        with atomic_output_dir(out, force=force, inputs=[base]) as tmp:
            extra = merge_into_loaded_model(base, loaded, weights, tmp, out_dtype, merge_method, reason)
            record = {"base": str(base), "adapters": [a.source for a in loaded], "weights": weights,
                      "method": merge_method.name, "dtype": None if out_dtype is None else str(out_dtype)[6:],
                      "base_fingerprint": checkpoint_fingerprint(checkpoint, config), **extra}
            (tmp / "adaptkit_merge.json").write_text(json.dumps({"adaptkit_merge": record}, indent=2))
        return Path(out)
    loaded = [fold_base_residual(a, _stored_weight(checkpoint, shapes, facts.spec)) for a in loaded]
    bias_of = _stored_tensor(checkpoint, shapes, None)
    loaded = [fold_trained_biases(a, lambda m: bias_of(m, "bias")) for a in loaded]
    weight_of = _stored_weight(checkpoint, shapes, facts.spec)
    loaded = [bind_base_layers(a, lambda m: layer_from_tensors(weight_of(m)[0], bias_of(m, "bias")))
              if needs_base_layers(a) else a for a in loaded]  # (IA)^3, VeRA: bound to the checkpoint's tensors
    token_rows = [{m: w for m, w in a.layers.items() if isinstance(w, TokenRows)} for a in loaded]
    loaded = [dataclasses.replace(a, layers={m: w for m, w in a.layers.items() if m not in rows})
              for a, rows in zip(loaded, token_rows)]
    weights = check_merge_weights(adapters, weights)
    merge_method.check_weights(weights)
    if not merge_method.is_linear or tuned:
        for adapter in loaded:
            if adapter.config.use_dora:
                raise UnsupportedAdapterError(
                    f"{adapter.source}: a DoRA adapter merges only with method 'linear' (alone, weight 1); "
                    f"method {merge_method.name!r} needs additive deltas, which DoRA (row-normalised) does not have"
                )
    check_fits_checkpoint(loaded, base)
    updates, added = plan_tensor_updates(loaded, [weights[i] for i in lora_positions], plan_shapes, facts.spec,
                                         where=str(base), positions=lora_positions)
    for adapter in loaded:
        check_saved_base_weights(adapter, _stored_tensor(checkpoint, plan_shapes, tied))
    for position, rows in zip(lora_positions, token_rows):
        _plan_token_rows(rows, weights[position], checkpoint, plan_shapes, tied, updates)
    untied = None
    if tied is not None and (tied[0] in updates or tied[1] in updates):
        # the head (or the embeddings) changes alone: write the head as its own tensor and untie them,
        # so the merged model computes what the unmerged adapters do (PEFT's merge_and_unload does not)
        head_key, embed_key = tied
        embeddings = checkpoint.read_tensor(embed_key)
        update = updates.pop(head_key, None)
        added[head_key] = apply_update(embeddings, update, merge_method) if update is not None else embeddings
        untied = (f"{head_key} written as its own tensor (tie_word_embeddings: false): the adapters change "
                  f"{'the output head' if update is not None else 'the input embeddings'} only")
    changed_by_all = [(i, fine_tune, weights[i]) for i, fine_tune in tuned.items()]

    def merged_tensor(key: str, tensor: torch.Tensor) -> torch.Tensor:
        if changed_by_all and tensor.is_floating_point():
            return apply_with_fine_tunes(tensor, key, updates.get(key), changed_by_all, merge_method)
        return apply_update(tensor, updates[key], merge_method) if key in updates else tensor

    def merged_shards():  # one input shard in memory at a time
        for _, tensors in checkpoint.iter_shards():
            merged = {}
            for key, tensor in tensors.items():
                new = merged_tensor(key, tensor)
                target = out_dtype if (out_dtype is not None and tensor.is_floating_point()) else tensor.dtype
                merged[key] = new.to(target)
            yield merged

    n_shards = len(checkpoint.shards)
    with atomic_output_dir(out, force=force, inputs=[base, *[a for a in adapters if not isinstance(a, LoraAdapter)]]) as tmp:
        shards = tqdm(merged_shards(), total=n_shards, desc="merging shards", unit="shard", disable=not progress)
        write_shards(tmp, shards, n_shards, {key: t.to(out_dtype or t.dtype) for key, t in added.items()})
        config_updates = {}
        if out_dtype is not None:
            config_updates["dtype"] = str(out_dtype).removeprefix("torch.")
        if added:
            config_updates["tie_word_embeddings"] = False
        copy_side_files(base, tmp, config_updates)
        sources = {i: a.source for i, a in zip(lora_positions, loaded)} | {i: t.source for i, t in tuned.items()}
        record = {
            "adaptkit_merge": {
                "base": str(base),
                "adapters": [sources[i] for i in range(len(adapters))],
                "full_fine_tunes": [sources[i] for i in sorted(tuned)],
                "weights": weights,
                "method": method if isinstance(method, str) else merge_method.name,
                "method_params": merge_method.params(),
                "dtype": config_updates.get("dtype"),
                "base_fingerprint": checkpoint_fingerprint(checkpoint, config),
            }
        }
        if merge_method.energy:
            record["adaptkit_merge"]["energy_kept"] = merge_method.energy
        if untied:
            record["adaptkit_merge"]["untied"] = untied
        (tmp / "adaptkit_merge.json").write_text(json.dumps(record, indent=2))
    return Path(out)


def tied_head(base, config, shapes: dict) -> tuple[str, str] | None:
    """(head key, embeddings key) when ``base`` ties its output head to its input embeddings and the
    checkpoint stores the embeddings only; else None."""
    if not getattr(config, "tie_word_embeddings", False):
        return None
    from adaptkit.base import meta_model

    model = meta_model(base)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    head_key = _checkpoint_key(names[id(head)], "weight", shapes)
    embed_key = _checkpoint_key(names[id(embed)], "weight", shapes)
    if head_key is not None or embed_key is None:
        return None  # the checkpoint stores the head itself: nothing to untie
    return f"{names[id(head)]}.weight", embed_key


def _plan_token_rows(rows: dict, weight: float, checkpoint, shapes: dict, tied, updates: dict) -> None:
    """New token rows (``trainable_token_indices``) as replacements of the tables they change (and of the
    output head tied to the input embeddings, as PEFT ties them)."""
    for module, token_rows in rows.items():
        key = _checkpoint_key(module, "weight", shapes)
        if key is None:
            raise AdapterMismatchError(f"{module}.weight is not in {checkpoint.folder}; the adapter is for another base")
        if weight != 1.0:
            raise UnsupportedAdapterError(f"{module}: trainable token rows replace the base's rows; merge them with "
                                          "weight 1")
        keys = [key] + ([tied[0]] if tied is not None and key == tied[1] else [])
        for target in keys:
            if target in updates:
                raise UnsupportedAdapterError(f"{target} is changed by trainable token rows and by another adapter; "
                                              "merge one of them")
            source = tied[1] if tied is not None and target == tied[0] else target
            updates[target] = _TensorUpdate([], replacement=token_rows.replaced(checkpoint.read_tensor(source)))


def _stored_tensor(checkpoint, shapes: dict, tied):
    """``base_tensor`` for :func:`check_saved_base_weights` from a checkpoint (a tied head reads the embeddings)."""

    def base_tensor(module: str, param: str):
        key = _checkpoint_key(module, param, shapes)
        if key is not None and tied is not None and key == tied[0]:
            key = tied[1]
        return None if key is None else checkpoint.read_tensor(key)

    return base_tensor


def _stored_weight(checkpoint, shapes: dict, spec):
    """``weight_of`` for :func:`fold_base_residual` from a checkpoint: ([out, in] float32, is Conv1D)."""

    def weight_of(module: str):
        key = _checkpoint_key(module, "weight", shapes)
        if key is None:
            raise AdapterMismatchError(f"{module}.weight is not in {checkpoint.folder}; the adapter is for another base")
        conv1d = module.rpartition(".")[2] in spec.conv1d_modules
        tensor = checkpoint.read_tensor(key).float()
        return (tensor.T if conv1d else tensor), conv1d

    return weight_of


def probe_ids(vocab_size: int, batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    """A fixed random batch of token ids used to compare two models."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch, length), generator=gen)


def attach_unmerged(engine, adapters: Sequence, weights: Sequence[float] | None = None):
    """Add the LoRAs to ``engine`` (as a0, a1, ...); returns the row entry that applies them with ``weights``
    unmerged: the reference a merge is checked against."""
    loaded = load_lora_adapters(adapters)
    weights = check_merge_weights(loaded, weights)
    names = [f"a{i}" for i in range(len(loaded))]
    for name, adapter in zip(names, loaded):
        engine.add_adapter(name, adapter)
    return Mix(dict(zip(names, weights))) if len(names) > 1 or weights != [1.0] else names[0]


def verify_merged_checkpoint(
    base: str | os.PathLike, adapters: Sequence, merged: str | os.PathLike, weights: Sequence[float] | None = None,
    device: str = "cpu",
) -> float:
    """Max abs logit difference between ``merged`` (loaded as a plain model) and base + adapters unmerged."""
    engine = Engine.from_pretrained(base, device=device)
    entry = attach_unmerged(engine, adapters, weights)
    ids = probe_ids(engine.base.facts.vocab_size)
    expected = engine.logits(ids, adapters=entry)
    plain = load_base(merged, device=device).model
    with torch.inference_mode():
        out = plain(input_ids=ids.to(device))
    got = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return float((got.float() - expected.float()).abs().max())


def storage_rounding(base: str | os.PathLike, dtype: str | torch.dtype | None, device: str = "cpu") -> float:
    """Max abs logit change, on the verification probe, from storing the *base's* weights in ``dtype``.

    A checkpoint merged into ``dtype`` carries this rounding whatever the adapters: it is the error
    a correct merge is expected to show (0 for float32, where only summation order differs).
    """
    target = None if dtype in (None, "auto") else parse_dtype(dtype)
    if target is None or target == torch.float32:
        return 0.0
    model = load_base(base, device=device).model
    ids = probe_ids(facts_from_config(read_config(base)).vocab_size).to(device)
    with torch.inference_mode():
        reference = model(input_ids=ids).logits.float()
        for param in model.parameters():
            param.data = param.data.to(target).float()
        rounded = model(input_ids=ids).logits.float()
    return float((rounded - reference).abs().max())


def verify_verdict(diff: float, rounding: float, dtype, what: str = "merged vs unmerged") -> str:
    """The ``--verify`` line: the figure, what the output dtype makes expected, and whether it is fine.

    float32: only the order of summation differs, about 1e-6 on a small model and up to a few 1e-4 on
    a deep one with large logits (SmolLM2-135M: ~1e-4), so up to 1e-3 is fine; a wrong merge shows
    1e-2 or more. 16-bit outputs: twice what storing the base alone in that dtype does (``rounding``).
    """
    expected = max(2.0 * rounding, 1e-3)
    why = ("float32: only summation order differs, up to a few 1e-4 on deep models" if rounding == 0.0 else
           f"storing the base alone in {dtype} moves its logits by {rounding:.1e}; up to 2x that is expected")
    verdict = "fine" if diff <= expected else "MORE than expected: check the adapters, weights and --dtype"
    return f"verify: max abs logit difference {what} = {diff:.3e} ({why}): {verdict}"
