"""LoRA (Hu et al., 2021), rsLoRA (Kalajdzievski, 2023) and DoRA (Liu et al., 2024).

A LoRA adds a low-rank update to chosen linear layers::

    y = x W^T + b + s * (x A^T) B^T          A: [r, in], B: [out, r]
    s = alpha / r          (rsLoRA: alpha / sqrt(r))

DoRA re-normalises the merged weight row by row with a learned magnitude ``m`` ([out])::

    W' = m * (W + s B A) / ||W + s B A||_row

Target selection follows PEFT exactly (``target_modules`` list or regex, ``layers_to_transform``,
``rank_pattern``/``alpha_pattern``), so a PEFT adapter selects the same modules here.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from adaptkit.errors import AdapterMismatchError, InvalidArgumentError, UnsupportedAdapterError

KIND = "lora"


def _pattern_key(patterns: Mapping[str, object], module_name: str) -> str | None:
    """PEFT's rule: the first pattern ``p`` with ``(.*\\.)?(p)$`` matching the module name."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return pattern
    return None


@dataclass(frozen=True)
class LoraConfig:
    """What a LoRA changes and how strongly.

    ``target_modules`` is a tuple of module-name suffixes or one regex (full match), as in PEFT.
    """

    r: int
    alpha: float
    target_modules: tuple[str, ...] | str
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    lora_bias: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    modules_to_save: tuple[str, ...] = ()
    init_lora_weights: bool | str = True  # PEFT's; "pissa"/"olora" change the base at load (see fold_base_residual)
    # PEFT's target_parameters: parameters adapted in place of modules ("gate_up_proj", "mlp.gate.weight"),
    # matched as suffixes of "module.param" names (fused MoE experts, routers)
    target_parameters: tuple[str, ...] = ()

    def __post_init__(self):
        if self.r <= 0:
            raise UnsupportedAdapterError(f"LoRA rank r must be positive, got {self.r}")
        if not self.target_modules and not self.target_parameters:
            raise UnsupportedAdapterError("LoRA target_modules is empty: the adapter would change nothing")

    def targets_parameter(self, key: str) -> bool:
        """PEFT's match of a ``module.param`` name against ``target_parameters``: equal, or a dotted suffix."""
        return any(key == t or key.endswith("." + t) for t in self.target_parameters)

    def rank_for(self, module_name: str) -> int:
        key = _pattern_key(self.rank_pattern, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = _pattern_key(self.alpha_pattern, module_name)
        return float(self.alpha_pattern[key]) if key is not None else float(self.alpha)

    def scale_for(self, module_name: str) -> float:
        """``alpha / r`` (rsLoRA: ``alpha / sqrt(r)``) with this module's rank and alpha."""
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def saves_module(self, module_name: str) -> bool:
        """True when ``module_name`` is replaced wholesale by a stored copy (``modules_to_save``)."""
        return any(re.match(rf"(^|.*\.){m}($|\..*)", module_name) for m in self.modules_to_save)

    def targets(self, module_name: str) -> bool:
        """PEFT's ``check_target_module_exists``: does this LoRA act on ``module_name``?"""
        excl = self.exclude_modules
        if excl:
            if isinstance(excl, str):
                if re.fullmatch(excl, module_name):
                    return False
            elif module_name in excl or any(module_name.endswith(f".{e}") for e in excl):
                return False
        if self.saves_module(module_name):
            return False
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module_name) is not None
        if module_name in self.target_modules:
            return True
        found = any(module_name.endswith(f".{t}") for t in self.target_modules)
        if not found or not self.layers_to_transform:
            return found
        return layer_index_of(module_name, self.layers_pattern) in self.layers_to_transform


