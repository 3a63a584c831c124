"""Serving prefix and prompt adapters through a model's public inputs, their K/V computed once.

No module of the model is touched. A batch whose rows use prefix adapters, prompt adapters or
none is run with::

    cache           per layer K, V: [B, H_kv, P_max, D]; row i's P_i entries right-aligned, zeros before
    attention_mask  [B, P_max + S] = [prefix mask ; caller's mask]
    position_ids    caller's positions + P_i: each row continues after its own prefix

Prompt adapters on a causal LM are served the same way: the virtual tokens precede every real
token and causal attention keeps them from seeing anything after them, so their per-layer K/V
depend only on the weights. :func:`prompt_kv` runs the model once on them at load and the result
is served exactly like a prefix. A row that stacks a prompt with other adapters (``ak.Stack("lora",
"prompt")``) gets K/V computed with those adapters active, because a LoRA on the layers that produce
K/V changes them; that result is computed on first use and kept per combination.

On encoders, or with ``Engine.prompt_as_cache = False``, prompt embeddings are prepended instead
(``inputs_embeds``, each row's block right-aligned and masked) and their output columns stripped.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from adaptkit import inject
from adaptkit.adapters.prefix import KIND as PREFIX_KIND
from adaptkit.adapters.prefix import PrefixAdapter, PrefixConfig, check_prefix_fits
from adaptkit.adapters.prompt import KIND as PROMPT_KIND
from adaptkit.adapters.prompt import PromptAdapter, check_prompt_fits
from adaptkit.arch import decoder_layers
from adaptkit.compositions import Fuse, Mix, RowEntry, Stack, members_of
from adaptkit.errors import UnsupportedAdapterError
from adaptkit.generation import new_cache
from adaptkit.measured import cache_argument, facts_of
from adaptkit.routing import RoutingPlan, route_rows, use_plan

VIRTUAL_KINDS = (PREFIX_KIND, PROMPT_KIND)


@dataclass(frozen=True)
class PrefixKV:
    """Keys and values of ``P`` virtual positions in every layer, each [L, H_kv, P, D]."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def length(self) -> int:
        return self.keys.shape[2]


def prompt_kv(model: nn.Module, embeddings: torch.Tensor, entry: RowEntry = None) -> PrefixKV:
    """The per-layer K/V of soft-prompt ``embeddings`` [P, hidden] run alone through ``model``.

    Positions are ``0..P-1`` (as when they are prepended). ``entry`` (a LoRA name, ``ak.Stack``, ...)
    is active during the run, so its effect on the virtual tokens is included.
    """
    cache = new_cache(model)  # full layers where some slide: a sliding layer would keep only the last W-1 of P
    with torch.no_grad(), use_plan(route_rows([entry], device=embeddings.device)):
        model(inputs_embeds=embeddings.unsqueeze(0), use_cache=True, **{cache_argument(model): cache})
    keys = torch.stack([layer.keys[0] for layer in cache.layers])
    values = torch.stack([layer.values[0] for layer in cache.layers])
    return PrefixKV(keys, values)


# ----------------------------------------------------------------- engine handlers (kinds.KIND_HANDLERS)
def attach_prefix(model: nn.Module, name: str, adapter: PrefixAdapter, dtype: torch.dtype, device) -> None:
    """Check the prefix fits the base; put its K/V on the base's device and dtype; register its stored
    modules (a task head) if it has any."""
    facts = facts_of(model)
    check_prefix_fits(adapter, facts)
    inject.check_saved_fits(inject.base_modules(model), adapter.saved_modules, adapter.source or "prefix adapter")
    adapter.to(device, dtype)
    inject.attach_saved(model, name, adapter.saved_modules)


def attach_prompt(model: nn.Module, name: str, adapter: PromptAdapter, dtype: torch.dtype, device) -> None:
    """Check the prompt fits the base; on a causal LM compute its virtual tokens' K/V now, once."""
    facts = facts_of(model)
    check_prompt_fits(adapter, facts)
    if adapter.saved_modules:
        _check_prompt_heads(model, adapter, facts)
    adapter.to(device, dtype)
    if facts.caches_uniform_kv:
        served_prompt_kv(model, adapter, None, {})
    inject.attach_saved(model, name, adapter.saved_modules)


