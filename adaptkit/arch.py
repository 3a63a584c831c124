"""Per-architecture facts: where the transformer blocks are, what their sub-modules are called.

Every model type's layout is discovered from its module tree (:func:`discover_spec`: the blocks, their
attention, feed-forward and norms, ``Conv1D`` layers stored ``[in, out]``, the input embedding). What
cannot be discovered is written down: family labels (model types whose checkpoints share a layout, so an
adapter made for one is made for the others) and BERT's post-LN bottleneck sites. What a model does at run
time (K/V as cached, sliding layers, causality, positions, pre-LN blocks, the cache keyword) is measured
in :mod:`adaptkit.measured`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from adaptkit.errors import BaseModelError

# Families: model types whose checkpoints share one layout (module names, weight orientation), so an adapter
# trained on one is made for the others too (a Mistral LoRA on a Llama base); a label, not a layout.
_LLAMA_FAMILY = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo", "olmo2",
                 "granite"}
# model_type -> family, for the families whose model_type differs from the family name
_FAMILY_OF_TYPE = {"gpt2": "gpt2", "bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "deberta-v2": "bert",
                   "opt": "opt", "gpt_neox": "neox", "falcon": "falcon", "t5": "t5", "mt5": "t5", "bart": "bart"}


@dataclass(frozen=True)
class ArchSpec:
    """Layout facts of one model, discovered from its module tree (:func:`discover_spec`).

    Module paths are relative to the decoder/encoder block (``layers[i]``), except
    ``layers_paths`` which are relative to the loaded model.
    """

    family: str  # the family label (``llama``, ``gpt2``, ``bert``, ...), else the model type
    layers_paths: tuple[str, ...]  # candidates, the first that exists wins
    attention: str  # self-attention module inside a block ("" where none is found)
    mlp: str  # feed-forward module inside a block (BERT: its output sub-module); "" where none is a module
    attention_norm: str | None  # pre-LN norm before attention (None for post-LN)
    mlp_norm: str | None  # pre-LN norm before the FFN
    is_causal: bool
    conv1d_modules: tuple[str, ...]  # GPT-2 Conv1D module names: weight stored [in, out]
    embedding_keys: tuple[str, ...]  # checkpoint keys of the input embedding, first found wins
    is_seq2seq: bool = False  # an encoder-decoder: the prompt goes to the encoder, the decoder generates


# What discovery cannot find: BERT's post-LN blocks keep their residual inside SelfOutput / Output, whose
# forward takes (hidden, residual) and returns LN(dense(hidden) + residual); AdapterHub's bottleneck sites
# are those two modules, served by adaptkit's post-LN wrapper (sites.py). No norm sits before a sub-block.
_POST_LN_SITES = {"bert": dict(attention="attention.output", mlp="output", attention_norm=None, mlp_norm=None)}
# Post-LN model types whose SelfOutput / Output are BERT's (the wrapper re-implements that forward)
POST_LN_BOTTLENECK_TYPES = {"bert", "roberta"}


@dataclass(frozen=True)
class AdapterSite:
    """Where a bottleneck site sits inside a block (paths relative to the block)."""

    module: str  # the module wrapped: its output is the sub-block output h
    residual_norm: str | None  # pre-LN: the norm whose input is the residual r; None: post-LN, r is an argument


def adapter_site(facts: ModelFacts, site: str) -> AdapterSite:
    """The placement of bottleneck site ``"mh"`` or ``"output"`` in this model's blocks: BERT's post-LN
    sub-modules, or the pre-LN norms and sub-blocks of blocks measured to add ``attn(norm1(x))`` and then
    ``mlp(norm2(.))`` to the residual (:func:`adaptkit.measured.facts_of`)."""
    if facts.model_type not in POST_LN_BOTTLENECK_TYPES and not facts.pre_ln_measured:
        raise BaseModelError(
            f"bottleneck adapters are not supported on {facts.model_type!r} models: AdapterHub places them in blocks "
            "that add attn(norm(x)) and then mlp(norm(.)) to the residual, which these blocks were not measured to "
            f"do (scaled residuals, norms after the sub-blocks, parallel attention and FFN), or in BERT's post-LN "
            f"blocks ({', '.join(sorted(POST_LN_BOTTLENECK_TYPES))})")
    spec = facts.spec
    if site == "mh":
        return AdapterSite(spec.attention, spec.attention_norm)
    if site == "output":
        return AdapterSite(spec.mlp, spec.mlp_norm)
    raise BaseModelError(f"unknown bottleneck site {site!r}; known: mh, output")


def family_of(model_type: str) -> str:
    """The family label of a transformers ``model_type``: its family where it shares one, else itself."""
    if model_type in _LLAMA_FAMILY:
        return "llama"
    return _FAMILY_OF_TYPE.get(model_type, model_type)


def model_class_for(config):
    """The transformers class that runs ``config``: the checkpoint's own architecture when transformers has
    it, else the causal-LM class of its model type (an encoder's bare model where it has none)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            # through the Auto class that maps this config to it: transformers then converts a checkpoint
            # stored in another layout at load and back at save (exaone's is stored as transformer.h.*)
            return next((auto for auto in _auto_classes() if auto._model_mapping.get(type(config), None) is cls), cls)
    if family_of(config.model_type) == "bert":
        return transformers.AutoModel
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def _auto_classes() -> tuple:
    import transformers

    return (transformers.AutoModelForCausalLM, transformers.AutoModelForSeq2SeqLM, transformers.AutoModelForMaskedLM,
            transformers.AutoModelForSequenceClassification, transformers.AutoModelForTokenClassification,
            transformers.AutoModel)


def skeleton_of(config) -> nn.Module:
    """The module tree ``config`` builds, on the meta device: names, classes and shapes, no weights."""
    cls = model_class_for(config)
    with torch.device("meta"):
        return cls.from_config(config) if hasattr(cls, "from_config") else cls(config)


# ----------------------------------------------------------------------------- discovered layouts
def discover_spec(model: nn.Module) -> ArchSpec:
    """The layout of a model, read from the model (or its skeleton).

    The blocks are the longest ``ModuleList`` of transformers' own no-split block classes
    (``_no_split_modules``: the decoder layers); a block's attention and feed-forward are its children
    whose classes say so; the input embedding is ``get_input_embeddings()``; GPT-2-style ``Conv1D``
    layers are found by type. A block with exactly two norms names them as the pre-LN norms of its
    attention and FFN; bottleneck sites use them only once the live model showed that its blocks add
    ``attn(norm1(x))`` and then ``mlp(norm2(.))`` to the residual (:func:`adaptkit.measured.facts_of`).
    """
    from transformers.pytorch_utils import Conv1D

    config = model.config
    names = {module: name for name, module in model.named_modules()}
    blocks_path, blocks = _blocks(model)
    first = blocks[0]
    attention = _child(first, ("attention", "attn"))
    mlp = _child(first, ("mlp", "moe", "feedforward", "feed_forward", "ffn", "experts"), skip=attention)
    norms = [name for name, child in first.named_children() if "norm" in type(child).__name__.lower()]
    pre_norms = norms if len(norms) == 2 else (None, None)  # pre-LN candidates, checked on the live model
    embedding = model.get_input_embeddings()
    conv1d = sorted({name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, Conv1D)})
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    family = family_of(runtime_model_type(config))
    spec = ArchSpec(
        family=family,
        layers_paths=(blocks_path,),
        attention=attention or "",
        mlp=mlp or "",
        attention_norm=pre_norms[0],
        mlp_norm=pre_norms[1],
        is_causal=not encoder_decoder and (getattr(config, "is_decoder", False) or _is_causal_lm(model)),
        conv1d_modules=tuple(conv1d),
        embedding_keys=_embedding_keys(model, embedding, names),
        is_seq2seq=encoder_decoder,
    )
    return dataclasses.replace(spec, **_POST_LN_SITES[family]) if family in _POST_LN_SITES else spec


