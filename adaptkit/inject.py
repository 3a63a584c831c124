"""The one place modules are swapped into a model, and the routed layers that get swapped in.

- :class:`LoraLinear` wraps a ``Linear``/GPT-2 ``Conv1D`` (or a 4-bit linear): the base matmul runs
  once for the whole batch, then each adapter group adds its low-rank part to its own rows.
- :class:`ParamLoraModule` wraps a module whose parameters some LoRAs adapt (PEFT's ``target_parameters``:
  fused MoE experts, routers): each row group runs the module with ``W + delta`` of its adapters.
- :class:`SwitchedModule` wraps a module that some adapters replace wholesale (PEFT's
  ``modules_to_save``): rows of those adapters are recomputed with the stored copy.

All read the :class:`~adaptkit.routing.RoutingPlan` of the forward in progress.
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

from adaptkit.adapters.lora import LoraWeights
from adaptkit.errors import EngineStateError
from adaptkit.lora_stack import LayerStacks, rides_batched_path, siblings_of
from adaptkit.routing import AdapterGroup, RowsNotSeparable, current_plan


class ModuleWrapper(nn.Module):
    """Base of every adaptkit module that stands where a base module was; the original is ``self.base``.

    Names below a wrapper stay the base model's names (``transformer.h.0.mlp.c_fc`` under a wrapped
    ``mlp``): :func:`locate` and :func:`swap_module` look through wrappers.
    """

    base: nn.Module


# model -> {name: what locate() found}; only swap_module changes what sits where, and it clears this
_LOCATED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def locate(model: nn.Module, name: str) -> nn.Module:
    """The module at the base-model name ``name`` (the outermost wrapper there, if any)."""
    found = _LOCATED.setdefault(model, {})
    module = found.get(name)
    if module is None:
        module = model
        for part in name.split(".") if name else ():
            while isinstance(module, ModuleWrapper):
                module = module.base
            module = module.get_submodule(part)
        found[name] = module
    return module


def swap_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the base-model name ``name`` inside ``model``; return the module it replaces."""
    parent_name, _, child = name.rpartition(".")
    parent = locate(model, parent_name)
    while isinstance(parent, ModuleWrapper):
        parent = parent.base
    old = getattr(parent, child)
    setattr(parent, child, new)
    _LOCATED.pop(model, None)
    return old


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer whose weight is stored [in, out]."""
    return type(module).__name__ == "Conv1D"


def stored_transposed(module: nn.Module) -> bool:
    """True where the weight is stored [in, out]: GPT-2's Conv1D, and an embedding table [vocab, dim]
    (a linear map from one-hot tokens to ``dim`` features: in = vocab, out = dim)."""
    return is_conv1d(module) or isinstance(module, nn.Embedding)


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out_features, in_features) of a linear-like module, None for anything else."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if is_conv1d(module):
        return module.nf, module.weight.shape[0]
    if isinstance(module, nn.Embedding):
        return module.embedding_dim, module.num_embeddings
    if hasattr(module, "out_features") and hasattr(module, "in_features") and hasattr(module, "weight"):
        return module.out_features, module.in_features  # bitsandbytes Linear4bit and friends
    return None


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The base weight as [out, in] in float32 (dequantized for 4-bit layers)."""
    from adaptkit import quant

    if quant.is_quantized(module):  # before nn.Linear: bitsandbytes' Linear4bit subclasses it
        return quant.dequantize_weight(module)
    if stored_transposed(module):
        return module.weight.detach().float().T
    return module.weight.detach().float()


def _scatter_rows(y: torch.Tensor, group: AdapterGroup, delta: torch.Tensor) -> torch.Tensor:
    """y + delta on the group's rows (delta already has only those rows)."""
    if group.row_weights is not None:  # [n, 1, 1] -> [n, 1, ..., 1] to fit 2-D inputs too (BERT's pooler)
        delta = delta * group.row_weights.to(delta.dtype).view(-1, *([1] * (delta.ndim - 1)))
    if group.rows is None:
        return y + delta
    return y.index_add(0, group.rows, delta)


