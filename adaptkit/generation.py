"""Token sampling and the batched decode loop (prefill once, then one token per step)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from adaptkit.compositions import RowEntry
from adaptkit.errors import EngineStateError, InvalidArgumentError
from adaptkit.measured import sliding_windows
from adaptkit.routing import RoutingPlan

MIN_TEMPERATURE = 1e-4  # below this, sampling is greedy (logits / 1e-40 overflow to inf and NaN)


def check_sampling(temperature: float, top_p: float, top_k: int, max_new_tokens: int) -> None:
    if not (math.isfinite(temperature) and math.isfinite(top_p)):
        raise InvalidArgumentError(f"temperature and top_p must be finite, got {temperature} and {top_p}")
    if temperature < 0:
        raise InvalidArgumentError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise InvalidArgumentError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise InvalidArgumentError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if max_new_tokens < 0:
        raise InvalidArgumentError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token per row from ``logits`` [B, V] -> [B]. ``temperature`` below ``MIN_TEMPERATURE`` is greedy."""
    if temperature < MIN_TEMPERATURE:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token once the mass *before* it already reaches top_p (the top token always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass(frozen=True)
class Penalties:
    """What shapes a row's next-token logits before sampling (OpenAI's and vLLM's fields).

    Applied to the logits ``z`` of one row, in this order:

    - ``logit_bias``: ``z[t] += bias[t]``;
    - ``min_tokens``: the stop ids get ``-inf`` until that many tokens were generated;
    - ``repetition`` (CTRL / Hugging Face): for every token seen in the prompt or the output,
      ``z[t] /= r`` where ``z[t] > 0``, ``z[t] *= r`` otherwise;
    - ``frequency`` and ``presence``: ``z[t] -= f * count(t) + p * (count(t) > 0)`` over the output.
    """

    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0

    def __post_init__(self):
        for name in ("presence", "frequency"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidArgumentError(f"{name}_penalty must be within [-2, 2], got {getattr(self, name)}")
        if not (math.isfinite(self.repetition) and 0 < self.repetition <= 10):
            raise InvalidArgumentError(f"repetition_penalty must be in (0, 10], got {self.repetition}")
        if any(not (math.isfinite(b) and -100 <= b <= 100) for _, b in self.logit_bias):
            raise InvalidArgumentError("logit_bias values must be within [-100, 100]")
        if self.min_tokens < 0:
            raise InvalidArgumentError(f"min_tokens must be >= 0, got {self.min_tokens}")

    @property
    def active(self) -> bool:
        return bool(self.presence or self.frequency or self.repetition != 1.0 or self.logit_bias or self.min_tokens)

    def apply(self, logits: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor, produced: int,
              stop_ids) -> torch.Tensor:
        """The shaped logits of one row: ``logits`` [V]; ``counts`` [V] output token counts; ``seen`` [V]
        bool, tokens of the prompt or the output; ``produced``: tokens generated so far."""
        logits = logits.float().clone()
        if self.logit_bias:
            ids = torch.tensor([t for t, _ in self.logit_bias], device=logits.device)
            logits.index_add_(0, ids, torch.tensor([b for _, b in self.logit_bias], device=logits.device))
        if produced < self.min_tokens and stop_ids:
            logits[torch.tensor(sorted(stop_ids), device=logits.device)] = float("-inf")
        if self.repetition != 1.0:
            shaped = torch.where(logits > 0, logits / self.repetition, logits * self.repetition)
            logits = torch.where(seen, shaped, logits)
        if self.frequency or self.presence:
            logits = logits - self.frequency * counts - self.presence * (counts > 0).float()
        return logits


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids [B, S], attention_mask [B, S]) padded on the left."""
    if not rows or any(len(r) == 0 for r in rows):
        raise InvalidArgumentError("every prompt must have at least one token")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def positions_from_mask(attention_mask: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
    """Position ids that count only real tokens (left padding gets position 0), plus ``offset`` per row."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if isinstance(offset, torch.Tensor):
        offset = offset.view(-1, 1)
    return positions + offset


@dataclass
class DecodeState:
    """Cache, mask, positions and adapter entries of the rows being decoded (see ``serving/batch.py``).

    ``plan`` is None after a change of membership; :meth:`Engine.decode_step` rebuilds it once.
    """

    cache: DynamicCache
    mask: torch.Tensor
    positions: torch.Tensor
    entries: tuple[RowEntry, ...]
    plan: RoutingPlan | None = None

    @property
    def batch_size(self) -> int:
        return len(self.entries)

    @property
    def length(self) -> int:
        """Cache entries per row, padding included (L)."""
        return self.mask.shape[1]


# ----------------------------------------------------------------------------- sliding windows
def sliding_layout(config) -> tuple[int | None, list[str] | None]:
    """(the window, each layer's type) of a model with sliding-window attention; (None, None) without any.
    Which layers slide is transformers' own reading of the config (:func:`adaptkit.arch.sliding_windows`):
    every layer (Mistral's ``sliding_window``) gives one mask, some of them (Gemma 2/3's ``layer_types``)
    a mask per layer type."""
    windows = sliding_windows(config)
    sizes = {w for w in windows if w is not None}
    if not sizes or set(getattr(config, "layer_types", None) or ()) - {"full_attention", "sliding_attention"}:
        return None, None  # no window, or layers of other kinds (linear attention): the model's own masks
    if len(sizes) > 1:
        raise EngineStateError(f"{config.model_type}: layers slide over different windows {sorted(sizes)}; adaptkit "
                               "batches models whose sliding layers share one window")
    if all(w is not None for w in windows):
        return sizes.pop(), None
    return sizes.pop(), ["full_attention" if w is None else "sliding_attention" for w in windows]


def new_cache(model: nn.Module) -> DynamicCache:
    """An empty cache for ``model``. Sliding-window models get full-attention layers too: the window is
    applied by :func:`attention_masks` from each slot's position, so left padding and rows joining a
    running batch never take window slots (a sliding layer keeps its last W-1 slots, padding included)."""
    if sliding_layout(model.config)[0] is not None:
        return DynamicCache()
    return DynamicCache(config=model.config)


def attention_masks(model: nn.Module, mask: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """The attention mask ``model`` gets: ``mask`` [B, K] as it is, or, for sliding-window models, prepared
    [B, 1, Q, K] additive masks from positions (key j of row b sits at position ``cumsum(mask)[b, j] - 1``;
    query i at ``positions[b, i]``): causal everywhere, and within the window on sliding layers (a dict by
    layer type where layers differ, as Gemma 2 takes it)."""
    window, types = sliding_layout(model.config)
    if window is None:
        return mask
    keys = (mask.long().cumsum(-1) - 1)[:, None, None, :]
    queries = positions[:, None, :, None]
    full = mask.bool()[:, None, None, :] & (keys <= queries)
    sliding = full & (queries - keys < window)

    def additive(allowed: torch.Tensor) -> torch.Tensor:
        return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, torch.finfo(dtype).min)

    if types is None:
        return additive(sliding)
    return {"full_attention": additive(full), "sliding_attention": additive(sliding)}