def layer_index_of(module_name: str, layers_pattern: tuple[str, ...] | None) -> int | None:
    """The block index in a module name (``model.layers.3.mlp`` -> 3), PEFT's rule."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module_name)
    else:
        match = None
        for pattern in layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module_name)
            if match:
                break
    return int(match.group("idx")) if match else None


class LoraWeights(nn.Module):
    """The low-rank factors of one adapted layer.

    Shapes: ``lora_A`` [r, in], ``lora_B`` [out, r], ``lora_B_bias`` [out] (``lora_bias``),
    ``magnitude`` [out] (DoRA).
    """

    def __init__(
        self,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scale: float,
        lora_B_bias: torch.Tensor | None = None,
        magnitude: torch.Tensor | None = None,
        embedding: bool = False,
    ):
        super().__init__()
        self.lora_A = nn.Parameter(lora_A, requires_grad=False)
        self.lora_B = nn.Parameter(lora_B, requires_grad=False)
        self.lora_B_bias = None if lora_B_bias is None else nn.Parameter(lora_B_bias, requires_grad=False)
        self.magnitude = None if magnitude is None else nn.Parameter(magnitude, requires_grad=False)
        self.scale = float(scale)
        self.embedding = embedding  # a LoRA on an embedding table (in = vocab, out = dim; see embedding_output)

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    def low_rank_output(self, x: torch.Tensor) -> torch.Tensor:
        """``s * (x A^T B^T + bias_B)``; x: [..., in] -> [..., out]."""
        out = (x @ self.lora_A.to(x.dtype).T) @ self.lora_B.to(x.dtype).T
        if self.lora_B_bias is not None:
            out = out + self.lora_B_bias.to(x.dtype)
        return out * self.scale

    def replaced(self, **changes) -> LoraWeights:
        """A new ``LoraWeights`` with these tensors (or ``scale``) changed and the others shared."""
        fields = {"lora_A": self.lora_A.data, "lora_B": self.lora_B.data, "scale": self.scale,
                  "lora_B_bias": None if self.lora_B_bias is None else self.lora_B_bias.data,
                  "magnitude": None if self.magnitude is None else self.magnitude.data, "embedding": self.embedding}
        return LoraWeights(**{**fields, **changes})

    def embedding_output(self, ids: torch.Tensor) -> torch.Tensor:
        """For a LoRA on an embedding table (PEFT's ``lora_embedding_A`` [r, vocab], ``_B`` [dim, r]):
        ``s * A^T[ids] B^T``, ids [...] -> [..., dim]."""
        return (nn.functional.embedding(ids, self.lora_A.T) @ self.lora_B.T) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """``s * B @ A`` in float32, shape [out, in]."""
        return self.scale * (self.lora_B.float() @ self.lora_A.float())


class TokenRows(nn.Module):
    """New values for some rows of an embedding table (PEFT's ``trainable_token_indices``), or of the
    output head tied to it: ``indices`` [n] and ``values`` [n, dim].

    It stands where a LoRA layer's factors would (same interface: ``embedding_output`` for the table,
    ``low_rank_output`` for the head, ``delta_weight`` for merges), as the change from the base's rows,
    which it reads from the layer it is bound to (``bind_base``).
    """

    exact_only = True  # never on the stacked LoRA path
    lora_B_bias = None
    magnitude = None
    scale = 1.0

    def __init__(self, indices: torch.Tensor, values: torch.Tensor, embedding: bool):
        super().__init__()
        self.register_buffer("indices", indices.long())
        self.values = nn.Parameter(values, requires_grad=False)
        self.embedding = embedding  # True: the table [vocab, dim]; False: a head [vocab, dim] as a linear layer
        self._base: list[nn.Module] = []  # a list keeps the base layer out of this module's parameters

    def bind_base(self, module: nn.Module) -> None:
        self._base[:] = [module]

    @property
    def rank(self) -> int:
        return int(self.indices.numel())

    @property
    def in_features(self) -> int:  # as a linear map: the table takes one-hot tokens, the head hidden states
        return self._vocab() if self.embedding else self.values.shape[1]

    @property
    def out_features(self) -> int:
        return self.values.shape[1] if self.embedding else self._vocab()

    def _vocab(self) -> int:
        if not self._base:
            raise RuntimeError("TokenRows is not bound to its base layer")
        return self._base[0].weight.shape[0]

    def _change(self) -> torch.Tensor:
        """``values - W[indices]`` [n, dim] in float32."""
        weight = self._base[0].weight
        return self.values.float() - weight.detach()[self.indices.to(weight.device)].float().to(self.values.device)

    def embedding_output(self, ids: torch.Tensor) -> torch.Tensor:
        slot = torch.full((self._vocab(),), -1, dtype=torch.long, device=ids.device)
        slot[self.indices.to(ids.device)] = torch.arange(self.rank, device=ids.device)
        where = slot[ids]
        change = self._change().to(ids.device)
        out = change[where.clamp(min=0)]
        return out * (where >= 0).unsqueeze(-1).to(out.dtype)

    def low_rank_output(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(*x.shape[:-1], self._vocab())
        out[..., self.indices.to(x.device)] = x @ self._change().to(x.device, x.dtype).T
        return out

    def delta_weight(self) -> torch.Tensor:
        """[out, in] float32: the table's [dim, vocab] or the head's [vocab, dim], the changed rows only."""
        change = self._change()
        delta = torch.zeros(self._vocab(), change.shape[1], dtype=torch.float32, device=change.device)
        delta[self.indices.to(change.device)] = change
        return delta.T if self.embedding else delta

    def replaced(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (the table or head as stored, [vocab, dim]) with the rows replaced."""
        out = weight.clone()
        out[self.indices.to(weight.device)] = self.values.to(weight.device, weight.dtype)
        return out


class ParamLora(nn.Module):
    """A LoRA on a parameter rather than a module (PEFT's ``target_parameters``): a router's weight, or fused
    MoE expert weights ``[E, ., .]`` with one rank-``r`` update per expert.

    PEFT's layout: ``lora_A`` [r E, in], ``lora_B`` [out, r E]; for experts ``A`` reads as [E, r, in] and
    ``B`` as [out, r, E], and expert e's update is ``s * B[:, :, e] @ A[e]``. A 3-D parameter is [E, in, out]
    when its module says ``is_transposed`` (gpt-oss), else [E, out, in] (Qwen3-MoE, Mixtral); a 2-D one is
    [out, in]. The forward runs the module with ``W + delta`` (PEFT does the same through a parametrization).
    """

    def __init__(self, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, shape: tuple[int, ...],
                 transposed: bool = False):
        super().__init__()
        self.lora_A = nn.Parameter(lora_A, requires_grad=False)
        self.lora_B = nn.Parameter(lora_B, requires_grad=False)
        self.scale = scale
        self.shape = tuple(shape)
        self.transposed = transposed

    @property
    def num_experts(self) -> int:
        return self.shape[0] if len(self.shape) == 3 else 1

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0] // self.num_experts

    def expected_factor_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(A, B) shapes PEFT saves for a parameter of ``self.shape`` at this rank."""
        if len(self.shape) == 2:
            out_f, in_f = self.shape
        elif self.transposed:
            _, in_f, out_f = self.shape
        else:
            _, out_f, in_f = self.shape
        rows = self.rank * self.num_experts
        return (rows, in_f), (out_f, rows)

    def delta(self) -> torch.Tensor:
        """The update, in the parameter's own shape and the factors' dtype."""
        a, b = self.lora_A, self.lora_B
        if len(self.shape) == 2:
            return (b @ a) * self.scale
        experts = self.num_experts
        a = a.reshape(experts, -1, a.shape[-1])  # [E, r, in]
        b = b.reshape(b.shape[0], -1, experts)  # [out, r, E]
        pattern = "ore,eri->eio" if self.transposed else "ore,eri->eoi"  # [E, in, out] or [E, out, in]
        return torch.einsum(pattern, b, a) * self.scale


def bind_parameter_factors(adapter: LoraAdapter, module_at) -> LoraAdapter:
    """Resolve the factors PEFT saves per module (nested ``base_layer.`` for a module with several targeted
    parameters) into :class:`ParamLora` per ``module.param``, with the base module ``module_at(name)``.

    PEFT wraps a module's targeted parameters in their registration order, the first innermost: with N
    of them, the i-th has N-1-i ``base_layer.`` steps in its keys.
    """
    if not adapter.parameter_factors:
        return adapter
    source = adapter.source or "LoRA adapter"
    bound = {}
    for owner, by_depth in adapter.parameter_factors.items():
        module = module_at(owner)
        if module is None:
            raise AdapterMismatchError(f"{source}: the base has no module {owner!r} (target_parameters); "
                                       "the adapter was made for another base")
        params = [(n, p) for n, p in module.named_parameters(recurse=False)
                  if adapter.config.targets_parameter(f"{owner}.{n}")]
        if len(params) != len(by_depth):
            raise AdapterMismatchError(
                f"{source}: {owner} has {len(by_depth)} factor pairs but the base's module has {len(params)} "
                f"parameters matching target_parameters ({', '.join(n for n, _ in params) or 'none'})")
        for i, (name, param) in enumerate(params):
            a, b = by_depth[len(params) - 1 - i]
            key = f"{owner}.{name}"
            lora = ParamLora(a, b, adapter.config.scale_for(key), tuple(param.shape),
                             transposed=bool(getattr(module, "is_transposed", False)))
            if (tuple(a.shape), tuple(b.shape)) != lora.expected_factor_shapes():
                raise AdapterMismatchError(
                    f"{source}: {key}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit the base's "
                    f"{tuple(param.shape)} parameter (expected {lora.expected_factor_shapes()}); the adapter was made "
                    "for another base")
            bound[key] = lora
    return dataclasses.replace(adapter, parameter_factors={}, parameter_layers=bound)


@dataclass
class LoraAdapter:
    """A loaded LoRA: its config, the factors per module, and whole modules it replaces."""

    config: LoraConfig
    layers: dict[str, LoraWeights]  # module name (as in the base model) -> factors
    saved_modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # modules_to_save
    fingerprint: str | None = None  # base fingerprint, when the writer recorded one
    source: str | None = None  # where it was read from
    base_class: str | None = None  # the transformers class it was trained on, when recorded
    # the base layers' own tensors PEFT saves beside a LoRA on an embedding or output layer
    # ({module: {param: tensor}}); they must equal the base's (checked when attached and merged)
    base_weights: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    # the PEFT method it was read from: LORA, or another weight-delta method served as a LoRA-family
    # adapter (its layers then hold weights objects with LoraWeights' interface; see adapters/peft_types.py)
    peft_type: str = "LORA"
    # base biases trained with the adapter (PEFT's bias="all" / "lora_only"): {module: new bias}; folded
    # into lora_B_bias (targeted layers) and stored copies (other layers) by fold_trained_biases
    trained_biases: dict[str, torch.Tensor] = field(default_factory=dict)
    # target_parameters: factors as read ({owner module: {base_layer depth: (A, B)}}), then bound to the
    # base's parameters by bind_parameter_factors ({"module.param": ParamLora})
    parameter_factors: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    parameter_layers: dict[str, ParamLora] = field(default_factory=dict)

    kind = KIND

    @property
    def needs_base_residual(self) -> bool:
        """True until :func:`fold_base_residual` has folded the base change PEFT's init makes at load."""
        return self.config.init_lora_weights in RESIDUAL_INITS and not self.residual_folded

    residual_folded: bool = False  # the layers already carry the init's base residual as extra rank

    def _tensors(self):
        yield from (p for w in self.layers.values() for p in w.parameters())
        yield from (t for sd in self.saved_modules.values() for t in sd.values())
        yield from (t for by_depth in self.parameter_factors.values() for pair in by_depth.values() for t in pair)
        yield from (p for w in self.parameter_layers.values() for p in w.parameters())

    @property
    def parameter_count(self) -> int:
        return sum(t.numel() for t in self._tensors())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def ranks(self) -> dict[str, int]:
        return {name: w.rank for name, w in self.layers.items()}