def _embedding_keys(model: nn.Module, embedding: nn.Module, names: dict) -> tuple[str, ...]:
    """The checkpoint keys the input embedding's weight may be saved under: its own name first, then every
    name tied to the same parameter (BART saves ``model.shared.weight`` for its decoder's ``embed_tokens``)."""
    weight = getattr(embedding, "weight", None)
    own = f"{names[embedding]}.weight" if embedding in names else None
    tied = [name for name, param in model.named_parameters(remove_duplicate=False) if param is weight and name != own]
    return tuple(dict.fromkeys(([own] if own else []) + tied))


def _is_causal_lm(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) or \
        type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def _blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, list) of the model's transformer blocks: the longest ``ModuleList`` whose members are all of
    the model's no-split block classes (any ``ModuleList`` of repeated modules where it names none); an
    encoder-decoder's are its decoder's (a prefix is the decoder's cache)."""
    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    lists = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) > 0]
    if getattr(model.config, "is_encoder_decoder", False):
        lists = [(name, module) for name, module in lists if "decoder" in name.split(".")] or lists
    found = [(len(module), -name.count("."), name, module) for name, module in lists
             if {type(m).__name__ for m in module} <= block_classes]
    if not found:  # the no-split list names other classes (embeddings, a cross-attention): repeated modules
        found = [(len(module), -name.count("."), name, module) for name, module in lists
                 if len({type(m).__name__ for m in module}) == 1]
    if not found:
        raise BaseModelError(f"{type(model).__name__}: no list of transformer blocks found (looked for a ModuleList of "
                             f"{', '.join(sorted(block_classes)) or 'repeated modules'})")
    _, _, name, blocks = max(found, key=lambda f: f[:2])
    return name, blocks