def _check_prompt_heads(model: nn.Module, adapter: PromptAdapter, facts) -> None:
    """A prompt's stored modules (a task head) must fit the base; on a causal LM they must sit outside the
    blocks, which the virtual tokens' K/V (computed once, without them) pass through."""
    modules = inject.base_modules(model)
    inject.check_saved_fits(modules, adapter.saved_modules, adapter.source or "prompt adapter")
    if facts.spec.is_causal:
        blocks, _ = decoder_layers(model, facts.spec)
        inside = [m for m in adapter.saved_modules if m.startswith(blocks + ".")]
        if inside:
            raise UnsupportedAdapterError(
                f"{adapter.source or 'prompt adapter'}: modules_to_save {inside} sit inside the transformer blocks, "
                "which the prompt's K/V pass through; adaptkit serves stored heads and embeddings with prompts only")


def detach_prefix(model: nn.Module, name: str, adapter: PrefixAdapter) -> None:
    """Remove its stored modules (the K/V live in the adapter object, not in the model)."""
    inject.detach_saved(model, name, adapter.saved_modules)


def detach_prompt(model: nn.Module, name: str, adapter: PromptAdapter) -> None:
    """Forget the K/V computed for this model; remove its stored modules."""
    inject.detach_saved(model, name, adapter.saved_modules)
    for key in [k for k in adapter.served_kv if k[0] == id(model)]:
        del adapter.served_kv[key]


def served_prompt_kv(model: nn.Module, adapter: PromptAdapter, rest: RowEntry, adapters: dict) -> PrefixKV:
    """The prompt's K/V on ``model`` with the row's other adapters ``rest`` active, computed once.

    Entries are keyed by (model, rest) and remember the adapter objects they were computed with,
    so a removed or replaced adapter of the same name never serves a stale result.
    """
    members = tuple(adapters[n] for n in members_of(rest))
    key = (id(model), rest)
    found = adapter.served_kv.get(key)
    if found is not None:
        model_ref, member_refs, kv = found
        if model_ref() is model and tuple(ref() for ref in member_refs) == members:
            return kv
    for old_key, (model_ref, member_refs, _) in list(adapter.served_kv.items()):
        if model_ref() is None or any(ref() is None for ref in member_refs):
            del adapter.served_kv[old_key]
    kv = prompt_kv(model, adapter.embeddings, rest)
    adapter.served_kv[key] = (weakref.ref(model), tuple(weakref.ref(m) for m in members), kv)
    return kv


# ----------------------------------------------------------------- per-batch inputs
def split_virtual(entry: RowEntry, adapters: dict) -> tuple[str | None, RowEntry]:
    """(the row's prefix/prompt adapter, the rest of its entry), or (None, entry) when it has none."""
    members = members_of(entry)
    virtual = [n for n in members if adapters[n].kind in VIRTUAL_KINDS]
    if not virtual:
        return None, entry
    name = virtual[0]
    if len(virtual) > 1:
        raise UnsupportedAdapterError(
            f"row {entry!r} uses {len(virtual)} prefix/prompt adapters ({', '.join(virtual)}); a row can use one"
        )
    if isinstance(entry, Fuse):
        raise UnsupportedAdapterError(f"{name!r} is a {adapters[name].kind} adapter; ak.Fuse combines bottleneck adapters")
    if members[name] != 1.0:
        raise UnsupportedAdapterError(
            f"{name!r} has weight {members[name]} in {entry!r}; a prefix or prompt cannot be weighted (use weight 1.0)"
        )
    rest = {n: w for n, w in members.items() if n != name}
    if not rest:
        return name, None
    return name, (Mix(rest) if isinstance(entry, Mix) else Stack(*rest))


