"""A running batch's decode state, and the cache surgery continuous batching needs.

A batch being decoded one token at a time is::

    cache      DynamicCache; per layer K, V: [B, H_kv, L, D]
    mask       [B, L] 1 where the cache holds a real entry (prefix, prompt or generated token), 0 for padding
    positions  [B, 1] position id of the last token fed; the next token of row i gets positions[i] + 1
    entries    the rows' adapter entries (None, a name, ak.Stack/Fuse/Mix); plan: their RoutingPlan

Rows join a running batch at a token boundary: the shorter side's K/V are left-padded with zeros
along the sequence axis (masked), then both are concatenated along the batch axis. Rows leave by
``index_select`` on the batch axis. Every row keeps its own positions, and padding is masked, so a
row attends to exactly the keys it would attend to alone. Columns no row uses any more (after the
long rows left) are cropped from the left.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from adaptkit.errors import EngineStateError
from adaptkit.generation import DecodeState


def check_joinable(cache: DynamicCache) -> list:
    """The cache's layers, if every one is a full-attention ``DynamicLayer`` (sliding-window layers
    keep a moving window whose bookkeeping padding would break); else EngineStateError."""
    layers = list(cache.layers)
    for index, layer in enumerate(layers):
        if not isinstance(layer, DynamicLayer) or getattr(layer, "is_sliding", False):
            raise EngineStateError(
                f"cache layer {index} is a {type(layer).__name__}; continuous batching joins full-attention "
                "caches (DynamicLayer) only; serve this model with --max-batch 1"
            )
    return layers


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    if width == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = width
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def join_states(running: DecodeState | None, joining: DecodeState) -> DecodeState:
    """``running``'s rows followed by ``joining``'s, in one state (``running`` is updated in place).

    The shorter side is left-padded (K/V zeros, mask 0) to the longer length L; K/V: [B_r + B_j, H, L, D].
    """
    if running is None or running.batch_size == 0:
        return joining
    ours, theirs = check_joinable(running.cache), check_joinable(joining.cache)
    if len(ours) != len(theirs):
        raise EngineStateError(f"cannot join caches of {len(ours)} and {len(theirs)} layers")
    length = max(running.length, joining.length)
    pad_ours, pad_theirs = length - running.length, length - joining.length
    for mine, other in zip(ours, theirs):
        # keys / values: [B, H_kv, L, D]; the sequence axis is 2
        mine.keys = torch.cat([_pad_left(mine.keys, pad_ours, 2), _pad_left(other.keys, pad_theirs, 2)], dim=0)
        mine.values = torch.cat([_pad_left(mine.values, pad_ours, 2), _pad_left(other.values, pad_theirs, 2)], dim=0)
    running.mask = torch.cat([_pad_left(running.mask, pad_ours, 1), _pad_left(joining.mask, pad_theirs, 1)], dim=0)
    running.positions = torch.cat([running.positions, joining.positions], dim=0)
    running.entries = running.entries + joining.entries
    running.plan = None
    return running


def select_rows(state: DecodeState, keep: Sequence[int]) -> DecodeState:
    """Keep only the rows ``keep`` (in that order), in place; then crop columns no kept row uses."""
    keep = list(keep)
    if keep == list(range(state.batch_size)):
        return state
    index = torch.tensor(keep, dtype=torch.long, device=state.mask.device)
    for layer in check_joinable(state.cache):
        layer.keys = layer.keys.index_select(0, index)
        layer.values = layer.values.index_select(0, index)
    state.mask = state.mask.index_select(0, index)
    state.positions = state.positions.index_select(0, index)
    state.entries = tuple(state.entries[i] for i in keep)
    state.plan = None
    if keep:
        crop_unused_columns(state)
    return state


def crop_unused_columns(state: DecodeState) -> int:
    """Drop leading cache columns that are padding in every row; returns how many were dropped."""
    used = state.mask.any(dim=0).nonzero()
    start = int(used[0]) if len(used) else state.length
    if start == 0:
        return 0
    for layer in check_joinable(state.cache):
        layer.keys = layer.keys[:, :, start:]
        layer.values = layer.values[:, :, start:]
    state.mask = state.mask[:, start:]
    return start
