"""Per-architecture facts: where the transformer blocks are, what their sub-modules are called, and
what the model caches.

The module layouts are a table per family (the Llama family: Llama, Mistral, Qwen2, ... share one;
GPT-2, whose ``Conv1D`` stores weights transposed, ``[in, out]``; BERT, post-LN; ...). What the model
does at run time is not written down here but measured from the live model: the K/V heads and head
size as cached (a one-token forward into a cache, :func:`cached_kv_shapes`) and the layers that slide
(transformers' own cache built from the config, :func:`sliding_windows`), so a release that changes
them (transformers 5.25 made Falcon-40B cache ``num_kv_heads`` heads, where 5.24 cached every head)
changes nothing here.
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from adaptkit.errors import BaseModelError

_LLAMA_FAMILY = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo", "olmo2",
                 "granite"}
# model_type -> layout family, for the families whose model_type differs from the family name
_FAMILY_OF_TYPE = {"gpt2": "gpt2", "bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "deberta-v2": "bert",
                   "opt": "opt", "gpt_neox": "neox", "falcon": "falcon", "t5": "t5", "mt5": "t5", "bart": "bart"}


@dataclass(frozen=True)
class ArchSpec:
    """Layout facts of one architecture family.

    Module paths are relative to the decoder/encoder block (``layers[i]``), except
    ``layers_paths`` which are relative to the loaded model.
    """

    family: str  # "llama" | "gpt2" | "bert"
    layers_paths: tuple[str, ...]  # candidates, the first that exists wins
    attention: str  # self-attention module inside a block
    mlp: str  # feed-forward module inside a block (or its output sub-module for BERT)
    attention_norm: str | None  # pre-LN norm before attention (None for post-LN)
    mlp_norm: str | None  # pre-LN norm before the FFN
    is_causal: bool
    conv1d_modules: tuple[str, ...]  # GPT-2 Conv1D module names: weight stored [in, out]
    embedding_keys: tuple[str, ...]  # checkpoint keys of the input embedding, first found wins
    is_seq2seq: bool = False  # an encoder-decoder: the prompt goes to the encoder, the decoder generates


ARCH_SPECS: dict[str, ArchSpec] = {
    "llama": ArchSpec(
        family="llama",
        layers_paths=("model.layers", "layers"),
        attention="self_attn",
        mlp="mlp",
        attention_norm="input_layernorm",
        mlp_norm="post_attention_layernorm",
        is_causal=True,
        conv1d_modules=(),
        embedding_keys=("model.embed_tokens.weight", "embed_tokens.weight"),
    ),
    "gpt2": ArchSpec(
        family="gpt2",
        layers_paths=("transformer.h", "h"),
        attention="attn",
        mlp="mlp",
        attention_norm="ln_1",
        mlp_norm="ln_2",
        is_causal=True,
        conv1d_modules=("c_attn", "c_proj", "c_fc", "q_attn"),
        embedding_keys=("transformer.wte.weight", "wte.weight"),
    ),
    "opt": ArchSpec(
        family="opt",
        layers_paths=("model.decoder.layers", "decoder.layers"),
        attention="self_attn",
        mlp="fc2",
        attention_norm="self_attn_layer_norm",
        mlp_norm="final_layer_norm",
        is_causal=True,
        conv1d_modules=(),
        embedding_keys=("model.decoder.embed_tokens.weight", "decoder.embed_tokens.weight"),
    ),
    "neox": ArchSpec(
        family="neox",
        layers_paths=("gpt_neox.layers", "layers"),
        attention="attention",
        mlp="mlp",
        attention_norm="input_layernorm",
        mlp_norm="post_attention_layernorm",
        is_causal=True,
        conv1d_modules=(),
        embedding_keys=("gpt_neox.embed_in.weight", "embed_in.weight"),
    ),
    "falcon": ArchSpec(
        family="falcon",
        layers_paths=("transformer.h", "h"),
        attention="self_attention",
        mlp="mlp",
        attention_norm="input_layernorm",
        mlp_norm=None,  # parallel attention + MLP from the same norm (or ln_attn / ln_mlp)
        is_causal=True,
        conv1d_modules=(),
        embedding_keys=("transformer.word_embeddings.weight", "word_embeddings.weight"),
    ),
    "t5": ArchSpec(
        family="t5",
        layers_paths=("decoder.block",),
        attention="layer.0",
        mlp="layer.2",
        attention_norm=None,
        mlp_norm=None,
        is_causal=False,
        conv1d_modules=(),
        embedding_keys=("shared.weight", "encoder.embed_tokens.weight"),
        is_seq2seq=True,
    ),
    "bart": ArchSpec(
        family="bart",
        layers_paths=("model.decoder.layers",),
        attention="self_attn",
        mlp="fc2",
        attention_norm=None,
        mlp_norm=None,
        is_causal=False,
        conv1d_modules=(),
        embedding_keys=("model.shared.weight", "model.encoder.embed_tokens.weight"),
        is_seq2seq=True,
    ),
    "bert": ArchSpec(
        family="bert",
        layers_paths=("bert.encoder.layer", "roberta.encoder.layer", "deberta.encoder.layer", "encoder.layer"),
        attention="attention.output",
        mlp="output",
        attention_norm=None,
        mlp_norm=None,
        is_causal=False,
        conv1d_modules=(),
        embedding_keys=("bert.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight",
                        "roberta.embeddings.word_embeddings.weight", "deberta.embeddings.word_embeddings.weight"),
    ),
}


# Bottleneck adapters (AdapterHub placement): "mh" after the attention sub-block, "output" after the FFN.
# Model types whose blocks compute exactly ``x + attn(norm(x))`` then ``x + mlp(norm(x))`` (pre-LN) or
# BERT's post-LN ``LN(h + r)`` inside SelfOutput/Output. Sandwich-norm blocks (gemma2, olmo2) and
# scaled residuals (granite) would put an adapter elsewhere than AdapterHub does.
BOTTLENECK_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo", "gpt2", "bert", "roberta"}


@dataclass(frozen=True)
class AdapterSite:
    """Where a bottleneck site sits inside a block (paths relative to the block)."""

    module: str  # the module wrapped: its output is the sub-block output h
    residual_norm: str | None  # pre-LN: the norm whose input is the residual r; None: post-LN, r is an argument


def adapter_site(facts: ModelFacts, site: str) -> AdapterSite:
    """The placement of bottleneck site ``"mh"`` or ``"output"`` in this model's blocks."""
    if facts.model_type not in BOTTLENECK_MODEL_TYPES:
        known = ", ".join(sorted(BOTTLENECK_MODEL_TYPES))
        raise BaseModelError(f"bottleneck adapters are not supported on {facts.model_type!r} models; supported: {known}")
    spec = facts.spec
    if site == "mh":
        return AdapterSite(spec.attention, spec.attention_norm)
    if site == "output":
        return AdapterSite(spec.mlp, spec.mlp_norm)
    raise BaseModelError(f"unknown bottleneck site {site!r}; known: mh, output")