class LoraLinear(ModuleWrapper):
    """A linear layer with any number of named LoRAs, each applied to its own batch rows.

    ``y = base(x)`` for every row, then each row adds its adapters' ``w * s * (x A^T) B^T``. Plain
    frozen LoRAs ride the batched path (``lora_stack.py``: stacked factors, cost independent of the
    number of distinct adapters in the batch); DoRA (the row-normalised form, see adapters/lora.py),
    ``lora_bias`` and trainable factors are applied group by group, exactly.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.lora = nn.ModuleDict()
        self.dora_scale: dict[str, torch.Tensor] = {}  # name -> magnitude / ||W + sBA||_row, [out]
        out_features, in_features = linear_shape(base)
        self.stacks = LayerStacks(in_features, out_features)
        self.exact: list[str] = []  # adapters on the per-group path

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def add(self, name: str, weights: LoraWeights) -> None:
        if hasattr(weights, "bind_base"):  # weights whose delta is a function of the base layer (IA3)
            weights.bind_base(innermost(self.base))
        if weights.magnitude is not None:
            merged = weight_out_in(self.base).to(weights.lora_A.device) + weights.delta_weight()
            self.dora_scale[name] = weights.magnitude.float() / torch.linalg.norm(merged, dim=1)
        if rides_batched_path(weights):
            self.stacks.add(name, weights)
        else:
            self.exact.append(name)
        self.lora[name] = weights  # last: a failed add leaves nothing for the rollback to find

    def remove(self, name: str) -> None:
        del self.lora[name]
        self.dora_scale.pop(name, None)
        if name in self.stacks:
            self.stacks.remove(name)
        else:
            self.exact.remove(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        plan = current_plan()
        if plan is None or not self.lora:
            return y
        if x.shape[0] != plan.batch_size:
            if plan.one_row is not None:  # every row alike: the adapters apply to the input whatever it is
                return self._routed(x.reshape(1, -1, x.shape[-1]), y.reshape(1, -1, y.shape[-1]),
                                    plan.one_row).reshape(y.shape)
            if x.shape[0] % plan.batch_size:  # not rows (DeBERTa's relative embeddings): rows run apart
                raise RowsNotSeparable(f"{x.shape[0]} input rows for a batch of {plan.batch_size}")
            shape = y.shape  # OPT flattens [B, S, H] to [B*S, H] around its MLP
            return self._routed(x.reshape(plan.batch_size, -1, x.shape[-1]),
                                y.reshape(plan.batch_size, -1, y.shape[-1]), plan).reshape(shape)
        return self._routed(x, y, plan)

    def _routed(self, x: torch.Tensor, y: torch.Tensor, plan) -> torch.Tensor:
        """``y`` plus every row's adapters; dim 0 of ``x`` and ``y`` is the batch."""
        if self.stacks.buckets:
            y = self.stacks.apply(y, x, plan)
        for name in self.exact:
            group = plan.groups.get(name)
            if group is None:
                continue
            weights = self.lora[name]
            x_rows = x if group.rows is None else x.index_select(0, group.rows)
            delta = weights.low_rank_output(x_rows)
            if name in self.dora_scale:
                delta = self._dora_delta(name, y, group, delta)
            y = _scatter_rows(y, group, delta.to(y.dtype))
        return y

    def _dora_delta(self, name: str, y: torch.Tensor, group: AdapterGroup, low_rank: torch.Tensor) -> torch.Tensor:
        """DoRA as an additive term: ``(m/n - 1) * (y - b) + m/n * lora`` (PEFT's unmerged form)."""
        if group.row_weights is not None:
            raise EngineStateError(f"DoRA adapter {name!r} cannot be weighted inside ak.Mix (DoRA is not linear)")
        y_rows = y if group.rows is None else y.index_select(0, group.rows)
        bias = self.base.bias
        y_no_bias = y_rows if bias is None else y_rows - bias.to(y.dtype)
        scale = self.dora_scale[name].to(y.dtype)
        return (scale - 1) * y_no_bias + scale * low_rank.to(y.dtype)