# ----------------------------------------------------------------------------- inits that change the base
# PEFT re-runs ``init_lora_weights`` when it loads an adapter. Most inits only set A and B (which the
# file then overwrites); these two also subtract ``s * B0 A0`` from the base weight, computed from
# the base weight itself, deterministically (a full SVD, a QR), so adaptkit recomputes it exactly.
RESIDUAL_INITS = ("pissa", "olora")
# inits that leave the base as it is at load
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


def residual_factors(init: str, weight: torch.Tensor, conv1d: bool, rank: int, scale: float):
    """(B0, A0), [out, r] and [r, in], with ``scale * B0 @ A0`` what PEFT's ``init`` subtracts from
    ``weight`` ([out, in], float32) when it loads the adapter (``peft.tuners.lora.layer``).

    - ``pissa``: the top-``rank`` SVD of W: ``s B0 A0 = V_r S_r U_r^T`` (Meng et al., 2024);
    - ``olora``: the first ``rank`` columns/rows of the QR of the weight *as stored* (GPT-2's Conv1D
      stores [in, out]; PEFT factors that): ``s B0 A0 = s Q_r R_r`` (Büyükakyüz, 2024).
    """
    weight = weight.float()
    if init == "pissa":
        V, S, Uh = torch.linalg.svd(weight, full_matrices=False)
        return V[:, :rank] * (S[:rank] / scale), Uh[:rank]
    if init == "olora":
        Q, R = torch.linalg.qr(weight.T if conv1d else weight)
        Qr, Rr = Q[:, :rank], R[:rank]
        return (Rr.T.contiguous(), Qr.T.contiguous()) if conv1d else (Qr, Rr)
    raise InvalidArgumentError(f"init {init!r} has no base residual to recompute")