def family_of(model_type: str) -> str:
    """The layout family of a transformers ``model_type``; raises for unknown ones."""
    if model_type in _LLAMA_FAMILY:
        return "llama"
    if model_type in _FAMILY_OF_TYPE:
        return _FAMILY_OF_TYPE[model_type]
    known = sorted(_LLAMA_FAMILY | set(_FAMILY_OF_TYPE))
    raise BaseModelError(f"model_type {model_type!r} is not supported; known model types: {', '.join(known)}")


@dataclass(frozen=True)
class ModelFacts:
    """Sizes of one concrete model, read from its config."""

    spec: ArchSpec
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int | None = None  # the context: max_position_embeddings (GPT-2: n_positions)
    # each layer's (K/V heads, head size) as the model caches them; None: read from the config only
    # (``num_kv_heads``/``head_dim`` then say what the config says; with a layout they are its layers' own)
    kv_layout: tuple[tuple[int, int], ...] | None = None

    @property
    def family(self) -> str:
        return self.spec.family


def facts_from_config(config) -> ModelFacts:
    """Read the sizes adaptkit needs from a transformers config."""
    family = family_of(config.model_type)
    if family == "gpt2":
        hidden, layers, heads = config.n_embd, config.n_layer, config.n_head
        kv_heads = heads
    elif family == "t5":
        hidden, layers, heads = config.d_model, config.num_decoder_layers or config.num_layers, config.num_heads
        kv_heads = heads
    elif family == "bart":
        hidden, layers, heads = config.d_model, config.decoder_layers, config.decoder_attention_heads
        kv_heads = heads
    else:
        hidden, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or hidden // heads
    return ModelFacts(
        spec=ARCH_SPECS[family],
        model_type=config.model_type,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        max_positions=getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None),
    )