def _row_prefix(model: nn.Module, name: str, adapter, rest: RowEntry, adapters: dict) -> PrefixKV:
    if adapter.kind == PROMPT_KIND:
        return served_prompt_kv(model, adapter, rest, adapters)
    if adapter.config.method == "prompt_cache" and rest is not None:
        raise UnsupportedAdapterError(
            f"{name!r} ({adapter.source}) holds a prompt's K/V computed on the bare base; it cannot be combined "
            f"with {rest!r}, which changes those K/V; load the prompt adapter itself to combine them"
        )
    return PrefixKV(adapter.keys, adapter.values)


def add_virtual_inputs(
    model: nn.Module, plan: RoutingPlan, adapters: dict, kwargs: dict, prompt_as_cache: bool = True
) -> int:
    """Add each row's prefix / prompt to the forward ``kwargs`` (in place); rows without one are unchanged.

    ``kwargs`` holds ``input_ids`` [B, S] and ``attention_mask`` [B, S], and may hold
    ``position_ids`` and an empty cache under :func:`cache_argument`'s name (filled in place).
    Returns how many leading output columns belong to prepended embeddings (0 when all are caches).
    """
    if not any(adapters[n].kind in VIRTUAL_KINDS for n in plan.groups):
        return 0
    facts = facts_of(model)
    causal, as_kv = facts.spec.is_causal, facts.caches_uniform_kv and prompt_as_cache
    cached: list[PrefixKV | None] = []
    prepended: list[torch.Tensor | None] = []
    for entry in plan.entries:
        name, rest = split_virtual(entry, adapters)
        adapter = adapters.get(name)
        if adapter is not None and adapter.kind == PROMPT_KIND and not as_kv:
            cached.append(None)
            prepended.append(adapter.embeddings)
        else:
            cached.append(None if adapter is None else _row_prefix(model, name, adapter, rest, adapters))
            prepended.append(None)
    if facts.spec.is_seq2seq and any(kv is not None for kv in cached):
        _decoder_prefix(model, kwargs, cached)  # a prefix is the decoder's: its self-attention cache
        cached = [None] * len(cached)
        if all(e is None for e in prepended):
            return 0
    mask = kwargs["attention_mask"]
    batch, seq = mask.shape
    lengths = [kv.length if kv is not None else (len(e) if e is not None else 0) for kv, e in zip(cached, prepended)]
    offsets = torch.tensor(lengths, device=mask.device).view(-1, 1)
    positions = kwargs.get("position_ids")
    if positions is None:  # encoders: the model's default, counted on from the row's prefix as with a cache
        positions = torch.arange(seq, device=mask.device).expand(batch, -1) + facts_of(model).first_position
    positions = positions + offsets
    if any(kv is not None for kv in cached):
        cache_kw = cache_argument(model)
        cache = kwargs.get(cache_kw)
        if cache is None:
            cache = kwargs[cache_kw] = new_cache(model)
        assert cache.get_seq_length() == 0, "the cache must be empty before the prefix goes in"
        mask = torch.cat([_fill_cache(cache, cached).to(mask.dtype), mask], dim=1)
        kwargs["use_cache"] = True
    width = max((len(e) for e in prepended if e is not None), default=0)
    if width and not causal:
        kwargs["attention_mask"] = mask  # with any prefix rows' cache columns in front
        return _prepend_left_packed(model, plan, prepended, kwargs, width, offsets.view(-1) * torch.tensor(
            [kv is not None for kv in cached], device=mask.device))
    if width:
        block, block_mask, block_positions = _prompt_block(prepended, width, mask.dtype)
        with use_plan(plan):  # a row's adapters may replace the embedding layer (modules_to_save)
            tokens = model.get_input_embeddings()(kwargs.pop("input_ids"))
        kwargs["inputs_embeds"] = torch.cat([block.to(tokens.dtype), tokens], dim=1)
        mask = torch.cat([mask[:, : mask.shape[1] - seq], block_mask, mask[:, mask.shape[1] - seq :]], dim=1)
        positions = torch.cat([block_positions, positions], dim=1)
    kwargs["attention_mask"] = mask
    kwargs["position_ids"] = positions
    return width


