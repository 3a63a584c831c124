"""Batched LoRA: every resident adapter of a layer in stacked, rank-bucketed buffers.

The idea of S-LoRA (Sheng et al., 2023) and Punica (Chen et al., 2023): the cost of a batch should
not grow with the number of distinct adapters in it. Per layer, adapters whose rank pads to the same
power of two ``R`` share a bucket::

    A: [slots, R, in]     lora_A, rows r..R-1 zero
    B: [slots, R, out]    s * lora_B^T, rows r..R-1 zero (the scale s folded in once)

A batch row ``i`` that uses the adapter in slot ``k`` with weight ``w`` (1, or its ``ak.Mix``
weight; a row that mixes several adapters has one entry per adapter) adds ``w * (x_i A_k^T) B_k``.
Padding adds exact zeros. Three ways to compute it, chosen by shape:

- one slot for every entry: two matmuls on that slot's views (no gather; when the entries are the batch
  rows with weight 1, the second matmul adds into the output itself, ``addmm``: a decode step runs this in
  every adapted layer, where each op's dispatch costs more than its arithmetic);
- BGMV: gather each entry's A and B, two batched matmuls (decode, and most prefills; ``baddbmm`` adds into
  the output when the entries are the batch rows);
- SGMV: entries grouped by slot, two matmuls per segment, when the segments are long (at least
  ``SEGMENT_TOKENS`` tokens on average: a long prefill shared by many rows of few adapters), where
  one matmul per segment beats per-row products and the gather would copy each adapter many times.
  Measured on CPU (hidden 512, rank 16): BGMV is faster for every segment shorter than that, by
  1.3-2x for prefills of a few short prompts and 4x for a decode step of 32 distinct adapters.

How entries map to buckets and slots depends only on the plan and the layer's :class:`Layout`;
layers with the same layout (the same adapters added in the same order) share one computation per
plan. Adding or removing an adapter never moves another adapter's slot or changes its bucket, so
the others' outputs stay bit for bit what they were.

The buffers are copies made when an adapter is added: weights that train (``requires_grad``), DoRA
and ``lora_bias`` stay on the exact per-adapter path of ``inject.LoraLinear``.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch

from adaptkit.compositions import members_of
from adaptkit.measured import shared_inputs
from adaptkit.routing import RoutingPlan

SEGMENT_TOKENS = 1024  # mean tokens per slot from which segments (SGMV) replace gather + batched matmul (BGMV)


def padded_rank(rank: int) -> int:
    """The bucket of a rank: the next power of two (4 -> 4, 6 -> 8, 16 -> 16)."""
    return 1 << max(rank - 1, 0).bit_length()


def rides_batched_path(weights) -> bool:
    """Plain, frozen LoRA factors; DoRA, ``lora_bias``, trainable factors and the weights of other delta
    methods (``exact_only``: LoHa, LoKr, IA3) keep the exact path."""
    if getattr(weights, "exact_only", False):
        return False
    return weights.magnitude is None and weights.lora_B_bias is None and not (
        weights.lora_A.requires_grad or weights.lora_B.requires_grad)


class RankBucket:
    """The stacked factors of every adapter of one padded rank, for one layer.

    Slots are reused after a removal (lowest free first); capacity doubles when full.
    """

    def __init__(self, rank: int, in_features: int, out_features: int, dtype: torch.dtype, device):
        self.rank = rank
        self.A = torch.zeros(0, rank, in_features, dtype=dtype, device=device)  # [slots, R, in]
        self.B = torch.zeros(0, rank, out_features, dtype=dtype, device=device)  # [slots, R, out], scale folded
        self.free: list[int] = []
        self.count = 0  # slots in use

    @property
    def nbytes(self) -> int:
        return self.A.numel() * self.A.element_size() + self.B.numel() * self.B.element_size()

    def put(self, weights) -> int:
        """Copy ``weights`` (LoraWeights) into a free slot; returns the slot."""
        if not self.free:
            self._grow()
        slot = min(self.free)
        self.free.remove(slot)
        r = weights.rank  # a free slot is all zeros (new, or cleared): only the first r rows are written
        self.A[slot, :r].copy_(weights.lora_A.detach())
        B = self.B[slot, :r]
        if B.dtype == torch.float32:
            torch.mul(weights.lora_B.detach().T, weights.scale, out=B)
        else:  # scale in float32, round once
            B.copy_(weights.lora_B.detach().T.float() * weights.scale)
        self.count += 1
        return slot

    def clear(self, slot: int) -> None:
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.free.append(slot)
        self.count -= 1

    def _grow(self) -> None:
        old = self.A.shape[0]
        new = max(4, 2 * old)
        self.A = torch.cat([self.A, self.A.new_zeros(new - old, *self.A.shape[1:])])
        self.B = torch.cat([self.B, self.B.new_zeros(new - old, *self.B.shape[1:])])
        self.free.extend(range(old, new))


class Layout:
    """Which batched adapter sits where in a layer: ``(name, bucket rank, slot, rank)`` items.

    Interned: layers with equal items hold the same object, so a plan routes it once for all of them.
    """

    __slots__ = ("items", "index", "_hash", "__weakref__")
    _interned: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def __init__(self, items: tuple):
        self.items = items
        self.index = {name: (bucket, slot, rank) for name, bucket, slot, rank in items}
        self._hash = hash(items)

    @classmethod
    def of(cls, items) -> Layout:
        items = tuple(sorted(items))
        found = cls._interned.get(items)
        if found is None:
            found = cls._interned[items] = cls(items)
        return found

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, Layout) and self.items == other.items)


@dataclass
class BucketRoute:
    """The entries of one bucket for one plan: batch rows, their slots and weights.

    ``rows`` is None when the entries are exactly the batch rows in order; ``weights`` [E, 1, 1] is
    None when all are 1; ``single`` is (slot, rank) when every entry uses the same slot.
    """

    rows: torch.Tensor | None
    slots: torch.Tensor
    weights: torch.Tensor | None
    distinct: list[tuple[int, int]]  # (slot, rank) of every slot used, in slot order

    @property
    def single(self) -> tuple[int, int] | None:
        return self.distinct[0] if len(self.distinct) == 1 else None

    @functools.cached_property
    def segments(self) -> list[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
        """(slot, rank, entry positions, their weights) per slot, for the SGMV path (built on first use)."""
        found = []
        for slot, rank in self.distinct:
            where = (self.slots == slot).nonzero().flatten()
            found.append((slot, rank, where, None if self.weights is None else self.weights[where]))
        return found


def route_layout(plan: RoutingPlan, layout: Layout, device) -> dict[int, BucketRoute]:
    """Per bucket, the entries of ``plan`` that use an adapter of ``layout`` (built once per plan)."""
    entries: dict[int, list[tuple[int, int, int, float]]] = {}  # bucket -> (row, slot, rank, weight)
    for row, entry in enumerate(plan.entries):
        for name, weight in members_of(entry).items():
            found = layout.index.get(name)
            if found is not None:
                bucket, slot, rank = found
                entries.setdefault(bucket, []).append((row, slot, rank, weight))
    routes = {}
    for bucket, items in entries.items():
        rows = [i[0] for i in items]
        slots = [i[1] for i in items]
        weights = [i[3] for i in items]
        identity = rows == list(range(plan.batch_size))
        weight_tensor = None
        if any(w != 1.0 for w in weights):
            weight_tensor = torch.tensor(weights, dtype=torch.float32, device=device).view(-1, 1, 1)
        routes[bucket] = BucketRoute(
            rows=None if identity else torch.tensor(rows, dtype=torch.long, device=device),
            slots=torch.tensor(slots, dtype=torch.long, device=device),
            weights=weight_tensor,
            distinct=sorted(set(zip(slots, (i[2] for i in items)))),
        )
    return routes


def gathers(x: torch.Tensor, route: BucketRoute) -> bool:
    """Whether ``route``'s entries of several slots take the BGMV path (gather, batched matmuls) rather than
    segments (SGMV): the segments are short (fewer than ``SEGMENT_TOKENS`` tokens per slot on average)."""
    return (x.shape[-2] if x.ndim == 3 else 1) * len(route.slots) < SEGMENT_TOKENS * len(route.distinct)


def shrink(x: torch.Tensor, A: torch.Tensor, route: BucketRoute) -> torch.Tensor | None:
    """Every entry's ``x_row A_slot^T`` with all rows of each slot of ``A`` [slots, R', in]: [E*T, R'] when
    every entry uses one slot, [E, T, R'] (BGMV) otherwise; None where segments (SGMV) run instead."""
    xr = x if route.rows is None else x.index_select(0, route.rows)  # [E, T, in] or [E, in]
    if route.single is not None:
        return xr.reshape(-1, xr.shape[-1]) @ A[route.single[0]].T
    if not gathers(x, route):
        return None
    return torch.bmm(xr.unsqueeze(1) if x.ndim == 2 else xr, A.index_select(0, route.slots).transpose(1, 2))


def add_batched_delta(y: torch.Tensor, x: torch.Tensor, bucket: RankBucket, route: BucketRoute,
                      hidden: torch.Tensor | None = None) -> torch.Tensor:
    """``y`` plus every entry's ``w * (x_row A_slot^T) B_slot``; x: [N, T, in] or [N, in], y likewise [.., out].

    ``hidden``: the entries' ``x A^T`` already computed (:func:`shrink`, by a sibling layer that reads the
    same ``x``), columns ``0..R-1`` of each slot.
    """
    A, B = bucket.A, bucket.B
    if A.dtype != x.dtype:
        A, B = A.to(x.dtype), B.to(x.dtype)
    if hidden is None:
        hidden = shrink(x, A, route)
    if hidden is None:
        return _add_segments(y, x, A, B, route)
    entries = x.shape[0] if route.rows is None else len(route.rows)
    # every row with weight 1 (one adapter for the batch, or each row its own): the expand adds into the output,
    # one op less in every adapted layer of a decode step, where dispatch costs more than the math
    fused = route.rows is None and route.weights is None and y.dtype == x.dtype
    if route.single is not None:
        slot, rank = route.single
        hidden = hidden[:, :rank]
        if fused:
            return torch.addmm(y.reshape(-1, y.shape[-1]), hidden, B[slot, :rank]).view(y.shape)
        delta = (hidden @ B[slot, :rank]).view(entries, *x.shape[1:-1], B.shape[-1])
        if route.weights is not None:
            delta = delta * route.weights.to(delta.dtype).view(-1, *([1] * (delta.ndim - 1)))
    else:
        gathered = B.index_select(0, route.slots)  # [E, R, out]
        if fused and x.ndim == 3:
            return torch.baddbmm(y, hidden, gathered)
        delta = torch.bmm(hidden, gathered)  # [E, T, out]
        if route.weights is not None:
            delta = delta * route.weights.to(delta.dtype)
        if x.ndim == 2:
            delta = delta.squeeze(1)
    if route.rows is None:
        return y + delta.to(y.dtype)
    return y.index_add(0, route.rows, delta.to(y.dtype))


def _add_segments(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, route: BucketRoute) -> torch.Tensor:
    """SGMV: the entries grouped by slot, two matmuls per segment."""
    xr = x if route.rows is None else x.index_select(0, route.rows)
    delta = xr.new_empty(*xr.shape[:-1], B.shape[-1])
    for slot, rank, where, weights in route.segments:
        part = (xr.index_select(0, where) @ A[slot, :rank].T) @ B[slot, :rank]
        if weights is not None:
            part = part * weights.to(part.dtype)
        delta.index_copy_(0, where, part)
    if route.rows is None:
        return y + delta.to(y.dtype)
    return y.index_add(0, route.rows, delta.to(y.dtype))


class LayerStacks:
    """The buckets of one layer and where each batched adapter sits in them."""

    def __init__(self, in_features: int, out_features: int):
        self.in_features, self.out_features = in_features, out_features
        self.buckets: dict[int, RankBucket] = {}
        self.layout = Layout.of(())
        self.siblings: Siblings | None = None  # the layers that read the same input, where measured

    def __contains__(self, name: str) -> bool:
        return name in self.layout.index

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buckets.values())

    def add(self, name: str, weights) -> None:
        rank = padded_rank(weights.rank)
        bucket = self.buckets.get(rank)
        if bucket is None:
            bucket = self.buckets[rank] = RankBucket(rank, self.in_features, self.out_features,
                                                      weights.lora_A.dtype, weights.lora_A.device)
        slot = bucket.put(weights)
        self.layout = Layout.of((*self.layout.items, (name, rank, slot, weights.rank)))

    def remove(self, name: str) -> None:
        bucket_rank, slot, _ = self.layout.index[name]
        bucket = self.buckets[bucket_rank]
        bucket.clear(slot)
        if bucket.count == 0:
            del self.buckets[bucket_rank]
        self.layout = Layout.of(item for item in self.layout.items if item[0] != name)

    @property
    def padding_nbytes(self) -> int:
        """Bytes holding no factor: ranks padded up to their bucket, and free slots."""
        held = 0
        for _, bucket_rank, _, rank in self.layout.items:
            element = self.buckets[bucket_rank].A.element_size()
            held += rank * (self.in_features + self.out_features) * element
        return self.nbytes - held

    def apply(self, y: torch.Tensor, x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        key = ("lora_stack", self.layout)
        routes = plan.cache.get(key)
        if routes is None:
            routes = plan.cache[key] = route_layout(plan, self.layout, x.device)
        shared = self.siblings.hidden(self, x, routes) if self.siblings is not None else None
        for rank, route in routes.items():
            y = add_batched_delta(y, x, self.buckets[rank], route, None if shared is None else shared.get(rank))
        return y


class Siblings:
    """Layers that read the same input tensor (a block's q/k/v projections, gate/up: measured, see
    ``measured.shared_inputs``): one shrink for all of them, as vLLM's merged QKV LoRA does.

    The members that hold the same adapters in the same places (equal :class:`Layout`) share: the first of
    them to see an input computes ``x A^T`` against their A factors stacked along the rank,
    ``[slots, k*R, in]``, and the others take their columns of it. The stacked tensor is the members'
    storage (each member's ``A`` becomes a view of it, so nothing is held twice), rebuilt when their layout
    changes. An input is recognised by identity; one that is not the stashed tensor is computed afresh,
    so sharing can only save work, never change a result.
    """

    def __init__(self):
        self._members: list[weakref.ref] = []
        self._stacked: tuple | None = None  # (members, {rank: [slots, k*R, in]})
        self._stash: tuple | None = None  # (x, layout, routes, members, {rank: hidden}, members still to take it)

    def join(self, stacks: LayerStacks) -> None:
        if stacks.siblings is not self:
            self._members.append(weakref.ref(stacks))
            stacks.siblings = self

    def hidden(self, member: LayerStacks, x: torch.Tensor, routes: dict[int, BucketRoute]) -> dict | None:
        """``member``'s columns of the shared shrink of ``x`` per bucket rank; None where it shares with no one."""
        stash = self._stash
        if stash is None or stash[0] is not x or stash[1] is not member.layout or stash[2] is not routes:
            members = [m for m in (ref() for ref in self._members) if m is not None and m.layout is member.layout]
            if len(members) < 2:
                return None
            stacked = self._stacked_A(members)
            if stacked is None:
                return None
            shared = {}
            for rank, route in routes.items():
                A = stacked[rank] if stacked[rank].dtype == x.dtype else stacked[rank].to(x.dtype)
                found = shrink(x, A, route)
                if found is not None:
                    shared[rank] = found
            stash = self._stash = (x, member.layout, routes, members, shared, [len(members)])
        members, shared, left = stash[3], stash[4], stash[5]
        i = members.index(member)
        left[0] -= 1
        if left[0] == 0:  # every member has its part: let go of the input
            self._stash = None
        return {rank: h[..., i * rank:(i + 1) * rank] for rank, h in shared.items()}

    def _stacked_A(self, members: list[LayerStacks]) -> dict[int, torch.Tensor] | None:
        """The members' A factors stacked per bucket (their storage from now on); None where their buckets
        differ in capacity (equal layouts reached through different histories). Kept while every member's A
        is still a view of it: an add that grows a bucket moves that member's A to storage of its own."""
        if self._stacked is not None and self._stacked[0] == members:
            kept = self._stacked[1]
            if kept.keys() == members[0].buckets.keys() and all(
                    m.buckets[rank].A._base is A for rank, A in kept.items() for m in members):
                return kept
        if any(len({m.buckets[rank].A.shape for m in members}) > 1 for rank in members[0].buckets):
            return None
        stacked = {}
        for rank in members[0].buckets:
            with torch.inference_mode(False):  # the buckets' storage: later adds write into it
                A = torch.cat([m.buckets[rank].A for m in members], dim=1)  # [slots, k*R, in]
            for i, m in enumerate(members):
                m.buckets[rank].A = A[:, i * rank:(i + 1) * rank]
            stacked[rank] = A
        self._stacked = (members, stacked)
        return stacked


def stack_memory(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of every layer's stacked LoRA buffers in ``model``, and how many of them are padding."""
    stacks = [m.stacks for m in model.modules() if isinstance(getattr(m, "stacks", None), LayerStacks)]
    return {"stacked": sum(s.nbytes for s in stacks), "padding": sum(s.padding_nbytes for s in stacks)}


def stacked_nbytes(adapter, element_size: int) -> tuple[int, int]:
    """(bytes a LoRA takes in the stacks when resident, of which rank padding) at ``element_size`` bytes."""
    total = padding = 0
    for weights in adapter.layers.values():
        if not rides_batched_path(weights):
            continue
        per_rank = (weights.in_features + weights.out_features) * element_size
        total += padded_rank(weights.rank) * per_rank
        padding += (padded_rank(weights.rank) - weights.rank) * per_rank
    return total, padding


_SIBLINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {layer name: Siblings}


def siblings_of(model: torch.nn.Module) -> dict[str, Siblings]:
    """The :class:`~adaptkit.lora_stack.Siblings` of each layer that reads the same input as others."""
    found = _SIBLINGS.get(model)
    if found is None:
        found = _SIBLINGS[model] = {}
        for group in shared_inputs(model):
            siblings = Siblings()
            found.update(dict.fromkeys(group, siblings))
    return found
