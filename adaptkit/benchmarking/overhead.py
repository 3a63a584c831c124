"""The overhead model: the work each adapter kind adds per token, in multiply-accumulates (MACs).

Counted against the base's own work per token at a given context length ``c``::

    base(c) = sum over linear layers of in * out  +  2 * L * H_q * D * c      (Q.K^T and A.V)

What each kind adds per token (``docs/overhead.md`` puts these next to the measured ratios):

    LoRA (unmerged)       sum over targets r * (in + out)           A: [r, in], B: [out, r]
    LoRA (merged)         0                                         folded into W
    prefix / prompt cache 2 * L * H_q * D * P                       P more keys and values per layer
    prompt (embeddings)   the above, plus P extra positions through the whole model at prefill
    bottleneck            sum over sites 2 * H * d                  d = H / reduction_factor
    fusion                its n adapters' bottlenecks, plus per site
                          H^2 (query) + n * 2 * H^2 (key, value) + 2 * n * H (scores, weighted sum)

Norms, activations, softmax and routing are not counted: they are small next to the matmuls on
large models and are exactly what the measured ratios show on small ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from adaptkit.inject import base_modules, linear_shape


@dataclass(frozen=True)
class BaseWork:
    """The base's work per token: linear layers, and attention per position of context."""

    linear_macs: int  # every linear layer (LM head included), per token
    attention_macs_per_position: int  # 2 * L * H_q * D: Q.K^T and A.V against one cached position

    def per_token(self, context: float) -> float:
        return self.linear_macs + self.attention_macs_per_position * context


def base_work(model: nn.Module, facts) -> BaseWork:
    """Count the base model's linear layers (looking through adaptkit's wrappers) and attention."""
    linear = 0
    for module in base_modules(model).values():
        shape = linear_shape(module)
        if shape is not None:
            linear += shape[0] * shape[1]
    return BaseWork(linear, 2 * facts.num_layers * facts.num_heads * facts.head_dim)


def adapter_macs(adapter) -> int:
    """MACs per token an adapter adds in its layers (0 for prefix/prompt: theirs is attention)."""
    kind = adapter.kind
    if kind == "lora":
        return sum(w.rank * (w.in_features + w.out_features) for w in adapter.layers.values())
    if kind == "bottleneck":
        return sum(layer.down.weight.numel() + layer.up.weight.numel() for layer in adapter.sites.values())
    return 0


def fusion_macs(fusion, children: Sequence) -> int:
    """MACs per token of a fusion over ``children`` (their bottlenecks run too) and its attention."""
    n = len(fusion.adapter_names)
    own = 0
    for layer in fusion.sites.values():
        hidden = layer.hidden_size
        own += hidden * hidden if layer.query is not None else 0
        own += n * hidden * hidden * ((layer.key is not None) + (layer.value is not None))
        own += 2 * n * hidden
    return own + sum(adapter_macs(child) for child in children)


def virtual_tokens(adapter) -> int:
    """P: the extra positions a prefix or prompt adapter puts in front of every request."""
    return getattr(adapter, "num_virtual_tokens", 0) if adapter.kind in ("prefix", "prompt") else 0


def added_fractions(
    base: BaseWork,
    row_macs: Sequence[float],
    row_virtual: Sequence[int],
    prompt_len: int,
    new_tokens: int,
    prompt_embeddings: bool = False,
) -> dict:
    """Theoretical added work of one case, as a fraction of the base's, for prefill and decode.

    ``row_macs[i]``/``row_virtual[i]``: the MACs per token and virtual positions of row ``i``'s
    adapter. Prefill averages attention over context ``(S + 1) / 2``, decode over ``S + N / 2``.
    With ``prompt_embeddings`` the P virtual tokens also run through the model on every request.
    """
    rows = len(row_macs)
    attn = base.attention_macs_per_position
    prefill_base = base.per_token((prompt_len + 1) / 2)
    decode_base = base.per_token(prompt_len + new_tokens / 2)
    prefill_added = decode_added = 0.0
    for macs, virtual in zip(row_macs, row_virtual):
        prefill_added += macs + attn * virtual
        decode_added += macs + attn * virtual
        if prompt_embeddings and virtual:
            prefill_added += virtual / prompt_len * base.per_token((virtual + 1) / 2)
    return {
        "added_macs_per_token_prefill": prefill_added / rows,
        "added_macs_per_token_decode": decode_added / rows,
        "base_macs_per_token_prefill": prefill_base,
        "base_macs_per_token_decode": decode_base,
        "added_fraction_prefill": prefill_added / rows / prefill_base,
        "added_fraction_decode": decode_added / rows / decode_base,
    }