def _peft_decoder_layers(kv: PrefixKV) -> PrefixKV:
    """The K/V each decoder layer gets from an encoder-decoder prefix as PEFT 0.21 lays it out: it views the
    stored [P, L*2, H, D] as K/V entries, appends a copy (the cross-attention half), splits the [L*4] entries
    in fours and keeps the first two of each four as the layer's self-attention K/V, so decoder layer l reads
    stored layer ``2l mod L`` (the cross-attention halves are dropped)."""
    layers = kv.keys.shape[0]
    index = torch.tensor([(2 * layer) % layers for layer in range(layers)], device=kv.keys.device)
    return PrefixKV(kv.keys.index_select(0, index), kv.values.index_select(0, index))


def _decoder_prefix(model: nn.Module, kwargs: dict, rows: list[PrefixKV | None]) -> None:
    """Encoder-decoders: the rows' prefixes as the decoder's self-attention cache, as PEFT lays them out
    (its cross-attention cache left empty: computed from the encoder's output); ``decoder_attention_mask``
    masks the padding of shorter prefixes. The caller's ``decoder_input_ids`` follow the prefix."""
    from transformers import EncoderDecoderCache

    rows = [None if kv is None else _peft_decoder_layers(kv) for kv in rows]
    self_attention = DynamicCache()
    prefix_mask = _fill_cache(self_attention, rows)
    kwargs[cache_argument(model)] = EncoderDecoderCache(self_attention, DynamicCache())
    decoder = kwargs.get("decoder_input_ids")
    steps = decoder.shape[1] if decoder is not None else 0
    kwargs["decoder_attention_mask"] = torch.cat(
        [prefix_mask, prefix_mask.new_ones(prefix_mask.shape[0], steps)], dim=1)
    kwargs["use_cache"] = True


def _prepend_left_packed(model: nn.Module, plan: RoutingPlan, prepended: list, kwargs: dict, width: int,
                         cached_lengths: torch.Tensor) -> torch.Tensor:
    """Encoders: each row as ``[its virtual tokens, its tokens, padding]`` from index 0, as PEFT lays out one
    row, so a head that reads position 0 (BERT's pooler, RoBERTa's classifier) reads the row's own first
    token whatever the others carry. Rows with a prefix (``cached_lengths``: its K/V already in the cache,
    masked in front) count their positions on from it. Returns each row's number of prepended tokens ([B])."""
    ids, full_mask = kwargs.pop("input_ids"), kwargs["attention_mask"]
    batch, seq = ids.shape
    mask, cache_mask = full_mask[:, -seq:], full_mask[:, :-seq]
    with use_plan(plan):  # a row's adapters may replace the embedding layer (modules_to_save)
        tokens = model.get_input_embeddings()(ids)
    embeds = tokens.new_zeros(batch, width + seq, tokens.shape[-1])
    packed_mask = mask.new_zeros(batch, width + seq)
    offsets = torch.tensor([0 if e is None else len(e) for e in prepended], device=ids.device)
    for row, virtual in enumerate(prepended):
        start = int(offsets[row])
        if virtual is not None:
            embeds[row, :start] = virtual.to(tokens.dtype)
            packed_mask[row, :start] = 1
        embeds[row, start:start + seq] = tokens[row]
        packed_mask[row, start:start + seq] = mask[row]
    kwargs["inputs_embeds"] = embeds
    kwargs["attention_mask"] = torch.cat([cache_mask, packed_mask], dim=1)
    if not facts_of(model).spec.is_seq2seq:  # T5 (relative) and BART count positions themselves
        first = facts_of(model).first_position + cached_lengths.view(-1, 1)
        kwargs["position_ids"] = torch.arange(width + seq, device=ids.device).expand(batch, -1) + first
    if "token_type_ids" in kwargs:
        types = kwargs["token_type_ids"].new_zeros(batch, width + seq)
        for row in range(batch):
            types[row, int(offsets[row]):int(offsets[row]) + seq] = kwargs["token_type_ids"][row]
        kwargs["token_type_ids"] = types
    return offsets


