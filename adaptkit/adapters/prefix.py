"""Prefix tuning (Li & Liang, 2021) and P-tuning v2 (Liu et al., 2022): learned keys/values in every layer.

Every attention layer ``l`` attends to ``P`` extra positions whose keys and values are learned::

    attn_l(x) = softmax(q [K_l ; k(x)]^T / sqrt(D)) [V_l ; v(x)]      K_l, V_l: [H_kv, P, D]

The real tokens continue after the prefix (positions ``P, P+1, ...``). P-tuning v2 trains the
flat tensor ``F`` ([P, L*2*H_kv*D], PEFT's ``prompt_embeddings``) directly; prefix tuning trains it
through a two-layer MLP, folded once at load::

    F = W_2 tanh(W_1 E + b_1) + b_2          E: [P, token_dim], W_1: [h, token_dim], W_2: [L*2*H_kv*D, h]

Row ``t`` of ``F`` holds, for each layer ``l``, ``K_l[:, t]`` then ``V_l[:, t]`` (heads, then ``D``).
The runtime only holds the final ``K``/``V``; nothing is re-run per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adaptkit.errors import AdapterMismatchError, UnsupportedAdapterError

KIND = "prefix"

# prefix_tuning: trained through the MLP; p_tuning_v2: trained directly;
# prompt_cache: the K/V of a prompt adapter's virtual tokens computed on one base (``adaptkit export``)
METHODS = ("prefix_tuning", "p_tuning_v2", "prompt_cache")


@dataclass(frozen=True)
class PrefixConfig:
    """Sizes of a prefix: ``num_virtual_tokens`` positions in each of ``num_layers`` layers."""

    num_virtual_tokens: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    method: str = "p_tuning_v2"

    def __post_init__(self):
        for name in ("num_virtual_tokens", "num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UnsupportedAdapterError(f"prefix {name} must be a positive integer, got {value!r}")
        if self.method not in METHODS:
            raise UnsupportedAdapterError(f"prefix method {self.method!r} is unknown; known: {', '.join(METHODS)}")

    @property
    def token_dim(self) -> int:
        """Width of one layer's key (or value) of one virtual token: ``H_kv * D``."""
        return self.num_kv_heads * self.head_dim

    @property
    def flat_width(self) -> int:
        """Width of PEFT's flat ``prompt_embeddings``: ``L * 2 * H_kv * D``."""
        return self.num_layers * 2 * self.token_dim


@dataclass
class PrefixAdapter:
    """A loaded prefix: per-layer keys and values, each [L, H_kv, P, D]."""

    config: PrefixConfig
    keys: torch.Tensor
    values: torch.Tensor
    fingerprint: str | None = None  # base fingerprint, when the writer recorded one
    source: str | None = None  # where it was read from
    base_class: str | None = None  # the transformers class it was trained on, when recorded
    # modules trained with the prefix and stored whole (PEFT's modules_to_save: a SEQ_CLS / TOKEN_CLS head)
    saved_modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    kind = KIND

    def __post_init__(self):
        cfg = self.config
        expected = (cfg.num_layers, cfg.num_kv_heads, cfg.num_virtual_tokens, cfg.head_dim)
        for name in ("keys", "values"):
            tensor = getattr(self, name)
            if tuple(tensor.shape) != expected:
                raise UnsupportedAdapterError(
                    f"{self.source or 'prefix'}: {name} has shape {tuple(tensor.shape)}, expected "
                    f"[layers, kv heads, virtual tokens, head_dim] = {list(expected)}"
                )

    @property
    def parameter_count(self) -> int:
        return self.keys.numel() + self.values.numel()

    @property
    def nbytes(self) -> int:
        return self.parameter_count * self.keys.element_size()

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    def to(self, device: torch.device | str, dtype: torch.dtype) -> PrefixAdapter:
        """Move the keys and values (in place) and return self."""
        self.keys = self.keys.to(device=device, dtype=dtype)
        self.values = self.values.to(device=device, dtype=dtype)
        return self


