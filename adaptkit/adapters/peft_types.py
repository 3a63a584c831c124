"""Weight-delta methods beyond LoRA that PEFT saves, served as LoRA-family layers.

Each method changes a linear layer ``y = W x + b`` by a weight delta ``dW`` (PEFT 0.21.2's formulas):

- AdaLoRA (Zhang et al., 2023): ``dW = B (A * E) * alpha / (ranknum + 1e-5)``: a plain LoRA
  (:func:`adalora_weights`), rides the batched path;
- VeRA (Kopiczko et al., 2024): ``dW = (l_b * B[:out]) (l_d * A[:, :in])`` with ``A``, ``B`` random
  projections shared by every layer: a plain LoRA once ``A`` is cut to the layer's width
  (:class:`VeraWeights`, cut when bound to the layer);
- LoHa (Hyeon-Woo et al., 2022): ``dW = (W1a W1b) * (W2a W2b) * alpha / r`` (Hadamard product):
  :class:`LohaWeights`;
- LoKr (Yeh et al., 2024): ``dW = kron(W1, W2) * alpha / r``, each factor full or ``a @ b``:
  :class:`LokrWeights`;
- (IA)^3 (Liu et al., 2022): a learned vector ``l`` scales the layer's input (``y = W (x * l) + b``,
  PEFT's ``feedforward_modules``) or its output (``y = (W x + b) * l``): :class:`IA3Weights`, whose
  delta ``W (l - 1)`` (and ``b (l - 1)``) depends on the base layer.

LoHa, LoKr and (IA)^3 weights have LoraWeights' interface where the engine and the merges use it
(``low_rank_output``, ``delta_weight``, ``lora_B_bias``, ``magnitude``, ``scale``, ``rank``, ``in_features``,
``out_features``) and ``exact_only = True``: they stay off the stacked batched path and are applied group
by group. They have no low-rank factors: ``lora_A`` is an empty tensor (it carries dtype and device) and
``lora_B`` raises, so code that needs factors (``scale=`` when adding, combining into a LoRA) refuses them
by name instead of computing something else.

Layers whose shape or delta comes from the base (VeRA's width, (IA)^3's scaled layer) have ``bind_base``:
``inject.LoraLinear.add`` calls it when the layer is attached. Their shapes are checked before that, and a
checkpoint merge attaches nothing, so :func:`bind_base_layers` binds a whole adapter first (to an engine's
layers, or to a checkpoint's tensors with :func:`layer_from_tensors`); an unbound (IA)^3 layer refuses, naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from adaptkit.adapters.lora import LoraAdapter, LoraWeights
from adaptkit.errors import AdapterMismatchError, UnsupportedAdapterError

# PEFT's peft_type -> what the update is, for messages
FORMULAS = {
    "ADALORA": "dW = B (A * E) * alpha / (ranknum + 1e-5)",
    "VERA": "dW = (lambda_b * B) (lambda_d * A), A and B shared random projections",
    "LOHA": "dW = (W1a W1b) * (W2a W2b) * alpha / r, a Hadamard product of two low-rank matrices",
    "LOKR": "dW = kron(W1, W2) * alpha / r, a Kronecker product",
    "IA3": "y = W (x * l) + b or (W x + b) * l, a learned vector scaling the layer",
}


class DeltaWeights(nn.Module):
    """Base of the weights of one layer for a method with no low-rank factors (LoHa, LoKr, (IA)^3).

    ``module_name`` names the layer in messages.
    """

    exact_only = True  # lora_stack.rides_batched_path keeps these on the exact per-group path
    magnitude = None  # no DoRA
    embedding = False  # linear layers only
    peft_type = ""

    def __init__(self, scale: float, module_name: str = ""):
        super().__init__()
        self.scale = float(scale)
        self.module_name = module_name

    def _anchor(self) -> torch.Tensor:
        return next(self.parameters())

    @property
    def lora_A(self) -> torch.Tensor:
        """Empty: these weights have no ``[r, in]`` factor; the tensor only carries dtype and device."""
        return self._anchor().new_empty(0, 0)

    @property
    def lora_B(self) -> torch.Tensor:
        raise UnsupportedAdapterError(
            f"{self.module_name or 'layer'}: a {self.peft_type} layer has no low-rank factors lora_A/lora_B "
            f"({FORMULAS[self.peft_type]}), so it cannot be rescaled (add_adapter scale=), combined into a LoRA or "
            "merged together with a full fine-tune; serve it as it is, or merge it with Engine.merge / merge_checkpoint")

    @property
    def lora_B_bias(self) -> torch.Tensor | None:
        return None

    def replaced(self, **changes):
        """LoraWeights' copy-with-changes: these weights have no factors to copy (``lora_B`` says why)."""
        return self.lora_B

    def extra_repr(self) -> str:
        return f"{self.module_name}: {self.out_features}x{self.in_features}, scale={self.scale:g}"