def real_positions(out: torch.Tensor, virtual, seq: int) -> torch.Tensor:
    """The model's output at the input's own positions: the virtual columns dropped (``virtual``: their
    count, or each row's for left-packed encoder rows). A pooled output ([B, labels]) has none."""
    if out.ndim < 3:
        return out
    if isinstance(virtual, int):
        return out[:, virtual:]
    index = virtual.view(-1, 1) + torch.arange(seq, device=out.device)
    return out.gather(1, index.unsqueeze(-1).expand(-1, -1, out.shape[-1]))


def _fill_cache(cache, rows: list[PrefixKV | None]) -> torch.Tensor:
    """Write the rows' K/V, right-aligned to the longest, into ``cache``; return the prefix mask [B, P_max]."""
    first = next(kv for kv in rows if kv is not None)
    layers, heads, _, head_dim = first.keys.shape
    width = max(kv.length for kv in rows if kv is not None)
    device = first.keys.device
    keys = first.keys.new_zeros(layers, len(rows), heads, width, head_dim)
    values = torch.zeros_like(keys)
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    shared: dict[int, tuple[PrefixKV, list[int]]] = {}
    for row, kv in enumerate(rows):
        if kv is not None:
            shared.setdefault(id(kv.keys), (kv, []))[1].append(row)
    for kv, row_list in shared.values():
        index = torch.tensor(row_list, device=device)
        start = width - kv.length
        keys[:, index, :, start:] = kv.keys.unsqueeze(1).to(keys.dtype)
        values[:, index, :, start:] = kv.values.unsqueeze(1).to(keys.dtype)
        mask[index, start:] = 1
    for layer in range(layers):
        cache.update(keys[layer], values[layer], layer)
    return mask


def _prompt_block(rows: list[torch.Tensor | None], width: int, mask_dtype: torch.dtype):
    """Prompt embeddings right-aligned in a [B, W, hidden] block, with its mask and positions 0..P_i-1."""
    first = next(e for e in rows if e is not None)
    block = first.new_zeros(len(rows), width, first.shape[-1])
    mask = torch.zeros(len(rows), width, dtype=mask_dtype, device=first.device)
    positions = torch.zeros(len(rows), width, dtype=torch.long, device=first.device)
    for row, embeddings in enumerate(rows):
        if embeddings is None:
            continue
        start = width - len(embeddings)
        block[row, start:] = embeddings
        mask[row, start:] = 1
        positions[row, start:] = torch.arange(len(embeddings), device=first.device)
    return block, mask, positions


# ----------------------------------------------------------------- export
def prefix_cache_for(adapter, model: nn.Module, fingerprint: str | None = None) -> PrefixAdapter:
    """The K/V served for a prefix or prompt ``adapter`` attached to ``model``, as a standalone prefix.

    A prompt becomes a ``prompt_cache`` prefix computed on this base alone (no other adapter active);
    ``fingerprint`` (the base's) is recorded so the result only loads on that base.
    """
    if adapter.kind not in VIRTUAL_KINDS:
        raise UnsupportedAdapterError(
            f"{adapter.source or 'adapter'} is a {adapter.kind} adapter; only prefix and prompt adapters have a K/V cache"
        )
    facts = facts_of(model)
    if adapter.kind == PREFIX_KIND:
        kv, method = PrefixKV(adapter.keys, adapter.values), adapter.config.method
    elif not facts.caches_uniform_kv:
        raise UnsupportedAdapterError(
            f"{adapter.source or 'prompt adapter'}: the {facts.model_type} base is not a causal LM caching K/V of one "
            "shape in every layer; its prompts are prepended embeddings, not a K/V cache")
    else:
        kv, method = served_prompt_kv(model, adapter, None, {}), "prompt_cache"
    layers, heads, length, head_dim = kv.keys.shape
    return PrefixAdapter(
        config=PrefixConfig(length, layers, heads, head_dim, method=method),
        keys=kv.keys.detach().clone(),
        values=kv.values.detach().clone(),
        fingerprint=fingerprint,
        source=adapter.source,
        base_class=type(model).__name__,
    )