def prefix_from_flat(flat: torch.Tensor, config: PrefixConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's flat ``prompt_embeddings`` [P, L*2*H*D] -> (keys, values), each [L, H, P, D].

    PEFT views it as [P, 2L, H, D] and takes entry ``2l`` as layer ``l``'s keys, ``2l+1`` as its values.
    """
    cfg = config
    per_layer = flat.reshape(cfg.num_virtual_tokens, cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim)
    per_layer = per_layer.permute(1, 2, 3, 0, 4)  # [L, 2, H, P, D]
    return per_layer[:, 0].contiguous(), per_layer[:, 1].contiguous()


def flat_from_prefix(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`prefix_from_flat`: (keys, values) [L, H, P, D] -> [P, L*2*H*D]."""
    stacked = torch.stack([keys, values], dim=1)  # [L, 2, H, P, D]
    return stacked.permute(3, 0, 1, 2, 4).reshape(keys.shape[2], -1).contiguous()


def fold_prefix_mlp(
    embedding: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> torch.Tensor:
    """The reparameterisation, run once: ``W_2 tanh(W_1 E + b_1) + b_2`` -> [P, L*2*H*D] (float32)."""
    hidden = torch.tanh(embedding.float() @ w1.float().T + b1.float())
    return hidden @ w2.float().T + b2.float()


def takes_prefix(facts) -> bool:
    """Whether a prefix's K/V has somewhere to go: a causal LM, an encoder-decoder's decoder, or an encoder
    whose self-attention was measured to fill a key/value cache it is given (BERT's does, DeBERTa's not)."""
    return facts.spec.is_causal or facts.spec.is_seq2seq or facts.kv_layout is not None


def check_prefix_fits(adapter: PrefixAdapter, facts) -> None:
    """Raise unless the prefix has the base's layers, KV heads and head size, and the base is causal."""
    source = adapter.source or "prefix adapter"
    cfg = adapter.config
    if not takes_prefix(facts):
        raise UnsupportedAdapterError(
            f"{source}: a prefix adapter needs attention that takes extra keys and values; the {facts.model_type} "
            "encoder's attention takes no key/value cache (a forward given one fills none); use prompt tuning on it")
    if facts.kv_layout is None and facts.spec.is_causal:
        raise UnsupportedAdapterError(
            f"{source}: the {facts.model_type} base keeps no key/value cache (a one-token forward fills none), so "
            "there is nowhere to put a prefix; prompt tuning works on it"
        )
    if facts.kv_layout is not None and None in facts.kv_layout:
        stateful = [i for i, shape in enumerate(facts.kv_layout) if shape is None]
        raise UnsupportedAdapterError(
            f"{source}: layers {stateful} of the {facts.model_type} base keep a recurrent or convolution state, not "
            "keys and values; a prefix has K/V for every layer, so it cannot be served here (prompt tuning can)"
        )
    if facts.kv_layout is not None and len(set(facts.kv_layout)) > 1:
        raise UnsupportedAdapterError(
            f"{source}: the {facts.model_type} base caches K/V of different shapes per layer ((heads, head_dim): "
            f"{sorted(set(facts.kv_layout))}); a prefix has one shape for every layer, so it cannot be served here"
        )
    ours = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    base = (facts.num_layers, facts.num_kv_heads, facts.head_dim)
    if ours != base:
        raise AdapterMismatchError(
            f"{source}: the prefix has {ours[0]} layers x {ours[1]} KV heads x head_dim {ours[2]}, but the base "
            f"({facts.model_type}) caches {base[0]} layers x {base[1]} KV heads x head_dim {base[2]}; "
            "the adapter was made for another base"
        )


def prefix_details(adapter: PrefixAdapter) -> dict:
    """What ``Engine.adapters`` and ``adaptkit inspect`` show about a prefix."""
    cfg = adapter.config
    heads = {"modules_to_save": sorted(adapter.saved_modules)} if adapter.saved_modules else {}
    return heads | {
        "method": cfg.method,
        "virtual_tokens": cfg.num_virtual_tokens,
        "layers": cfg.num_layers,
        "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
    }