class LohaWeights(DeltaWeights):
    """LoHa: ``dW = s * (w1_a @ w1_b) * (w2_a @ w2_b)``; ``w*_a`` [out, r], ``w*_b`` [r, in].

    The Hadamard product of two rank-r matrices is the product of their face-splitting factors
    (rank ``r1 * r2``): ``dW = B' A'`` with ``B'[i, (p, q)] = w1_a[i, p] w2_a[i, q]`` and
    ``A'[(p, q), j] = w1_b[p, j] w2_b[q, j]``, so a forward costs ``r^2 (in + out)`` per token instead
    of forming ``dW`` (``out * in``).
    """

    peft_type = "LOHA"

    def __init__(self, w1_a: torch.Tensor, w1_b: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor,
                 scale: float, module_name: str = ""):
        super().__init__(scale, module_name)
        self.hada_w1_a = nn.Parameter(w1_a, requires_grad=False)
        self.hada_w1_b = nn.Parameter(w1_b, requires_grad=False)
        self.hada_w2_a = nn.Parameter(w2_a, requires_grad=False)
        self.hada_w2_b = nn.Parameter(w2_b, requires_grad=False)

    @property
    def rank(self) -> int:
        return self.hada_w1_b.shape[0]

    @property
    def in_features(self) -> int:
        return self.hada_w1_b.shape[1]

    @property
    def out_features(self) -> int:
        return self.hada_w1_a.shape[0]

    def _face_splitting(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(B' [out, r1*r2], A' [r1*r2, in]) with ``B' @ A' == (w1_a w1_b) * (w2_a w2_b)``."""
        w1_a, w1_b, w2_a, w2_b = (p.to(dtype) for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b))
        B = (w1_a[:, :, None] * w2_a[:, None, :]).reshape(w1_a.shape[0], -1)
        A = (w1_b[:, None, :] * w2_b[None, :, :]).reshape(-1, w1_b.shape[1])
        return B, A

    def low_rank_output(self, x: torch.Tensor) -> torch.Tensor:
        """``x dW^T``; x: [..., in] -> [..., out]."""
        B, A = self._face_splitting(x.dtype)
        return (x @ A.T) @ B.T * self.scale

    def delta_weight(self) -> torch.Tensor:
        """``s * (w1_a w1_b) * (w2_a w2_b)`` in float32, [out, in] (PEFT's ``make_weight``)."""
        w1 = self.hada_w1_a.float() @ self.hada_w1_b.float()
        w2 = self.hada_w2_a.float() @ self.hada_w2_b.float()
        return w1 * w2 * self.scale


class LokrWeights(DeltaWeights):
    """LoKr: ``dW = s * kron(w1, w2)``, w1 [a, b], w2 [c, d], out = a*c, in = b*d.

    Each factor is stored whole (``lokr_w1``) or as ``lokr_w1_a @ lokr_w1_b`` (PEFT decomposes it when
    r is small against its size). ``rank`` is the configured r (it sets ``s = alpha / r``).
    The forward never forms the Kronecker product: ``x`` viewed as [b, d] gives ``w1 (X w2^T)``.
    """

    peft_type = "LOKR"

    def __init__(self, w1: tuple[torch.Tensor, ...], w2: tuple[torch.Tensor, ...], scale: float, rank: int,
                 module_name: str = ""):
        super().__init__(scale, module_name)
        self.w1 = nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in w1])  # (w1,) or (w1_a, w1_b)
        self.w2 = nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in w2])
        self._rank = int(rank)

    @staticmethod
    def _whole(parts: nn.ParameterList, dtype: torch.dtype) -> torch.Tensor:
        return parts[0].to(dtype) if len(parts) == 1 else parts[0].to(dtype) @ parts[1].to(dtype)

    @staticmethod
    def _shape(parts: nn.ParameterList) -> tuple[int, int]:
        return parts[0].shape[0], parts[-1].shape[1]

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def in_features(self) -> int:
        return self._shape(self.w1)[1] * self._shape(self.w2)[1]

    @property
    def out_features(self) -> int:
        return self._shape(self.w1)[0] * self._shape(self.w2)[0]

    def low_rank_output(self, x: torch.Tensor) -> torch.Tensor:
        """``x kron(w1, w2)^T * s``; x: [..., in] -> [..., out]."""
        w1, w2 = self._whole(self.w1, x.dtype), self._whole(self.w2, x.dtype)
        (a, b), (c, d) = w1.shape, w2.shape
        z = x.reshape(-1, b, d) @ w2.T  # [N, b, c]
        return torch.matmul(w1, z).reshape(*x.shape[:-1], a * c) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """``kron(w1, w2) * s`` in float32, [out, in] (PEFT's ``make_kron``)."""
        return torch.kron(self._whole(self.w1, torch.float32), self._whole(self.w2, torch.float32)) * self.scale


