"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021; parallel: He et al., 2022).

The semantics are AdapterHub's (``adapters`` 1.3.0), step for step. An adapter sits at a *site*
after a transformer sub-block: ``mh`` (after attention) or ``output`` (after the feed-forward).
There the base computes ``LN(h + r)`` (post-LN BERT) or ``h + r`` (pre-LN GPT-2/Llama, where LN
is the identity), with ``h`` the sub-block output and ``r`` its residual input, both [B, S, H].
An adapter replaces that expression in three steps::

    1. x, res   sequential: x = LN(h + r) if original_ln_before else h
                            res = h (residual_before_ln), x (False) or h + r ("post_add")
                parallel:   x = res = r
    2. up = s * W_up act(W_down LN_before(x) + b_down) + s * b_up      W_down: [d, H], W_up: [H, d]
       (use_gating: up * mean_over_seq(sigmoid(W_g x + b_g)))
                sequential: a = LN_after(up) + res   (adapter_residual_before_ln: LN_after(up + res))
                parallel:   a = LN_after(up)
    3. parallel adapters first add h: a = a + h
       out = LN(a + r) if original_ln_after else a

``s`` is a fixed float, a learned scalar ([1]) or learned per channel ([H]); ``d = H // rf``.
Compositions (Stack, Average, Fuse, Mix) reuse the steps: see ``adapters/compose.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from adaptkit.errors import AdapterFormatError, UnsupportedAdapterError

KIND = "bottleneck"
SITES = ("mh", "output")  # AdapterHub's mh_adapter (after attention) and output_adapter (after the FFN)
LN_EPS = 1e-5  # adapter LayerNorms use torch's default eps, not the model's

SiteKey = tuple[int, str]  # (block index, site)


