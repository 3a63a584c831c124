"""How a row's entry combines bottleneck adapters at one site (AdapterHub's composition rules).

Only the members that have weights at the site take part; a site where none has any is left as
the base computes it. With ``layers`` the site's adapters by name, ``h``/``r``/``ln`` as in
``adapters/bottleneck.py`` (steps 1-3):

- a name: steps 1, 2, 3 of that adapter.
- ``Stack(a_1, ..., a_n)``: each member in turn does steps 1 and 2 on the running state (same r
  and LN); step 3 of the last one.
- ``Average(a_1, ..., a_n; w)``: step 1 of the first member gives x and res; every member does
  step 2 on that x; ``a = mean_i(w_i * a_i)`` (the 1/n of AdapterHub 1.3.0); step 3 of the last.
- ``Fuse(a_1, ..., a_n)``: step 1 of the last member, then AdapterFusion over the members'
  up-projections (``adapters/fusion.py``); step 3 of the last member.
- ``Mix({a_i: w_i})``: ``base + sum_i w_i * (out_i - base)`` with ``out_i`` the site output of
  ``a_i`` alone and ``base`` the site's base output (LoRA members act in their own layers).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from adaptkit.adapters.bottleneck import BottleneckLayer
from adaptkit.adapters.fusion import FusionLayer
from adaptkit.compositions import Average, Fuse, Mix, RowEntry, names_of
from adaptkit.errors import EngineStateError


def acts_at(entry: RowEntry, layers: Mapping[str, BottleneckLayer]) -> bool:
    """True when some adapter of ``entry`` has weights at this site."""
    return any(name in layers for name in names_of(entry))


def site_output(
    entry: RowEntry,
    layers: Mapping[str, BottleneckLayer],
    fusions: Mapping[tuple[str, ...], FusionLayer],
    h: torch.Tensor,
    r: torch.Tensor,
    ln: nn.Module | None,
    model_adds_residual: bool,
) -> torch.Tensor:
    """The site output [B, S, H] for rows whose entry is ``entry`` (``acts_at`` must hold).

    ``fusions`` maps the ordered names a fusion fuses to its layer at this site. With
    ``model_adds_residual`` (pre-LN blocks) the result excludes ``r``, which the block adds.
    """
    if isinstance(entry, Mix):
        base = h if model_adds_residual else (h + r if ln is None else ln(h + r))
        out = base
        for name, weight in entry.weights:
            if name in layers:
                out = out + weight * (site_output(name, layers, fusions, h, r, ln, model_adds_residual) - base)
        return out
    a, last = _state(entry, layers, fusions, h, r, ln)
    return last.finish(a, h, r, ln, model_adds_residual)


def _state(entry, layers, fusions, h, r, ln) -> tuple[torch.Tensor, BottleneckLayer]:
    """Steps 1-2 of the entry's members present here: (a, the layer whose step 3 applies)."""
    present = [name for name in names_of(entry) if name in layers]
    if isinstance(entry, Average):
        weights = [w for name, w in zip(entry.names, entry.weights) if name in layers]
        x, res = layers[present[0]].prepare(h, r, ln)
        outs = torch.stack([layers[name].transform(x, res) for name in present], 0)
        w = torch.tensor(weights, dtype=outs.dtype, device=outs.device)[:, None, None, None]
        return torch.mean(outs * w, dim=0), layers[present[-1]]
    if isinstance(entry, Fuse):
        fusion = fusions.get(entry.names)
        if fusion is None:
            raise EngineStateError(
                f"Fuse{entry.names}: adapters {present} sit here but the loaded fusion has no layer at this site"
            )
        last = layers[present[-1]]
        x, res = last.prepare(h, r, ln)
        if last.config.is_parallel:
            query = r
        else:
            query = h if fusion.config.query_before_ln else x
        return fusion.attend(query, [layers[name].up_projection(x) for name in present], res), last
    state = h  # a single name or a Stack: members in order on the running state
    for name in present:
        x, res = layers[name].prepare(state, r, ln)
        state = layers[name].transform(x, res)
    return state, layers[present[-1]]