def _base_linear(module: nn.Module, x: torch.Tensor, with_bias: bool) -> torch.Tensor:
    """``x W^T (+ b)`` of a base linear layer (nn.Linear, GPT-2's Conv1D [in, out], or a 4-bit layer)."""
    from adaptkit.inject import is_conv1d

    bias = getattr(module, "bias", None)
    if type(module) is nn.Linear:
        return nn.functional.linear(x, module.weight.to(x.dtype), bias.to(x.dtype) if with_bias and bias is not None
                                    else None)
    if is_conv1d(module):
        out = x @ module.weight.to(x.dtype)
        return out + bias.to(x.dtype) if with_bias and bias is not None else out
    out = module(x)  # a quantized layer computes itself
    return out - bias.to(out.dtype) if not with_bias and bias is not None else out


class IA3Weights(DeltaWeights):
    """(IA)^3: ``l`` scales the layer's input (``feedforward``: ``y = W (x * l) + b``) or its output
    (``y = (W x + b) * l``).

    As an additive delta on ``y = W x + b``: ``W ((l - 1) * x)``, or ``(l - 1) * (W x + b)``; merged,
    ``dW = W diag(l - 1)`` or ``diag(l - 1) W`` and, on the output side, a bias delta ``b (l - 1)``
    (``lora_B_bias``, with ``scale`` 1). Both need the base layer: :meth:`bind_base` keeps it (and gives
    the layer's other width, which the stored vector does not have). ``rank`` is reported as 1 (one
    vector per layer; (IA)^3 has no rank).
    """

    peft_type = "IA3"

    def __init__(self, ia3_l: torch.Tensor, feedforward: bool, module_name: str = ""):
        super().__init__(1.0, module_name)
        self.ia3_l = nn.Parameter(ia3_l.reshape(-1), requires_grad=False)  # [in] (feedforward) or [out]
        self.feedforward = bool(feedforward)
        object.__setattr__(self, "_base_layer", None)  # a plain attribute: not a submodule of these weights

    def bind_base(self, module: nn.Module) -> None:
        """Use ``module`` (the plain base layer this vector scales) for shapes, outputs and merges."""
        from adaptkit.inject import linear_shape

        shape = linear_shape(module)
        if shape is None or isinstance(module, nn.Embedding):
            raise AdapterMismatchError(f"{self.module_name}: (IA)^3 scales linear layers; the base has a "
                                       f"{type(module).__name__} there")
        width = shape[1] if self.feedforward else shape[0]
        if width != self.ia3_l.numel():
            side = "input" if self.feedforward else "output"
            raise AdapterMismatchError(
                f"{self.module_name}: the (IA)^3 vector scales {self.ia3_l.numel()} {side} features but the base layer "
                f"has {width}; the adapter was made for a base of another size")
        object.__setattr__(self, "_base_layer", module)

    @property
    def bound(self) -> bool:
        return self._base_layer is not None

    def _base(self) -> nn.Module:
        if self._base_layer is None:
            raise UnsupportedAdapterError(
                f"{self.module_name}: this (IA)^3 layer is not bound to its base layer: (IA)^3 scales the base layer, "
                "so the layer's other width and the update come from it. Bind the adapter to the base before it is "
                "checked, added or merged: adaptkit.adapters.peft_types.bind_base_layers(adapter, layer_of), with "
                "layer_of(name) the base's layer (e.g. adaptkit.inject.base_modules(engine.model).get), then add or "
                "merge the adapter object it returns")
        return self._base_layer

    @property
    def rank(self) -> int:
        return 1

    @property
    def in_features(self) -> int:
        from adaptkit.inject import linear_shape

        return self.ia3_l.numel() if self.feedforward else linear_shape(self._base())[1]

    @property
    def out_features(self) -> int:
        from adaptkit.inject import linear_shape

        return linear_shape(self._base())[0] if self.feedforward else self.ia3_l.numel()

    def low_rank_output(self, x: torch.Tensor) -> torch.Tensor:
        """What the vector adds to the base output: ``W ((l - 1) x)`` or ``(l - 1) (W x + b)``."""
        base = self._base()
        l_minus_1 = self.ia3_l.to(x.dtype) - 1
        if self.feedforward:
            return _base_linear(base, x * l_minus_1, with_bias=False)
        return _base_linear(base, x, with_bias=True) * l_minus_1

    def delta_weight(self) -> torch.Tensor:
        """``W diag(l - 1)`` (input side) or ``diag(l - 1) W`` (output side), float32 [out, in]."""
        from adaptkit.inject import weight_out_in

        weight = weight_out_in(self._base())
        l_minus_1 = self.ia3_l.float().to(weight.device) - 1
        return weight * (l_minus_1[None, :] if self.feedforward else l_minus_1[:, None])

    @property
    def lora_B_bias(self) -> torch.Tensor | None:
        """``b (l - 1)`` where the vector scales the output of a layer with a bias (added with ``scale`` 1)."""
        if self.feedforward:
            return None
        bias = getattr(self._base(), "bias", None)
        return None if bias is None else bias.detach().float() * (self.ia3_l.float().to(bias.device) - 1)

    def bound_copy(self, module: nn.Module) -> IA3Weights:
        """New weights sharing this vector, bound to ``module``."""
        copy = IA3Weights(self.ia3_l.data, self.feedforward, self.module_name)
        copy.bind_base(module)
        return copy

    def extra_repr(self) -> str:
        side = "input" if self.feedforward else "output"
        return f"{self.module_name}: scales the {side} ({self.ia3_l.numel()} features)"