def check_saved_base_weights(adapter: LoraAdapter, base_tensor) -> None:
    """Raise unless each base tensor stored in the adapter equals the base's own (``base_tensor(module,
    param)``, None when the base lacks it): PEFT loads them *over* the base, so a different one would be
    a different base (another checkpoint, or a resized vocabulary)."""
    for module, params in adapter.base_weights.items():
        for param, stored in params.items():
            actual = base_tensor(module, param)
            if actual is None or tuple(actual.shape) != tuple(stored.shape):
                shape = None if actual is None else tuple(actual.shape)
                raise UnsupportedAdapterError(
                    f"{adapter.source or 'adapter'}: stores {module}.base_layer.{param} with shape {tuple(stored.shape)} "
                    f"but the base has {shape}: it was saved from a model with a resized vocabulary; resize this "
                    "base the same way and save it, then serve the adapter on that")
            diff = float((actual.detach().float().cpu() - stored.float()).abs().max())
            if diff > 0:
                raise UnsupportedAdapterError(
                    f"{adapter.source or 'adapter'}: stores {module}.base_layer.{param}, which PEFT loads over the base, "
                    f"and it differs from this base's (max difference {diff:.3g}): the adapter belongs to another "
                    "base checkpoint (or one with trained embeddings); serve it on the base it was saved from")