def _leaky_relu(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.leaky_relu(x)


# Names AdapterHub resolves outside transformers' activation table (ACT2FN covers the rest).
_EXTRA_ACTIVATIONS = {"leakyrelu": _leaky_relu}
_ACTIVATION_ALIASES = {"gelu_orig": "gelu"}  # adapter-transformers' name for the exact erf GELU


def activation(name: str):
    """The activation AdapterHub uses for ``non_linearity`` (``gelu`` is the exact erf GELU)."""
    from transformers.activations import ACT2FN

    key = _ACTIVATION_ALIASES.get(name.lower(), name.lower())
    if key in _EXTRA_ACTIVATIONS:
        return _EXTRA_ACTIVATIONS[key]
    if key in ACT2FN:
        return ACT2FN[key]
    known = sorted(set(ACT2FN) | set(_EXTRA_ACTIVATIONS) | set(_ACTIVATION_ALIASES))
    raise UnsupportedAdapterError(f"non_linearity {name!r} is unknown; known: {', '.join(known)}")


@dataclass(frozen=True)
class BottleneckConfig:
    """The fields of an AdapterHub bottleneck config that change the forward pass.

    Defaults are ``SeqBnConfig()`` (Pfeiffer). ``reduction_factor`` may map block indices (as
    strings) to factors, with an optional ``"default"``.
    """

    mh_adapter: bool = False
    output_adapter: bool = True
    reduction_factor: float | Mapping[str, float] = 16
    non_linearity: str = "relu"
    original_ln_before: bool = True
    original_ln_after: bool = True
    residual_before_ln: bool | str = True  # True | False | "post_add"
    adapter_residual_before_ln: bool = False
    ln_before: bool = False
    ln_after: bool = False
    is_parallel: bool = False
    scaling: float | str = 1.0  # a number | "learned" | "channel"
    use_gating: bool = False
    leave_out: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        activation(self.non_linearity)
        if self.residual_before_ln not in (True, False, "post_add"):
            raise UnsupportedAdapterError(
                f"residual_before_ln={self.residual_before_ln!r}; expected true, false or \"post_add\""
            )
        if isinstance(self.scaling, str):
            if self.scaling not in ("learned", "channel"):
                raise UnsupportedAdapterError(f"scaling={self.scaling!r}; expected a number, \"learned\" or \"channel\"")
        elif not isinstance(self.scaling, (int, float)) or isinstance(self.scaling, bool):
            raise UnsupportedAdapterError(f"scaling={self.scaling!r}; expected a number, \"learned\" or \"channel\"")
        factors = self.reduction_factor.values() if isinstance(self.reduction_factor, Mapping) else [self.reduction_factor]
        if not factors or any(isinstance(f, bool) or not isinstance(f, (int, float)) or f <= 0 for f in factors):
            raise UnsupportedAdapterError(f"reduction_factor={self.reduction_factor!r} must be positive number(s)")
        if not (self.mh_adapter or self.output_adapter):
            raise UnsupportedAdapterError("mh_adapter and output_adapter are both false: the adapter sits nowhere")

    @property
    def learned_scaling(self) -> bool:
        return isinstance(self.scaling, str)

    def bottleneck_size(self, hidden_size: int, layer: int) -> int:
        """``d = max(1, H // rf)`` with this block's reduction factor (AdapterHub's rule)."""
        rf = self.reduction_factor
        if isinstance(rf, Mapping):
            if str(layer) in rf:
                rf = rf[str(layer)]
            elif "default" in rf:
                rf = rf["default"]
            else:
                raise UnsupportedAdapterError(
                    f"reduction_factor {dict(rf)!r} gives no factor for block {layer}; add a \"default\" entry"
                )
        return max(1, int(hidden_size // rf))


# In-memory tensor names of one site (the AdapterHub names are in formats/adapterhub.py).
FIELDS = (
    "down.weight", "down.bias", "up.weight", "up.bias", "norm_before.weight", "norm_before.bias",
    "norm_after.weight", "norm_after.bias", "scaling", "gate.weight", "gate.bias",
)


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = _frozen(weight)
    if bias is not None:
        layer.bias = _frozen(bias)
    return layer


def _layer_norm(weight: torch.Tensor, bias: torch.Tensor) -> nn.LayerNorm:
    norm = nn.LayerNorm(weight.shape[0], eps=LN_EPS, device="meta")
    norm.weight, norm.bias = _frozen(weight), _frozen(bias)
    return norm


class BottleneckLayer(nn.Module):
    """One bottleneck adapter at one site: the three steps of the module docstring.

    Tensors (``FIELDS``): ``down`` [d, H] + [d], ``up`` [H, d] + [H], ``norm_before``/``norm_after``
    [H] + [H] (ln_before/ln_after), ``scaling`` [1] or [H] (learned), ``gate`` [1, H] + [1].
    """

    def __init__(self, config: BottleneckConfig, tensors: Mapping[str, torch.Tensor], where: str = "adapter"):
        super().__init__()
        self.config = config
        needed = {"down.weight", "down.bias", "up.weight", "up.bias"}
        needed |= {"norm_before.weight", "norm_before.bias"} if config.ln_before else set()
        needed |= {"norm_after.weight", "norm_after.bias"} if config.ln_after else set()
        needed |= {"scaling"} if config.learned_scaling else set()
        needed |= {"gate.weight", "gate.bias"} if config.use_gating else set()
        missing = sorted(needed - set(tensors))
        extra = sorted(set(tensors) - needed)
        if missing or extra:
            raise AdapterFormatError(
                f"{where}: tensors do not match the config (missing {missing or 'none'}, unexpected {extra or 'none'})"
            )
        if tensors["down.weight"].ndim != 2:
            raise AdapterFormatError(f"{where}: down.weight has shape {tuple(tensors['down.weight'].shape)}, expected [d, H]")
        self.down = _linear(tensors["down.weight"], tensors["down.bias"])
        self.up = _linear(tensors["up.weight"], tensors["up.bias"])
        d, hidden = self.down.weight.shape
        shapes = {"down.bias": (d,), "up.weight": (hidden, d), "up.bias": (hidden,)}
        shapes.update({k: (hidden,) for k in ("norm_before.weight", "norm_before.bias", "norm_after.weight",
                                               "norm_after.bias")})
        shapes.update({"scaling": (1,) if config.scaling == "learned" else (hidden,), "gate.weight": (1, hidden),
                       "gate.bias": (1,)})
        for key in sorted(needed - {"down.weight"}):
            if tuple(tensors[key].shape) != shapes[key]:
                raise AdapterFormatError(
                    f"{where}: {key} has shape {tuple(tensors[key].shape)}, expected {shapes[key]} for a "
                    f"{hidden} -> {d} -> {hidden} bottleneck"
                )
        self.norm_before = _layer_norm(tensors["norm_before.weight"], tensors["norm_before.bias"]) if config.ln_before else None
        self.norm_after = _layer_norm(tensors["norm_after.weight"], tensors["norm_after.bias"]) if config.ln_after else None
        self.gate = _linear(tensors["gate.weight"], tensors["gate.bias"]) if config.use_gating else None
        self.scaling = _frozen(tensors["scaling"]) if config.learned_scaling else None
        self.act = activation(config.non_linearity)

    @property
    def hidden_size(self) -> int:
        return self.down.weight.shape[1]

    @property
    def bottleneck_size(self) -> int:
        return self.down.weight.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The in-memory named tensors (``FIELDS`` present in this layer)."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    # ------------------------------------------------------------------ the three steps
    def prepare(self, h: torch.Tensor, r: torch.Tensor, ln: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 1: the adapter input ``x`` and its residual ``res`` (all [B, S, H]).

        ``"post_add"`` without a block LayerNorm gives ``res = h + r`` (AdapterHub fails there).
        """
        cfg = self.config
        if cfg.is_parallel:
            return r, r
        x = h
        if cfg.original_ln_before:
            x = h + r if ln is None else ln(h + r)
        if cfg.residual_before_ln == "post_add":
            return x, h + r
        return x, (h if cfg.residual_before_ln else x)

    def up_projection(self, x: torch.Tensor) -> torch.Tensor:
        """``s * up(act(down(LN_before(x))))`` [B, S, H]: what AdapterFusion attends over."""
        z = x if self.norm_before is None else self.norm_before(x)
        up = self.up(self.act(self.down(z)))
        return up * (self.config.scaling if self.scaling is None else self.scaling)

    def transform(self, x: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        """Step 2: the adapter output ``a`` [B, S, H] (residual included for sequential adapters)."""
        out = self.up_projection(x)
        if self.gate is not None:
            out = out * torch.sigmoid(self.gate(x)).mean(dim=1, keepdim=True)  # gate: [B, 1, 1]
        if self.config.is_parallel:
            return out if self.norm_after is None else self.norm_after(out)
        if self.config.adapter_residual_before_ln:
            out = out + res
            return out if self.norm_after is None else self.norm_after(out)
        return (out if self.norm_after is None else self.norm_after(out)) + res

    def finish(
        self, a: torch.Tensor, h: torch.Tensor, r: torch.Tensor, ln: nn.Module | None, model_adds_residual: bool
    ) -> torch.Tensor:
        """Step 3: the site output. With ``model_adds_residual`` (pre-LN blocks add ``r``
        themselves after the sub-block) the value returned is the output minus ``r``."""
        if self.config.is_parallel:
            a = a + h
        if not self.config.original_ln_after:
            return a - r if model_adds_residual else a
        if ln is not None:
            return ln(a + r)
        return a if model_adds_residual else a + r


@dataclass
class BottleneckAdapter:
    """A loaded bottleneck adapter: its config and one :class:`BottleneckLayer` per site."""

    config: BottleneckConfig
    sites: dict[SiteKey, BottleneckLayer]  # (block index, "mh" | "output") -> layer
    hub_name: str  # the name inside AdapterHub's keys and adapter_config.json
    fingerprint: str | None = None
    source: str | None = None
    base_class: str | None = None  # the transformers class it was saved from (AdapterHub model_class)
    hub_meta: dict = field(default_factory=dict)  # AdapterHub's model_name, model_type, version as read

    kind = KIND

    @property
    def hidden_size(self) -> int:
        return next(iter(self.sites.values())).hidden_size

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for layer in self.sites.values() for p in layer.parameters())

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for layer in self.sites.values() for p in layer.parameters())


def bottleneck_details(adapter: BottleneckAdapter) -> dict:
    """What ``Engine.adapters`` and ``adaptkit inspect`` show about a bottleneck adapter."""
    cfg = adapter.config
    return {
        "placement": "parallel" if cfg.is_parallel else "sequential",
        "sites": sorted({site for _, site in adapter.sites}),
        "blocks": len({layer for layer, _ in adapter.sites}),
        "bottleneck": sorted({layer.bottleneck_size for layer in adapter.sites.values()}),
        "non_linearity": cfg.non_linearity,
        "scaling": cfg.scaling,
        "ln_before": cfg.ln_before,
        "ln_after": cfg.ln_after,
        "gating": cfg.use_gating,
    }