class VeraWeights(LoraWeights):
    """VeRA as LoRA factors: ``lora_A = lambda_d * A`` [r, width of the shared projection],
    ``lora_B = lambda_b * B[:out]`` [out, r], scale 1.

    PEFT's shared ``A`` is as wide as the widest layer it adapts and each layer uses its first ``in``
    columns; the file does not say which layers are narrower, so :meth:`bind_base` cuts ``lora_A`` to the
    layer's width (before the engine stacks the factors: then it is a plain LoRA on the batched path).
    """

    def bind_base(self, module: nn.Module) -> None:
        from adaptkit.inject import linear_shape

        shape = linear_shape(module)
        width = None if shape is None else shape[1]
        if width is None or width > self.lora_A.shape[1]:
            raise AdapterMismatchError(
                f"VeRA projection vera_A has {self.lora_A.shape[1]} columns but the base layer takes {width} input "
                "features; the adapter was made for a base of another size")
        if width < self.lora_A.shape[1]:
            self.lora_A = nn.Parameter(self.lora_A.data[:, :width].contiguous(), requires_grad=False)
        self._bound = True

    @property
    def bound(self) -> bool:
        """True once cut to a base layer's width (until then ``in_features`` is the projection's width)."""
        return getattr(self, "_bound", False)

    def bound_copy(self, module: nn.Module) -> LoraWeights:
        """The plain LoRA factors of this layer of ``module``'s width (no binding left to do)."""
        copy = VeraWeights(self.lora_A.data, self.lora_B.data, self.scale)
        copy.bind_base(module)
        return LoraWeights(copy.lora_A.data, copy.lora_B.data, copy.scale)


