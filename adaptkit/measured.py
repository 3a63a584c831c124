"""What a model does at run time, measured from the live model rather than written down per version.

- :func:`facts_of`: a model's :class:`~adaptkit.arch.ModelFacts` with its K/V layout as cached (a one-token
  forward into the model's own cache, on a meta-device twin: no weight read, 4-bit layouts untouched) and, for
  causal LMs, what a three-token probe shows (causal or not, positions, padding, whether a
  forward continues from K/V alone).
- :func:`sliding_windows`: the layers that slide, as transformers reads the config for its own cache.
- :func:`cache_argument`: the forward's keyword for the cache (``cache`` in transformers 5.25+).

transformers 5.25 made Falcon-40B cache ``num_kv_heads`` heads where 5.24 cached every head, and renamed
the forward's cache argument: nothing here changes with such a release.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import weakref

import torch
from torch import nn

from adaptkit.arch import ModelFacts, facts_from_config
from adaptkit.errors import BaseModelError

_MEASURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> ModelFacts


def facts_of(model: nn.Module) -> ModelFacts:
    """The facts of a live model: its config's sizes, with the K/V layout measured from the model
    (:func:`cached_kv_shapes`) where it caches any. Measured once per model."""
    found = _MEASURED.get(model)
    if found is None:
        with _layouts_kept(model):
            found = _MEASURED[model] = _measured(model)
    return found


@contextlib.contextmanager
def _layouts_kept(model: nn.Module):
    """The probes' forwards leave 4-bit weights in the layout they were loaded in: bitsandbytes repacks a
    ``Linear4bit`` for its AVX512-BF16 CPU kernel on its first forward outside training, so those layers
    (only they: dropout elsewhere stays off) count as training while the probes run."""
    repacking = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu") and not m.training]
    for module in repacking:
        module.training = True
    try:
        yield
    finally:
        for module in repacking:
            module.training = False


def _measured(model: nn.Module) -> ModelFacts:
    facts = facts_from_config(model.config)
    if facts.spec.is_causal:
        facts = _checked_causal(model, facts)
    encoder = not (facts.spec.is_causal or facts.spec.is_seq2seq)
    if encoder:
        facts = dataclasses.replace(facts, first_position=_first_position(model, facts))
    layout = cached_kv_shapes(model)
    if layout:
        heads, head_dim = layout[0] if len(set(layout)) == 1 and None not in layout else \
            (facts.num_kv_heads, facts.head_dim)
        facts = dataclasses.replace(facts, num_kv_heads=heads, head_dim=head_dim, kv_layout=layout)
        if encoder:
            facts = dataclasses.replace(facts, pads_exactly=_encoder_pads_exactly(model, facts))
    return facts


def _checked_causal(model: nn.Module, facts: ModelFacts) -> ModelFacts:
    """A causal-LM class, asked on three tokens (its body's hidden states, whatever head it has): does a
    token see the ones after it (an encoder run through its LM-head class without ``is_decoder``: served as
    an encoder), does it number positions from 0 as adaptkit's ``position_ids`` for padded rows do (refused
    by name where not), does a row behind masked padding compute what it computes alone, does a forward
    continue from the cached K/V alone, are its blocks pre-LN."""
    device = next(model.parameters()).device
    if device.type == "meta":
        return facts
    body, loose = model.base_model, _loose(model)
    ids = (torch.arange(3, device=device) % facts.vocab_size + 3) % facts.vocab_size
    ids = ids.unsqueeze(0)
    with torch.no_grad():
        whole = body(input_ids=ids)[0]
        if not _agree(whole[:, :2], body(input_ids=ids[:, :2])[0], loose):
            return dataclasses.replace(facts, spec=dataclasses.replace(facts.spec, is_causal=False))
        numbered = body(input_ids=ids, position_ids=torch.arange(3, device=device).unsqueeze(0))[0]
    if not _agree(numbered, whole, loose):
        raise BaseModelError(f"{facts.model_type}: the model does not number positions from 0 (its own positions differ "
                             "from position_ids 0, 1, 2), so adaptkit cannot give padded rows their positions")
    pad = torch.zeros(1, 1, dtype=ids.dtype, device=device)
    with torch.no_grad():
        padded = body(input_ids=torch.cat([pad, ids], dim=1), attention_mask=torch.tensor([[0, 1, 1, 1]], device=device),
                      position_ids=torch.tensor([[0, 0, 1, 2]], device=device))[0][:, 1:]
    facts = dataclasses.replace(facts, pads_exactly=_agree(padded, whole, loose))
    try:  # continued from the first tokens' keys and values alone, as adaptkit serves a prompt or prefix
        from transformers import DynamicCache

        with torch.no_grad():
            own = body(input_ids=ids[:, :2], use_cache=True).past_key_values
            rebuilt = DynamicCache()
            for index, layer in enumerate(own.layers):
                rebuilt.update(layer.keys, layer.values, index)
            last = body(input_ids=ids[:, 2:], position_ids=torch.tensor([[2]], device=device), use_cache=True,
                        **{cache_argument(body): rebuilt})[0]
        continues = _agree(last, whole[:, 2:], loose)
    except Exception:  # noqa: BLE001 - a cache that holds more than keys and values (conv or recurrent state)
        continues = False
    return dataclasses.replace(facts, cache_continues=continues, pre_ln_measured=_blocks_are_pre_ln(model, facts, ids))


def _loose(model: nn.Module) -> bool:
    """Whether the probes compare loosely (:func:`_agree`): a base with half-precision or 4-bit weights."""
    return any(p.dtype != torch.float32 for p in model.parameters())


def _agree(got: torch.Tensor, expected: torch.Tensor, loose: bool) -> bool:
    """Equal up to float32 rounding (1e-4 absolute, 1e-3 relative), or, for half-precision and 4-bit bases
    whose kernels round differently per sequence length, within 2% of the largest value: what the probes
    tell apart (a token seeing later ones, a shifted position) moves hidden states by far more."""
    if got.shape != expected.shape:
        return False
    if not loose:
        return torch.allclose(got, expected, atol=1e-4, rtol=1e-3)
    scale = max(float(expected.float().abs().max()), 1.0)
    return float((got.float() - expected.float()).abs().max()) <= 2e-2 * scale


def _first_position(model: nn.Module, facts: ModelFacts) -> int:
    """An encoder's position id of its first token: the candidate (0, or ``pad_token_id + 1`` as RoBERTa and
    its copies number) whose explicit ``position_ids`` give what the model gives with its own; 0 on a
    skeleton without weights, or where positions do not change the output (rotary, relative)."""
    device = next(model.parameters()).device
    pad = getattr(model.config, "pad_token_id", None)
    if device.type == "meta" or not isinstance(pad, int) or pad < 0:
        return 0
    body = model.base_model  # a task head (a pooler, a classifier) takes no position_ids; the body does
    ids = (torch.arange(3, device=device) + pad + 3).remainder(facts.vocab_size).unsqueeze(0)
    counted = torch.arange(3, device=device).unsqueeze(0)
    try:
        with torch.no_grad():
            own = body(input_ids=ids)[0]
            for first in (0, pad + 1):
                if _agree(body(input_ids=ids, position_ids=counted + first)[0], own, _loose(model)):
                    return first
    except (TypeError, ValueError, RuntimeError):  # a body that takes no position_ids (or not these): from 0
        return 0
    raise BaseModelError(f"{model.config.model_type}: the model numbers its positions neither from 0 nor from "
                         f"pad_token_id + 1 ({pad + 1}), so adaptkit cannot number a prompt's tokens as it does")


def _encoder_pads_exactly(model: nn.Module, facts: ModelFacts) -> bool:
    """An encoder that takes a cache: do three tokens behind one masked-out cache column, numbered by
    ``position_ids`` from the first position, compute what they compute alone? (RoFormer places its rotary
    positions by the cache's length, whatever the mask and position_ids say.)"""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    if device.type == "meta":
        return True
    body = model.base_model
    ids = (torch.arange(3, device=device) + 3).remainder(facts.vocab_size).unsqueeze(0)
    counted = torch.arange(3, device=device).unsqueeze(0) + facts.first_position
    dtype = next(model.parameters()).dtype
    cache = DynamicCache()
    for index, (heads, head_dim) in enumerate(facts.kv_layout):
        column = torch.zeros(1, heads, 1, head_dim, dtype=dtype, device=device)
        cache.update(column, column, index)
    try:
        with torch.no_grad():
            alone = body(input_ids=ids, position_ids=counted)[0]
            behind = body(input_ids=ids, position_ids=counted, attention_mask=torch.tensor([[0, 1, 1, 1]], device=device),
                          use_cache=True, **{cache_argument(body): cache})[0]
    except (TypeError, ValueError, RuntimeError):  # a body that cannot run this probe: assume the worst
        return False  # (rows of each prefix length then run in forwards of their own)
    return _agree(behind, alone, _loose(model))


def _blocks_are_pre_ln(model: nn.Module, facts: ModelFacts, ids: torch.Tensor) -> bool:
    """Whether every block computes ``r = x + attn(norm1(x))`` then ``r + mlp(norm2(r))``, as read by hooks
    on one forward: the norms' inputs and the block's output, against the sub-blocks' outputs."""
    from adaptkit.arch import decoder_layers

    spec = facts.spec
    if not (spec.attention and spec.mlp and spec.attention_norm and spec.mlp_norm):
        return False
    _, blocks = decoder_layers(model, spec)
    seen, hooks = {}, []

    def record(key, use_input):
        def hook(module, args, output):
            value = args[0] if use_input else output
            seen[key] = value[0] if isinstance(value, (tuple, list)) else value
        return hook

    def record_block_input(key):
        def hook(module, args, kwargs):
            seen[key] = args[0] if args else kwargs.get("hidden_states")
        return hook

    try:
        for i, block in enumerate(blocks):
            hooks.append(block.register_forward_pre_hook(record_block_input((i, "in")), with_kwargs=True))
            hooks.append(block.register_forward_hook(record((i, "out"), False)))
            for key, name, use_input in (("n1", spec.attention_norm, True), ("a", spec.attention, False),
                                         ("n2", spec.mlp_norm, True), ("m", spec.mlp, False)):
                hooks.append(block.get_submodule(name).register_forward_hook(record((i, key), use_input)))
        with torch.no_grad():
            model(input_ids=ids)
    except Exception:  # noqa: BLE001 - blocks of other layouts (a hybrid's), or hooks it cannot take: not pre-LN
        return False
    finally:
        for hook in hooks:
            hook.remove()

    def close(a, b):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
            torch.allclose(a, b, atol=1e-5, rtol=1e-4)

    for i in range(len(blocks)):
        block_in, attn, norm2_in, mlp, out = (seen.get((i, key)) for key in ("in", "a", "n2", "m", "out"))
        if not (close(seen.get((i, "n1")), block_in) and isinstance(attn, torch.Tensor)
                and close(norm2_in, block_in + attn) and isinstance(mlp, torch.Tensor) and close(out, norm2_in + mlp)):
            return False
    return True


def cached_kv_shapes(model: nn.Module) -> tuple[tuple[int, int] | None, ...] | None:
    """Each layer's (K/V heads, head size) as ``model`` caches them, from a one-token forward into an
    empty cache (an encoder-decoder's: its decoder's self-attention cache); None when the model caches
    nothing (an encoder whose attention takes no cache).

    The forward runs on a twin of the model on the meta device (shapes only: no weight is read, the live
    model and its 4-bit layouts are left untouched); a model whose forward the meta device cannot run
    (data-dependent routing, as in mixtures of experts) is run for real on one token.
    """
    meta = torch.device("meta")
    try:
        config = copy.deepcopy(model.config)
        config._attn_implementation = "eager"  # sdpa's mask shortcut reads values, which meta tensors have not
        with meta:
            twin = type(model)(config)
        return _one_token_cache(twin, meta)
    except Exception:  # an op without a meta kernel (or one that reads values): ask the live model instead
        device = next(model.parameters()).device
        if device == meta:  # a skeleton without weights (adaptkit inspect): the config's word until a load measures
            return None
        with torch.no_grad():
            return _one_token_cache(model, device)


def _one_token_cache(model: nn.Module, device: torch.device) -> tuple[tuple[int, int] | None, ...] | None:
    """Run one token with ``use_cache`` and read each cache layer's K/V shape (None for a layer that holds
    none: a state-space or linear-attention layer of a hybrid model)."""
    from transformers import DynamicCache, EncoderDecoderCache

    ids = torch.ones(1, 1, dtype=torch.long, device=device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": True}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = ids
    else:
        model = model.base_model  # an encoder's task head takes no cache; its body does
    out = model(**inputs)  # the model's own cache: hybrid models keep conv/recurrent state beside K/V
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    if cache is None:  # an encoder fills a cache only when given one
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache()) if model.config.is_encoder_decoder else DynamicCache()
        model(**inputs, **{cache_argument(model): cache})
    layers = getattr(cache, "self_attention_cache", cache).layers
    if type(getattr(cache, "self_attention_cache", cache)) not in (DynamicCache,):
        return tuple(None for _ in layers) or None  # a cache class of its own (MiniMax): adaptkit cannot fill it
    shapes = tuple((layer.keys.shape[1], layer.keys.shape[-1])
                   if isinstance(getattr(layer, "keys", None), torch.Tensor) and layer.keys.numel() > 0 else None
                   for layer in layers)
    return shapes if any(shapes) else None


_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> groups of layer names


def shared_inputs(model: nn.Module) -> tuple[tuple[str, ...], ...]:
    """Groups of linear layers that read the very same input tensor in a forward, by module name (a block's
    q/k/v projections, its gate/up; a parallel block's attention and MLP inputs), for LoRAs to share their
    shrink (``lora_stack.Siblings``). Measured once per model, by hooks on a two-token forward of a meta twin
    (no weight read), or of the live model where the meta device cannot run it (data-dependent routing).
    A layer called several times per forward belongs to a group only if it shares with the same layers
    every time."""
    found = _SHARED.get(model)
    if found is None:
        try:
            config = copy.deepcopy(model.config)
            config._attn_implementation = "eager"
            with torch.device("meta"):
                twin = type(model)(config)
            found = _grouped_by_input(twin, dict(twin.named_modules()), torch.device("meta"))
        except Exception:  # noqa: BLE001 - an op the meta device cannot run: the live model (weights read once)
            from adaptkit.inject import base_modules

            device = next(model.parameters()).device
            try:
                with _layouts_kept(model), torch.no_grad():
                    found = _grouped_by_input(model, base_modules(model), device)
            except Exception:  # noqa: BLE001 - a forward this probe cannot make: every layer on its own
                found = ()
        _SHARED[model] = found
    return found


def _grouped_by_input(model: nn.Module, modules: dict[str, nn.Module], device: torch.device) -> tuple:
    linear = {name: m for name, m in modules.items()
              if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}  # bitsandbytes' layers are Linears
    calls: list[tuple[torch.Tensor, str]] = []
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: calls.append((args[0], name)))
             for name, m in linear.items()]
    ids = torch.ones(1, 2, dtype=torch.long, device=device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = ids
    try:
        model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    readers: dict[int, list[str]] = {}  # the inputs stay referenced in ``calls``: ids are not reused
    for tensor, name in calls:
        readers.setdefault(id(tensor), []).append(name)
    seen: dict[str, set] = {}
    for names in readers.values():
        names = tuple(dict.fromkeys(names))
        for name in names:
            seen.setdefault(name, set()).add(names)
    return tuple(dict.fromkeys(next(iter(groups)) for name, groups in seen.items()
                               if len(groups) == 1 and len(next(iter(groups))) > 1))


def cache_argument(model: nn.Module) -> str:
    """The forward() keyword of the KV cache: ``cache`` in newer transformers 5.x, else ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


_WINDOWS: dict[int, tuple] = {}  # id(config) -> (its weakref, windows): read once, a decode step asks (configs are unhashable)


def sliding_windows(config) -> tuple[int | None, ...]:
    """Each layer's attention window (None: full attention), as transformers reads the config
    (``sliding_window``, ``layer_types``) when it builds the model's own cache. Read once per config."""
    from transformers import DynamicCache

    ref, found = _WINDOWS.get(id(config), (None, None))
    if ref is None or ref() is not config:
        found = tuple(getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
                      for layer in DynamicCache(config=config).layers)
        _WINDOWS[id(config)] = (weakref.ref(config), found)
        weakref.finalize(config, _WINDOWS.pop, id(config), None)
    return found