class LoraEmbedding(ModuleWrapper):
    """An embedding table with named LoRAs (PEFT's ``lora_embedding_A/B``), each on its own batch rows.

    ``y = E[x]`` for every row, then a row's adapter adds ``s * A^T[x] B^T`` (times the layer's own
    ``embed_scale``, as Gemma's scaled embeddings apply it to the table). Exact, group by group.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.lora = nn.ModuleDict()

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def add(self, name: str, weights: LoraWeights) -> None:
        if hasattr(weights, "bind_base"):
            weights.bind_base(innermost(self.base))
        self.lora[name] = weights

    def remove(self, name: str) -> None:
        del self.lora[name]

    def forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base(ids, *args, **kwargs)
        plan = current_plan()
        if plan is None or not self.lora:
            return y
        scale = getattr(innermost(self.base), "embed_scale", None)
        for name, weights in self.lora.items():
            group = plan.groups.get(name)
            if group is None:
                continue
            rows = ids if group.rows is None else ids.index_select(0, group.rows)
            delta = weights.embedding_output(rows)
            if scale is not None:
                delta = delta * scale.to(delta.dtype)
            y = _scatter_rows(y, group, delta.to(y.dtype))
        return y


class ParamLoraModule(ModuleWrapper):
    """A module some of whose parameters LoRAs adapt (PEFT's ``target_parameters``: fused MoE experts, a
    router's weight), each adapter on its own rows.

    The update does not add to the module's output (it feeds top-k routing or an activation), so rows run
    the module with ``W + delta`` of their own adapters (``torch.func.functional_call``: the module itself is
    untouched): the whole batch at once when every row has the same adapters, else each group of rows on its
    own tokens. The module's tensor inputs lead with the batch's rows [B, ...] or its tokens flattened row
    by row [B*S, ...], as an MoE block flattens them for its router and experts.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.lora = nn.ModuleDict()  # adapter -> {parameter name: ParamLora}

    def add(self, name: str, param_name: str, lora: nn.Module) -> None:
        if name not in self.lora:
            self.lora[name] = nn.ModuleDict()
        self.lora[name][param_name] = lora

    def remove(self, name: str) -> None:
        del self.lora[name]

    def forward(self, *args, **kwargs):
        plan = current_plan()
        if plan is None or not any(name in plan.groups for name in self.lora):
            return self.base(*args, **kwargs)
        rows_of: dict[tuple, list[int]] = {}
        for row, key in enumerate(self._row_keys(plan)):
            rows_of.setdefault(key, []).append(row)
        if len(rows_of) == 1:
            return self._run(next(iter(rows_of)), args, kwargs)
        first = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        tokens = first.shape[0]
        if tokens % plan.batch_size:
            raise EngineStateError(f"{type(self.base).__name__}: inputs of {tokens} rows are neither the batch's "
                                   f"{plan.batch_size} rows nor its tokens; run these adapters in separate batches")
        per_row = tokens // plan.batch_size
        groups, parts = [], []
        for key, rows in rows_of.items():
            rows = torch.tensor(rows, device=first.device)
            index = _row_positions(rows, per_row)

            def pick(value, index=index):
                if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == tokens:
                    return value.index_select(0, index)
                return value

            groups.append(rows)
            parts.append(self._run(key, [pick(a) for a in args], {k: pick(v) for k, v in kwargs.items()}))
        return _stitch(parts, groups, plan.batch_size)

    def _row_keys(self, plan) -> list[tuple]:
        """Per row: the (adapter, weight) pairs of this module's adapters that the row uses."""
        keys = [[] for _ in range(plan.batch_size)]
        for name in self.lora:
            group = plan.groups.get(name)
            if group is None:
                continue
            rows = range(plan.batch_size) if group.rows is None else group.rows.tolist()
            weights = [1.0] * len(rows) if group.row_weights is None else group.row_weights.flatten().tolist()
            for row, weight in zip(rows, weights):
                keys[row].append((name, weight))
        return [tuple(k) for k in keys]

    def _run(self, key: tuple, args, kwargs):
        if not key:
            return self.base(*args, **kwargs)
        params = {}
        for name, weight in key:
            for param_name, lora in self.lora[name].items():
                current = params.get(param_name, self.base.get_parameter(param_name))
                params[param_name] = current + (lora.delta() * weight).to(current.dtype)
        return torch.func.functional_call(self.base, params, tuple(args), kwargs)


def _row_positions(rows: torch.Tensor, per_row: int) -> torch.Tensor:
    """Positions along a dim that holds ``per_row`` entries for each batch row, of ``rows``' entries."""
    return (rows[:, None] * per_row + torch.arange(per_row, device=rows.device)).flatten()


def _stitch(parts: list, groups: list[torch.Tensor], batch: int):
    """Row groups' outputs put back in batch order (tensors, or tuples/lists of them). An output holds the
    same number of entries per row in every group (a router that flattens [B, S, H] returns B*S)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        per_row = first.shape[0] // len(groups[0]) if first.ndim else 0
        if not per_row or any(p.shape[0] != per_row * len(g) for p, g in zip(parts, groups)):
            return first  # not per row (a scalar loss): the first group's stands
        whole = first.new_empty((batch * per_row, *first.shape[1:]))
        for rows, part in zip(groups, parts):
            whole.index_copy_(0, _row_positions(rows, per_row), part)
        return whole
    if isinstance(first, (tuple, list)):
        return type(first)(_stitch([p[i] for p in parts], groups, batch) for i in range(len(first)))
    return first


class SwitchedModule(ModuleWrapper):
    """A module that some adapters replace by their own stored copy (``modules_to_save``)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.replacements = nn.ModuleDict()

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def add(self, name: str, state_dict: dict[str, torch.Tensor]) -> None:
        replacement = plain_copy(self.base)  # without other adapters' wrappers (a LoRA inside this module)
        replacement.load_state_dict(state_dict, strict=True)
        replacement.requires_grad_(False)
        self.replacements[name] = replacement

    def remove(self, name: str) -> None:
        del self.replacements[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)
        plan = current_plan()
        if plan is None or not self.replacements:
            return y
        if x.shape[0] != plan.batch_size and not args and not kwargs:  # OPT's flattened [B*S, H]
            shape = y.shape
            batched = self.forward_rows(x.reshape(plan.batch_size, -1, x.shape[-1]),
                                        y.reshape(plan.batch_size, -1, y.shape[-1]), plan)
            return batched.reshape(shape)
        return self.forward_rows(x, y, plan, *args, **kwargs)

    def forward_rows(self, x: torch.Tensor, y: torch.Tensor, plan, *args, **kwargs) -> torch.Tensor:
        """``y`` with each replaced row's output from its adapter's copy; dim 0 is the batch."""
        for name, group in plan.groups.items():
            if name not in self.replacements:
                continue
            if group.row_weights is not None:
                raise EngineStateError(
                    f"adapter {name!r} replaces whole modules (modules_to_save) and cannot be weighted in ak.Mix"
                )
            replacement = self.replacements[name]
            if group.rows is None:
                return replacement(x, *args, **kwargs)
            y = y.index_copy(0, group.rows, replacement(x.index_select(0, group.rows), *args, **kwargs))
        return y


WRAPPERS = (ModuleWrapper,)


def innermost(module: nn.Module) -> nn.Module:
    """The base module under any wrappers."""
    while isinstance(module, ModuleWrapper):
        module = module.base
    return module


def plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every adaptkit wrapper in it replaced by the module it wraps."""
    copied = copy.deepcopy(innermost(module))
    for parent in list(copied.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, ModuleWrapper):
                setattr(parent, child_name, innermost(child))
    return copied


def plain_named_parameters(module: nn.Module, prefix: str = ""):
    """``named_parameters`` of the module as the base has it, looking through adaptkit's wrappers inside it."""
    module = innermost(module)
    for name, param in module.named_parameters(recurse=False):
        yield prefix + name, param
    for name, child in module.named_children():
        yield from plain_named_parameters(child, f"{prefix}{name}.")


def wrappers_at(model: nn.Module, name: str) -> list[ModuleWrapper]:
    """The wrappers standing at ``name``, outermost first (a stored copy around a LoRA layer: two)."""
    chain, module = [], locate(model, name)
    while isinstance(module, ModuleWrapper):
        chain.append(module)
        module = module.base
    return chain


def wrapper_at(model: nn.Module, name: str, wrapper_cls: type[nn.Module]) -> nn.Module | None:
    """The wrapper of type ``wrapper_cls`` at ``name``, or None."""
    return next((w for w in wrappers_at(model, name) if isinstance(w, wrapper_cls)), None)


def base_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of the base model by its original name, looking through adaptkit's wrappers
    (nested ones too: a LoRA layer inside a wrapped MLP)."""
    found: dict[str, nn.Module] = {}

    def visit(module: nn.Module, name: str) -> None:
        while isinstance(module, ModuleWrapper):
            module = module.base
        found[name] = module
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    return found


def wrap_once(model: nn.Module, name: str, wrapper_cls: type[nn.Module]) -> nn.Module:
    """The wrapper of type ``wrapper_cls`` at ``name``, swapping one in on first use.

    A stored copy (:class:`SwitchedModule`) always stands outermost: it replaces the whole module for
    its rows, while the other rows run what is inside it (the base, with any LoRA layer).
    """
    existing = wrapper_at(model, name, wrapper_cls)
    if existing is not None:
        return existing
    module = locate(model, name)
    if isinstance(module, SwitchedModule):
        wrapper = wrapper_cls(module.base)
        module.base = wrapper
        return wrapper
    wrapper = wrapper_cls(module)
    swap_module(model, name, wrapper)
    return wrapper


def _is_empty(wrapper: nn.Module) -> bool:
    return (isinstance(wrapper, (LoraLinear, LoraEmbedding, ParamLoraModule)) and not wrapper.lora) or (
        isinstance(wrapper, SwitchedModule) and not wrapper.replacements)


def unwrap_if_empty(model: nn.Module, name: str) -> None:
    """Take out the wrappers at ``name`` that hold no adapter any more."""
    chain = wrappers_at(model, name)
    for outer, inner in reversed(list(zip(chain, chain[1:]))):  # inner ones first: the outer keeps its place
        if _is_empty(inner):
            outer.base = inner.base
    if chain and _is_empty(chain[0]):
        swap_module(model, name, chain[0].base)


def check_lora_fits(modules: dict[str, nn.Module], adapter, where: str = "the base") -> None:
    """Raise :class:`AdapterMismatchError` unless every LoRA target exists with the right shapes.

    ``modules`` is :func:`base_modules` of a model (a meta-device model will do).
    """
    from adaptkit.errors import AdapterMismatchError

    source = adapter.source or "adapter"
    if not any(adapter.config.targets(name) for name in modules) and adapter.layers:
        targets = adapter.config.target_modules
        raise AdapterMismatchError(
            f"{source}: target_modules {targets!r} match no module of {where}; "
            "the adapter was made for another architecture, or the targets are misspelt"
        )
    for name, weights in adapter.layers.items():
        module = modules.get(name)
        if module is None:
            raise AdapterMismatchError(
                f"{source}: module {name!r} does not exist in {where}; the adapter was made for another architecture"
            )
        if getattr(weights, "indices", None) is not None:  # TokenRows: new rows of a [vocab, dim] table or head
            table = getattr(module, "weight", None)
            if table is None or table.ndim != 2 or table.shape[1] != weights.values.shape[1] or \
                    int(weights.indices.max()) >= table.shape[0]:
                raise AdapterMismatchError(f"{source}: {name}: trainable token rows [{weights.rank}, "
                                           f"{weights.values.shape[1]}] (ids up to {int(weights.indices.max())}) do "
                                           f"not fit its table {None if table is None else tuple(table.shape)}")
            continue
        shape = linear_shape(module)
        if shape is None:
            raise AdapterMismatchError(f"{source}: {name} is a {type(module).__name__}, not a linear layer")
        if (weights.out_features, weights.in_features) != shape:
            raise AdapterMismatchError(
                f"{source}: {name}: LoRA maps {weights.in_features} -> {weights.out_features} features but the "
                f"base layer maps {shape[1]} -> {shape[0]}; the adapter was made for a base of another size"
            )
    check_saved_fits(modules, adapter.saved_modules, source, where)


def check_saved_fits(modules: dict[str, nn.Module], saved: dict, source: str, where: str = "the base") -> None:
    """Raise :class:`AdapterMismatchError` unless every stored module (``modules_to_save``) matches the base's."""
    from adaptkit.errors import AdapterMismatchError

    for name, params in saved.items():
        module = modules.get(name)
        if module is None:
            raise AdapterMismatchError(f"{source}: modules_to_save entry {name!r} does not exist in {where}")
        own = dict(plain_named_parameters(module))
        for param, tensor in params.items():
            if param not in own or tuple(own[param].shape) != tuple(tensor.shape):
                got = tuple(own[param].shape) if param in own else "missing"
                raise AdapterMismatchError(
                    f"{source}: modules_to_save {name}.{param}: adapter has {tuple(tensor.shape)}, base has {got}"
                )


def attach_lora(model: nn.Module, name: str, adapter, dtype: torch.dtype, device: torch.device) -> None:
    """Wrap the adapter's target layers (once) and register its factors under ``name``."""
    from adaptkit.adapters.lora import check_saved_base_weights

    modules = base_modules(model)
    check_lora_fits(modules, adapter)
    check_saved_base_weights(adapter, lambda module, param: getattr(modules.get(module), param, None))
    for module_name, weights in adapter.layers.items():
        first = next(weights.parameters())
        if first.dtype != dtype or first.device != torch.device(device):
            weights = weights.to(device=device, dtype=dtype)
        if weights.magnitude is not None:
            weights.magnitude.data = weights.magnitude.data.float()
        layer_type = LoraEmbedding if isinstance(modules[module_name], nn.Embedding) else LoraLinear
        wrapper = wrap_once(model, module_name, layer_type)
        wrapper.add(name, weights)
        if layer_type is LoraLinear and wrapper.stacks.siblings is None and module_name in siblings_of(model):
            siblings_of(model)[module_name].join(wrapper.stacks)
    for key, lora in adapter.parameter_layers.items():
        owner, _, param_name = key.rpartition(".")
        wrap_once(model, owner, ParamLoraModule).add(name, param_name, lora.to(device=device, dtype=dtype))
    attach_saved(model, name, adapter.saved_modules)


def attach_saved(model: nn.Module, name: str, saved: dict) -> None:
    """Register the adapter's stored modules (``modules_to_save``): its rows run these copies."""
    for module_name, state in saved.items():
        wrap_once(model, module_name, SwitchedModule).add(name, state)


def find(model: nn.Module, name: str) -> nn.Module | None:
    """:func:`locate`, or None where the model has no such module (an adapter made for another base)."""
    try:
        return locate(model, name)
    except AttributeError:
        return None


def detach_lora(model: nn.Module, name: str, adapter) -> None:
    """Remove the adapter ``name`` from every wrapper; unwrap wrappers left empty. Also the rollback of a
    failed attach, so names the model lacks are skipped."""
    owners = {key.rpartition(".")[0] for key in adapter.parameter_layers}
    for module_name in [*adapter.layers, *owners]:
        module = find(model, module_name) and wrapper_at(model, module_name, (LoraLinear, LoraEmbedding, ParamLoraModule))
        if module is not None and name in module.lora:
            module.remove(name)
            unwrap_if_empty(model, module_name)
    detach_saved(model, name, adapter.saved_modules)


def detach_saved(model: nn.Module, name: str, saved: dict) -> None:
    """Remove the adapter's stored modules; unwrap what is left empty (names the model lacks are skipped)."""
    for module_name in saved:
        module = find(model, module_name) and wrapper_at(model, module_name, SwitchedModule)
        if module is not None and name in module.replacements:
            module.remove(name)
            unwrap_if_empty(model, module_name)