def adalora_weights(lora_A: torch.Tensor, lora_B: torch.Tensor, lora_E: torch.Tensor, scaling: float,
                    ranknum: float) -> LoraWeights:
    """AdaLoRA as plain LoRA factors: ``A' = A * E``, ``B' = B``, ``s = scaling / (ranknum + 1e-5)``.

    PEFT adds ``(x (A * E)^T B^T) * scaling / (ranknum + 1e-5)`` with ``ranknum`` a float32 tensor
    (the initial rank; pruning keeps it) and ``scaling`` = ``lora_alpha`` (the rank when alpha <= 0).
    """
    denominator = torch.tensor(float(ranknum), dtype=torch.float32) + 1e-5
    scale = float(torch.tensor(float(scaling), dtype=torch.float32) / denominator)
    return LoraWeights((lora_A.float() * lora_E.float()).contiguous(), lora_B.float().contiguous(), scale)


def vera_weights(vera_A: torch.Tensor, vera_B: torch.Tensor, lambda_b: torch.Tensor,
                 lambda_d: torch.Tensor) -> VeraWeights:
    """One VeRA layer as LoRA factors (PEFT's ``(lambda_b * B[:out]) @ (lambda_d * A[:, :in])``)."""
    out = lambda_b.numel()
    A = lambda_d.float().reshape(-1, 1) * vera_A.float()
    B = lambda_b.float().reshape(-1, 1) * vera_B[:out].float()
    return VeraWeights(A.contiguous(), B.contiguous(), 1.0)


# ----------------------------------------------------------------------------- binding to a base
def needs_base_layers(adapter: LoraAdapter) -> bool:
    """True when some layer's shape or update comes from the base layer ((IA)^3, VeRA) and is not bound yet."""
    return any(hasattr(w, "bind_base") and not getattr(w, "bound", False) for w in adapter.layers.values())


def bind_base_layers(adapter: LoraAdapter, layer_of: Callable[[str], nn.Module | None]) -> LoraAdapter:
    """A copy of ``adapter`` whose base-dependent layers are bound to the base: VeRA layers become plain LoRA
    factors cut to their layer's width, (IA)^3 layers keep their base layer. Other layers are shared.

    ``layer_of(name)`` returns the plain base layer (``nn.Linear``, GPT-2 ``Conv1D``, a 4-bit linear, or
    :func:`layer_from_tensors` of a checkpoint's tensors), or None where the base has no such module. The
    adapter given is not changed, so one adapter object can be bound to several bases.
    """
    layers = {}
    for name, weights in adapter.layers.items():
        if hasattr(weights, "bound_copy"):
            module = layer_of(name)
            if module is None:
                raise AdapterMismatchError(f"{adapter.source or 'adapter'}: module {name!r} does not exist in the base; "
                                           "the adapter was made for another architecture")
            weights = weights.bound_copy(module)
        layers[name] = weights
    return dataclasses.replace(adapter, layers=layers)


def layer_from_tensors(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` [out, in] and ``bias`` (not copied): a base layer to bind to where
    there is no model, only its tensors (a checkpoint being merged)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer
