"""Bottleneck sites: the wrapped sub-blocks where bottleneck adapters and fusion layers act per row.

A site is AdapterHub's place for an adapter: ``mh`` after attention, ``output`` after the FFN of
block i (``arch.adapter_site``). Three wrappers, swapped in by ``inject.swap_module``:

- :class:`PostLnSite` (BERT): stands where ``BertSelfOutput``/``BertOutput`` was. That module gets
  ``(hidden, r)`` and computes ``LN(dropout(dense(hidden)) + r)``; the wrapper computes ``h`` the
  same way, then each row group's site output from ``h``, ``r`` and the module's own LayerNorm.
- :class:`PreLnSite` (GPT-2, Llama): stands where the attention or MLP module was. Its output is
  ``h``; the block then adds the residual ``r`` itself, so the wrapper returns the site output
  minus ``r`` (``a`` exactly for the usual ``original_ln_after`` adapters).
- :class:`ResidualRecorder`: stands where the pre-LN norm before that sub-block was. Its input is
  ``r``; it files it in the routing plan's cache (per forward, so concurrent forwards do not mix)
  for the :class:`PreLnSite` that runs next in the same block.

Rows are grouped by their entry once per plan; rows whose entry has no adapter here keep the
base output untouched.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from adaptkit import inject
from adaptkit.adapters import compose
from adaptkit.adapters.bottleneck import BottleneckAdapter, SiteKey
from adaptkit.adapters.fusion import FusionAdapter
from adaptkit.arch import adapter_site, decoder_layers
from adaptkit.errors import AdapterMismatchError, EngineStateError
from adaptkit.measured import facts_of
from adaptkit.routing import RoutingPlan, current_plan

_ROWS_KEY = "bottleneck.rows"  # plan.cache: [(entry, row index or None)] for every entry of the batch


def entry_rows(plan: RoutingPlan, device: torch.device) -> list[tuple[object, torch.Tensor | None]]:
    """Rows grouped by their entry (None for every row), built once per plan."""
    groups = plan.cache.get(_ROWS_KEY)
    if groups is None:
        rows_of: dict[object, list[int]] = {}
        for row, entry in enumerate(plan.entries):
            if entry is not None:
                rows_of.setdefault(entry, []).append(row)
        groups = [
            (entry, None if len(rows) == plan.batch_size else torch.tensor(rows, dtype=torch.long, device=device))
            for entry, rows in rows_of.items()
        ]
        plan.cache[_ROWS_KEY] = groups
    return groups


class BottleneckSite(inject.ModuleWrapper):
    """The adapters (``layers``) and fusion layers (``fusions``) at one site, applied per row group."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.layers = nn.ModuleDict()  # adapter name -> BottleneckLayer
        self.fusions = nn.ModuleDict()  # fusion name -> FusionLayer
        self.fused: dict[str, tuple[str, ...]] = {}  # fusion name -> the adapter names it fuses

    @property
    def empty(self) -> bool:
        return not self.layers and not self.fusions

    def active(self, plan: RoutingPlan | None) -> bool:
        return plan is not None and not self.empty

    def route(self, plan: RoutingPlan, h: torch.Tensor, r: torch.Tensor, ln: nn.Module | None,
              model_adds_residual: bool, base_out: torch.Tensor) -> torch.Tensor:
        """``base_out`` with the rows of every entry acting here replaced by that entry's site output."""
        out = base_out
        fusions = {self.fused[name]: layer for name, layer in self.fusions.items()}
        for entry, rows in entry_rows(plan, h.device):
            if not compose.acts_at(entry, self.layers):
                continue
            if rows is None:
                return compose.site_output(entry, self.layers, fusions, h, r, ln, model_adds_residual)
            h_rows, r_rows = h.index_select(0, rows), r.index_select(0, rows)
            site_out = compose.site_output(entry, self.layers, fusions, h_rows, r_rows, ln, model_adds_residual)
            out = out.index_copy(0, rows, site_out.to(out.dtype))
        return out


class PostLnSite(BottleneckSite):
    """BERT-family ``SelfOutput``/``Output``: ``LN(dropout(dense(hidden)) + r)`` with adapters per row."""

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        plan = current_plan()
        if not self.active(plan):
            return self.base(hidden_states, input_tensor)
        block = self.base
        h = block.dropout(block.dense(hidden_states))
        base_out = block.LayerNorm(h + input_tensor)
        return self.route(plan, h, input_tensor, block.LayerNorm, False, base_out)


class PreLnSite(BottleneckSite):
    """A pre-LN attention or MLP module whose output ``h`` gets adapters per row (the block adds r)."""

    def __init__(self, base: nn.Module, residual_key: tuple):
        super().__init__(base)
        self.residual_key = residual_key

    def forward(self, *args, **kwargs):
        out = self.base(*args, **kwargs)
        plan = current_plan()
        r = plan.cache.pop(self.residual_key, None) if plan is not None else None
        if not self.active(plan):
            return out
        h = out[0] if isinstance(out, tuple) else out
        if r is None:
            if any(compose.acts_at(e, self.layers) for e, _ in entry_rows(plan, h.device)):
                raise EngineStateError(
                    f"{self.residual_key[1]}: the residual stream was not seen before this sub-block; "
                    "this block layout is not supported for bottleneck adapters"
                )
            return out
        new_h = self.route(plan, h, r, None, True, h)
        return (new_h, *out[1:]) if isinstance(out, tuple) else new_h


class ResidualRecorder(inject.ModuleWrapper):
    """A pre-LN norm that files its input (the residual stream r) for the site after it."""

    def __init__(self, base: nn.Module, residual_key: tuple):
        super().__init__()
        self.base = base
        self.residual_key = residual_key

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        plan = current_plan()
        if plan is not None:
            plan.cache[self.residual_key] = hidden_states
        return self.base(hidden_states, *args, **kwargs)


# ---------------------------------------------------------------------- attach / detach
def _site_names(model: nn.Module, key: SiteKey) -> tuple[str, str | None]:
    """(qualified name of the wrapped sub-block, of its residual norm or None) for a site."""
    facts = facts_of(model)
    layers_path, layers = decoder_layers(model, facts.spec)
    layer, site = key
    if not 0 <= layer < len(layers):
        raise AdapterMismatchError(f"block {layer} does not exist: the base has {len(layers)} blocks")
    placement = adapter_site(facts, site)
    norm = f"{layers_path}.{layer}.{placement.residual_norm}" if placement.residual_norm else None
    return f"{layers_path}.{layer}.{placement.module}", norm


def _site_wrapper(model: nn.Module, key: SiteKey, create: bool) -> BottleneckSite | None:
    name, norm = _site_names(model, key)
    module = inject.locate(model, name)
    if isinstance(module, BottleneckSite) or not create:
        return module if isinstance(module, BottleneckSite) else None
    if norm is None:
        wrapper = PostLnSite(module)
    else:
        residual_key = ("bottleneck.residual", name)
        inject.swap_module(model, norm, ResidualRecorder(inject.locate(model, norm), residual_key))
        wrapper = PreLnSite(module, residual_key)
    inject.swap_module(model, name, wrapper)
    return wrapper


def _unwrap_if_empty(model: nn.Module, key: SiteKey) -> None:
    wrapper = _site_wrapper(model, key, create=False)
    if wrapper is None or not wrapper.empty:
        return
    name, norm = _site_names(model, key)
    inject.swap_module(model, name, wrapper.base)
    if norm is not None:
        recorder = inject.locate(model, norm)
        if isinstance(recorder, ResidualRecorder):
            inject.swap_module(model, norm, recorder.base)


def _check_hidden(model: nn.Module, adapter, what: str) -> None:
    hidden = facts_of(model).hidden_size  # a multimodal config keeps it in its text config
    if adapter.hidden_size != hidden:
        raise AdapterMismatchError(
            f"{adapter.source or what}: made for hidden size {adapter.hidden_size}, but the base has {hidden}; "
            "load it on a base of the size it was trained for"
        )


def attach_bottleneck(model: nn.Module, name: str, adapter: BottleneckAdapter, dtype: torch.dtype,
                      device: torch.device) -> None:
    """Wrap the adapter's sites (once per site) and register its layers under ``name``."""
    _check_hidden(model, adapter, "bottleneck adapter")
    for key in adapter.sites:
        _site_names(model, key)  # every site exists before anything is swapped
    for key, layer in adapter.sites.items():
        _site_wrapper(model, key, create=True).layers[name] = layer.to(device=device, dtype=dtype)


def detach_bottleneck(model: nn.Module, name: str, adapter: BottleneckAdapter) -> None:
    """Remove ``name`` from its sites; unwrap sites left with no adapter and no fusion."""
    for key in adapter.sites:
        wrapper = _site_wrapper(model, key, create=False)
        if wrapper is not None and name in wrapper.layers:
            del wrapper.layers[name]
            _unwrap_if_empty(model, key)


def attach_fusion(model: nn.Module, name: str, fusion: FusionAdapter, dtype: torch.dtype,
                  device: torch.device) -> None:
    """Put the fusion's layers at their sites. Its adapters must be loaded, and sit where it does."""
    _check_hidden(model, fusion, "fusion")
    wrappers = {key: _site_wrapper(model, key, create=False) for key in fusion.sites}
    loaded = {n for w in _all_sites(model) for n in w.layers}
    missing = [n for n in fusion.adapter_names if n not in loaded]
    if missing:
        sibling = Path(fusion.source).parent / missing[0] if fusion.source else None
        path = str(sibling) if sibling is not None and sibling.is_dir() else f"path/to/{missing[0]}"
        raise EngineStateError(
            f"{fusion.source or 'fusion'} fuses {list(fusion.adapter_names)}, but {missing} "
            f"{'is' if len(missing) == 1 else 'are'} not loaded as bottleneck adapters under "
            f"{'that name' if len(missing) == 1 else 'those names'}; load them first, e.g. "
            f"eng.add_adapter({missing[0]!r}, {path!r})"
        )
    for wrapper in _all_sites(model):
        for other, names in wrapper.fused.items():
            if names == fusion.adapter_names and other != name:
                raise EngineStateError(f"a fusion over {list(names)} is already loaded as {other!r}; remove it first")
    for key, wrapper in wrappers.items():
        if wrapper is None or not any(n in wrapper.layers for n in fusion.adapter_names):
            raise AdapterMismatchError(
                f"{fusion.source or 'fusion'}: has a fusion layer at block {key[0]} site {key[1]!r}, where none of "
                f"{list(fusion.adapter_names)} sits; it was trained with other adapters"
            )
    for wrapper in _all_sites(model):
        here = [n for n in fusion.adapter_names if n in wrapper.layers]
        key = next((k for k, w in wrappers.items() if w is wrapper), None)
        if here and key is None:
            raise AdapterMismatchError(
                f"{fusion.source or 'fusion'}: {here} sit at a site where the fusion has no layer; "
                "it was trained with adapters placed elsewhere"
            )
    for key, layer in fusion.sites.items():
        wrappers[key].fusions[name] = layer.to(device=device, dtype=dtype)
        wrappers[key].fused[name] = fusion.adapter_names


def detach_fusion(model: nn.Module, name: str, fusion: FusionAdapter) -> None:
    """Remove the fusion ``name`` from its sites; unwrap sites left empty."""
    for key in fusion.sites:
        wrapper = _site_wrapper(model, key, create=False)
        if wrapper is not None and name in wrapper.fusions:
            del wrapper.fusions[name]
            del wrapper.fused[name]
            _unwrap_if_empty(model, key)


def _all_sites(model: nn.Module) -> list[BottleneckSite]:
    return [m for m in model.modules() if isinstance(m, BottleneckSite)]