def fold_trained_biases(adapter: LoraAdapter, base_bias, module_state=None) -> LoraAdapter:
    """The adapter with its trained base biases (PEFT ``bias="all"``/``"lora_only"``) in forms that route
    per row: on a layer the LoRA adapts, ``lora_B_bias += (b_new - b) / s`` (so ``s * lora_B_bias`` adds
    the change); on any other layer a stored copy of the layer with the new bias (``modules_to_save``).

    ``base_bias(module)`` gives the base's bias; ``module_state(module)``, when given, the layer's whole
    state (an engine stores whole copies; a checkpoint merge replaces the bias tensor alone).
    """
    if not adapter.trained_biases:
        return adapter

    layers, saved = dict(adapter.layers), dict(adapter.saved_modules)
    for module, new in adapter.trained_biases.items():
        old = base_bias(module)
        if old is None or tuple(old.shape) != tuple(new.shape):
            raise UnsupportedAdapterError(
                f"{adapter.source or 'adapter'}: trained bias {module}.bias has shape {tuple(new.shape)} but the base's "
                f"is {None if old is None else tuple(old.shape)}; the adapter belongs to another base")
        if module in layers:
            w = layers[module]
            change = (new.float() - old.detach().float().cpu()) / w.scale
            bias = change if w.lora_B_bias is None else w.lora_B_bias.data.float() + change
            layers[module] = w.replaced(lora_B_bias=bias.to(w.lora_A.dtype))
        else:
            state = dict(module_state(module)) if module_state is not None else {}
            saved[module] = {**state, **saved.get(module, {}), "bias": new}
    return dataclasses.replace(adapter, layers=layers, saved_modules=saved, trained_biases={})


def fold_base_residual(adapter: LoraAdapter, weight_of) -> LoraAdapter:
    """The adapter with PEFT's load-time base change folded into its factors, as a plain LoRA.

    PEFT serves ``(W - s B0 A0) + s B A``; that is ``W + s [B, -B0] [A; A0]``: the same LoRA with
    rank ``2r`` on the unchanged base, so other rows (and other adapters) keep the original base.
    ``weight_of(module)`` gives the base weight ([out, in] float32) and whether it is a Conv1D.
    """
    if not adapter.needs_base_residual:
        return adapter
    init, layers = adapter.config.init_lora_weights, {}
    for name, w in adapter.layers.items():
        weight, conv1d = weight_of(name)
        B0, A0 = residual_factors(init, weight, conv1d, w.rank, w.scale)
        layers[name] = w.replaced(lora_A=torch.cat([w.lora_A.data.float(), A0]).to(w.lora_A.dtype),
                                  lora_B=torch.cat([w.lora_B.data.float(), -B0], dim=1).to(w.lora_B.dtype))

    return dataclasses.replace(adapter, layers=layers, residual_folded=True)


# ----------------------------------------------------------------------------- merging into weights
Contribution = tuple[LoraWeights, float]  # factors of one layer, weight of its delta


def merged_weight(weight: torch.Tensor, contributions: Sequence[Contribution]) -> torch.Tensor:
    """``W + sum_i w_i * s_i B_i A_i`` in float32, [out, in] (DoRA: the row-normalised form).

    DoRA (Liu et al., 2024): ``m * (W + sBA) / ||W + sBA||_row``; it is not linear in its
    delta, so a DoRA layer merges alone and with weight 1.
    """
    weight = weight.float()
    if any(w.magnitude is not None for w, _ in contributions):
        if len(contributions) != 1 or contributions[0][1] != 1.0:
            raise UnsupportedAdapterError("a DoRA adapter can only be merged alone and with weight 1 (it is not linear)")
        factors = contributions[0][0]
        direction = weight + factors.delta_weight().to(weight.device)
        norm = torch.linalg.norm(direction, dim=1, keepdim=True)
        return factors.magnitude.float().to(weight.device).view(-1, 1) * direction / norm
    out = weight.clone()
    for factors, w in contributions:
        out += w * factors.delta_weight().to(weight.device)
    return out


def merged_bias(bias: torch.Tensor, contributions: Sequence[Contribution]) -> torch.Tensor:
    """``b + sum_i w_i * s_i * bias_B_i`` (``lora_bias``) in float32."""
    out = bias.float().clone()
    for factors, w in contributions:
        if factors.lora_B_bias is not None:
            out += w * factors.scale * factors.lora_B_bias.float().to(out.device)
    return out


def check_merge_weights(adapters: Sequence, weights: Sequence[float] | None) -> list[float]:
    """Weights for ``adapters``: ones by default; finite, one per adapter, not all zero."""
    if weights is None:
        return [1.0] * len(adapters)
    weights = [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise InvalidArgumentError(f"got {len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise InvalidArgumentError(f"weights must be finite numbers, got {weights}")
    if all(w == 0 for w in weights):
        raise InvalidArgumentError("all merge weights are zero: the merge would change nothing")
    return weights