def _child(block: nn.Module, words: tuple[str, ...], skip: str | None = None) -> str | None:
    """The first direct child of ``block`` (not a norm or a dropout) whose attribute name, else whose class
    name, contains one of ``words`` (``skip``: a child already taken, as Qwen3-MoE's attention class also
    says "moe")."""
    children = [(name, child) for name, child in block.named_children() if name != skip and not any(
        word in type(child).__name__.lower() for word in ("norm", "dropout"))]  # GPT-NeoX's post_attention_layernorm
    for label_of in (lambda name, child: name, lambda name, child: type(child).__name__):
        for name, child in children:
            label = label_of(name, child).lower().replace("_", "")
            if any(word.replace("_", "") in label for word in words):
                return name
    return None


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
    # each layer's (K/V heads, head size) as the model caches them (None: a layer that caches no K/V, as a
    # hybrid's state-space layers); the whole None: read from the config only (``num_kv_heads``/``head_dim``
    # then say what the config says; with a uniform layout they are its layers' own)
    kv_layout: tuple[tuple[int, int] | None, ...] | None = None
    # a forward continued from the cache of the tokens before equals the whole forward (measured on causal
    # LMs; False where a model's cache does not carry everything a later token reads)
    cache_continues: bool = True
    # a row keeps its outputs behind masked-out padding with adaptkit's position_ids (measured; False where
    # the model places tokens by its input length, as learned absolute positions counted from the cache do):
    # rows of different lengths then run in forwards of their own (``Engine._row_groups``)
    pads_exactly: bool = True
    # a block measured to compute x + attn(norm1(x)), then + mlp(norm2(.)): AdapterHub's pre-LN
    # bottleneck placement applies
    pre_ln_measured: bool = False
    # an encoder's position id of its first token, measured: 0, or padding_idx + 1 where the model numbers
    # positions after its padding id as RoBERTa does (a prompt's virtual tokens are numbered from it)
    first_position: int = 0

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def caches_uniform_kv(self) -> bool:
        """A causal LM whose every layer caches K/V of one shape: a soft prompt's effect on every later
        token is then its per-layer K/V, computed once (a recurrent or convolution state, or layers of
        different shapes, keep prompts as prepended embeddings)."""
        layout = self.kv_layout
        return self.spec.is_causal and self.cache_continues and layout is not None and None not in layout and \
            len(set(layout)) == 1


def runtime_model_type(config) -> str:
    """The model type of the class transformers runs ``config`` with: its own, or another's whose class it
    reuses (transformers 5.25 runs ``exaone`` and ``internlm3`` configs with ``LlamaForCausalLM``)."""
    cls = model_class_for(config)
    mapping = getattr(cls, "_model_mapping", None)  # an Auto class: the concrete class for this config
    if mapping is not None:
        try:
            cls = mapping[type(config)]
        except KeyError:
            return config.model_type
    return getattr(getattr(cls, "config_class", None), "model_type", None) or config.model_type


def family_of_class(class_name: str) -> str | None:
    """The family label of a transformers class name (``LlamaForCausalLM`` -> ``llama``; a class of a
    model type of no family -> that model type), None for a name transformers does not have."""
    import transformers

    cls = getattr(transformers, class_name, None)
    model_type = getattr(getattr(cls, "config_class", None), "model_type", None)
    if not model_type:
        return None
    return family_of(model_type)


def facts_from_config(config) -> ModelFacts:
    """Read the sizes adaptkit needs from a transformers config, with the layout discovered from the skeleton
    the config builds (:func:`discover_spec`); one skeleton per distinct config."""
    key = config.to_json_string(use_diff=False)
    found = _DISCOVERED.get(key)
    if found is None:
        found = _DISCOVERED[key] = _discovered_facts(config)
    return found


_DISCOVERED: dict[str, ModelFacts] = {}  # config JSON -> facts


def _discovered_facts(config) -> ModelFacts:
    skeleton = skeleton_of(config)
    spec = discover_spec(skeleton)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, heads = getattr(text, "hidden_size", None), getattr(text, "num_attention_heads", None)
    missing = [n for n, v in (("hidden_size", hidden), ("vocab_size", getattr(text, "vocab_size", None))) if v is None]
    if missing:
        raise BaseModelError(f"{config.model_type}: its config names no {', '.join(missing)}; adaptkit reads a base's "
                             "sizes from these standard fields")
    if spec.is_seq2seq:  # the decoder's heads: a prefix is the decoder's cache (BART's may differ from its encoder's)
        heads = getattr(text, "decoder_attention_heads", None) or heads
    heads = heads or 1  # a state-space model (Mamba) has no attention heads: nothing reads them
    _, blocks = decoder_layers(skeleton, spec)
    return ModelFacts(
        spec=spec,
        model_type=config.model_type,
        hidden_size=hidden,
        num_layers=len(blocks),
        num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or getattr(text, "d_kv", None) or hidden // heads,
        vocab_size=text.vocab_size,
        max_positions=getattr(text, "max_position_embeddings", None),
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