def decoder_layers(model: nn.Module, spec: ArchSpec) -> tuple[str, nn.ModuleList]:
    """The qualified name and the ``ModuleList`` of the model's transformer blocks."""
    for path in spec.layers_paths:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return path, layers
    raise BaseModelError(
        f"could not find the transformer blocks of this {spec.family} model (looked for {', '.join(spec.layers_paths)})"
    )


# ----------------------------------------------------------------------------- measured from the model
_MEASURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> ModelFacts


def facts_of(model: nn.Module) -> ModelFacts:
    """The facts of a live model: its config's sizes, with the K/V layout measured from the model
    (:func:`cached_kv_shapes`) where it caches any. Measured once per model."""
    found = _MEASURED.get(model)
    if found is None:
        facts = facts_from_config(model.config)
        layout = cached_kv_shapes(model)
        if layout:
            heads, head_dim = layout[0] if len(set(layout)) == 1 else (facts.num_kv_heads, facts.head_dim)
            facts = dataclasses.replace(facts, num_kv_heads=heads, head_dim=head_dim, kv_layout=layout)
        found = _MEASURED[model] = facts
    return found


def cached_kv_shapes(model: nn.Module) -> tuple[tuple[int, int], ...] | None:
    """Each layer's (K/V heads, head size) as ``model`` caches them, from a one-token forward into an
    empty cache (an encoder-decoder's: its decoder's self-attention cache); None when the model caches
    nothing (an encoder whose attention takes no cache).

    The forward runs on a twin of the model on the meta device (shapes only: no weight is read, the live
    model and its 4-bit layouts are left untouched); a model whose forward the meta device cannot run
    (data-dependent routing, as in mixtures of experts) is run for real on one token.
    """
    meta = torch.device("meta")
    try:
        with meta:
            twin = type(model)(model.config)
        return _one_token_cache(twin, meta)
    except Exception:  # an op without a meta kernel (or one that reads values): ask the live model instead
        device = next(model.parameters()).device
        if device == meta:  # a skeleton without weights (adaptkit inspect): the config's word until a load measures
            return None
        with torch.no_grad():
            return _one_token_cache(model, device)


def _one_token_cache(model: nn.Module, device: torch.device) -> tuple[tuple[int, int], ...] | None:
    from transformers import DynamicCache, EncoderDecoderCache

    ids = torch.ones(1, 1, dtype=torch.long, device=device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": True}
    if model.config.is_encoder_decoder:
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        inputs["decoder_input_ids"] = ids
    else:
        cache = DynamicCache()
        model = model.base_model  # an encoder's task head takes no cache; its body does
    model(**inputs, **{cache_argument(model): cache})
    layers = getattr(cache, "self_attention_cache", cache).layers
    shapes = tuple((layer.keys.shape[1], layer.keys.shape[-1]) for layer in layers
                   if getattr(layer, "keys", None) is not None and layer.keys.numel() > 0)
    return shapes or None


def cache_argument(model: nn.Module) -> str:
    """The forward() keyword of the KV cache: ``cache`` in newer transformers 5.x, else ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def sliding_windows(config) -> tuple[int | None, ...]:
    """Each layer's attention window (None: full attention), as transformers reads the config
    (``sliding_window``, ``layer_types``) when it builds the model's own cache."""
    from transformers import DynamicCache

    return tuple(getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
                 for layer in DynamicCache(config=config).layers)
