"""AdapterFusion (Pfeiffer et al., 2021): attention over several bottleneck adapters at one site.

As AdapterHub's ``BertFusion`` computes it, for ``Fuse(a_1, ..., a_n)`` at one site::

    x, res = step 1 of the last child (see adapters/bottleneck.py)
    q   = W_q x + b_q                          (query_before_ln: the un-normalised h; parallel: r)
    u_i = up-projection of child i on x        (scaled, before its residual / ln_after)   [B, S, n, H]
    k_i = W_k u_i + b_k,  v_i = W_v u_i        (value has no bias)
    p   = softmax_i(q . k_i / T)               (no 1/sqrt(H))
    ctx = sum_i p_i v_i + res
    out = step 3 of the last child on ctx

``residual_before`` adds ``res`` to every ``u_i`` first (keys and values alike) and not to ctx;
``value_before_softmax: false`` applies W_v to ctx instead of to each u_i.

``temperature``: AdapterHub anneals T from 50 by 0.05 per forward call (a training schedule that
also runs at inference) down to 1. adaptkit uses the annealed value, T = 1, for every call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from adaptkit.adapters.bottleneck import SiteKey, _linear
from adaptkit.errors import AdapterFormatError

KIND = "fusion"


@dataclass(frozen=True)
class FusionConfig:
    """The fields of AdapterHub's fusion config that change the forward pass ("dynamic" defaults)."""

    query: bool = True
    key: bool = True
    value: bool = True
    value_before_softmax: bool = True
    residual_before: bool = False
    query_before_ln: bool = False
    temperature: float = 1.0

    def __post_init__(self):
        if self.temperature <= 0:
            raise AdapterFormatError(f"fusion temperature must be positive, got {self.temperature}")

    def fields(self) -> tuple[str, ...]:
        """The in-memory tensor names this config needs."""
        names = ("query.weight", "query.bias") if self.query else ()
        names += ("key.weight", "key.bias") if self.key else ()
        return names + (("value.weight",) if self.value else ())


class FusionLayer(nn.Module):
    """The fusion weights of one site: ``query``/``key`` [H, H] + [H], ``value`` [H, H]."""

    def __init__(self, config: FusionConfig, tensors: Mapping[str, torch.Tensor], where: str = "fusion"):
        super().__init__()
        self.config = config
        needed = set(config.fields())
        if needed != set(tensors):
            raise AdapterFormatError(
                f"{where}: tensors do not match the fusion config (missing {sorted(needed - set(tensors)) or 'none'}, "
                f"unexpected {sorted(set(tensors) - needed) or 'none'}); value has no bias in AdapterFusion"
            )
        hidden = next(iter(tensors.values())).shape[-1]
        for key, tensor in tensors.items():
            expected = (hidden,) if key.endswith(".bias") else (hidden, hidden)
            if tuple(tensor.shape) != expected:
                raise AdapterFormatError(f"{where}: {key} has shape {tuple(tensor.shape)}, expected {expected}")
        self.query = _linear(tensors["query.weight"], tensors["query.bias"]) if config.query else None
        self.key = _linear(tensors["key.weight"], tensors["key.bias"]) if config.key else None
        self.value = _linear(tensors["value.weight"], None) if config.value else None

    @property
    def hidden_size(self) -> int:
        return next(iter(self.parameters())).shape[-1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.state_dict().items()}

    def attend(self, query: torch.Tensor, ups: list[torch.Tensor], res: torch.Tensor) -> torch.Tensor:
        """``sum_i softmax_i(q . k_i / T) v_i + res``; query, res, each up: [B, S, H] -> [B, S, H]."""
        cfg = self.config
        stacked = torch.stack(ups).permute(1, 2, 0, 3)  # [B, S, n, H]
        if cfg.residual_before:
            stacked = stacked + res[:, :, None, :]
        q = self.query(query) if self.query is not None else query
        k = self.key(stacked) if self.key is not None else stacked
        v = self.value(stacked) if self.value is not None and cfg.value_before_softmax else stacked
        scores = torch.squeeze(torch.matmul(q.unsqueeze(2), k.transpose(-2, -1)), dim=2)  # [B, S, n]
        probs = torch.softmax(scores / cfg.temperature, dim=-1)
        ctx = torch.squeeze(torch.matmul(probs.unsqueeze(2), v), dim=2)  # [B, S, H]
        if self.value is not None and not cfg.value_before_softmax:
            ctx = self.value(ctx)
        return ctx if cfg.residual_before else ctx + res


@dataclass
class FusionAdapter:
    """A loaded fusion: which adapters it fuses (engine names, in order) and one layer per site.

    The fused adapters are found by name in the engine: load them under the names recorded in the
    fusion (``adapter_names``), or bind other names with ``dataclasses.replace(f, adapter_names=...)``
    before ``add_adapter``.
    """

    config: FusionConfig
    adapter_names: tuple[str, ...]
    sites: dict[SiteKey, FusionLayer]
    hub_name: str  # "a,b": the name in AdapterHub's keys and folder
    fingerprint: str | None = None
    source: str | None = None
    base_class: str | None = None
    hub_meta: dict = field(default_factory=dict)  # AdapterHub's model_name, model_type, version as read

    kind = KIND

    def __post_init__(self):
        self.adapter_names = tuple(self.adapter_names)
        if len(self.adapter_names) < 2:
            raise AdapterFormatError(f"{self.source or 'fusion'}: a fusion needs at least two adapters, got {self.adapter_names}")

    @property
    def hidden_size(self) -> int:
        return next(iter(self.sites.values())).hidden_size

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for layer in self.sites.values() for p in layer.parameters())

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for layer in self.sites.values() for p in layer.parameters())


def fusion_details(fusion: FusionAdapter) -> dict:
    """What ``Engine.adapters`` and ``adaptkit inspect`` show about a fusion."""
    return {
        "adapters": list(fusion.adapter_names),
        "sites": sorted({site for _, site in fusion.sites}),
        "blocks": len({layer for layer, _ in fusion.sites}),
        "query_before_ln": fusion.config.query_before_ln,
        "residual_before": fusion.config.residual_before,
        "temperature": fusion.config.temperature,
    }
