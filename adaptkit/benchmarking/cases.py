"""What ``adaptkit bench`` measures for each adapter kind: one static table of modes.

``MODES`` maps a kind to the ways it is served; each mode says which adapter every batch row
uses, what is set up (untimed) around the timed request, how the same case runs in PEFT, and the
work the mode adds per token in theory (``overhead.py``). A new kind adds one entry to ``MODES``.

    lora        unmerged (routed per row), merged (folded into W: merge/unmerge around the request),
                mixed (a batch whose rows cycle over every LoRA given)
    prefix      cache (its K/V in front of every row's cache)
    prompt      cache (its K/V computed once at load; causal LMs), embeddings (prepended per request)
    bottleneck  series or parallel, as the adapter was trained
    fusion      fuse (its bottleneck adapters and the attention over them)

An NF4 base (``--quantize nf4``) changes the base every case runs on, not the modes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from adaptkit.benchmarking import overhead
from adaptkit.compositions import Fuse
from adaptkit.errors import AdaptkitError


@dataclass(frozen=True)
class BenchAdapter:
    """One adapter under test: engine name, source path, what the engine reports, and the adapter
    object as read from disk (for the overhead model; the engine holds its own copy)."""

    name: str
    path: str
    info: object  # AdapterInfo
    adapter: object

    @property
    def kind(self) -> str:
        return self.info.kind

    @property
    def entry(self):
        """The row entry that routes a request to this adapter (a fusion is used as ak.Fuse)."""
        return Fuse(*self.info.details["adapters"]) if self.kind == "fusion" else self.name


def _always(adapters: Sequence[BenchAdapter], batch: int) -> str | None:
    return None


def _one_each(adapters: Sequence[BenchAdapter], batch: int) -> list[BenchAdapter | None]:
    return [adapters[0]] * batch


def _mixed(adapters: Sequence[BenchAdapter], batch: int) -> list[BenchAdapter | None]:
    """Rows cycle over every adapter of the kind (over [adapter, base] when there is only one)."""
    cycle = list(adapters) if len(adapters) > 1 else [adapters[0], None]
    return [cycle[i % len(cycle)] for i in range(batch)]


def _needs_rows(adapters: Sequence[BenchAdapter], batch: int) -> str | None:
    return None if batch >= 2 else "a mixed batch needs at least 2 rows (--batch 2 or more)"


def _placement(wanted: str) -> Callable[[Sequence[BenchAdapter], int], str | None]:
    def applies(adapters: Sequence[BenchAdapter], batch: int) -> str | None:
        return None if adapters[0].info.details.get("placement") == wanted else ""  # the adapter's other mode

    return applies


def _merge(engine, adapters: Sequence[BenchAdapter]) -> None:
    engine.merge(adapters[0].name)


def _unmerge(engine, adapters: Sequence[BenchAdapter]) -> None:
    engine.unmerge()


def _prompt_embeddings(engine, adapters: Sequence[BenchAdapter]) -> None:
    engine.prompt_as_cache = False


def _prompt_cache(engine, adapters: Sequence[BenchAdapter]) -> None:
    engine.prompt_as_cache = True


def _own_macs(item: BenchAdapter, by_name: Mapping[str, BenchAdapter]) -> int:
    return overhead.adapter_macs(item.adapter)


def _no_macs(item: BenchAdapter, by_name: Mapping[str, BenchAdapter]) -> int:
    return 0


def _fusion_macs(item: BenchAdapter, by_name: Mapping[str, BenchAdapter]) -> int:
    children = [by_name[n].adapter for n in item.adapter.adapter_names if n in by_name]
    return overhead.fusion_macs(item.adapter, children)


@dataclass(frozen=True)
class Mode:
    """One way of serving a kind, as measured."""

    name: str
    rows: Callable[[Sequence[BenchAdapter], int], list[BenchAdapter | None]] = _one_each
    macs: Callable[[BenchAdapter, Mapping[str, BenchAdapter]], int] = _own_macs
    # None: measure it; a reason: report it skipped; "": not this adapter's mode (nothing to report)
    applies: Callable[[Sequence[BenchAdapter], int], str | None] = _always
    setup: Callable | None = None  # (engine, adapters), untimed, before every timed request
    teardown: Callable | None = None
    per_kind: bool = False  # one case over every adapter of the kind, instead of one per adapter
    prompt_embeddings: bool = False  # the virtual tokens run through the model on every request
    causal_only: bool = False  # only causal LMs serve it (encoder-decoders prepend prompts to the encoder)
    peft: str | None = None  # how peft_side.py runs the same case; None: PEFT has no such mode


# kind -> its modes (one static table; a new kind adds one entry)
MODES: dict[str, tuple[Mode, ...]] = {
    "lora": (
        Mode("unmerged", peft="unmerged"),
        Mode("merged", macs=_no_macs, setup=_merge, teardown=_unmerge, peft="merged"),
        Mode("mixed", rows=_mixed, applies=_needs_rows, per_kind=True, peft="mixed"),
    ),
    "prefix": (Mode("cache", peft="prompt_learning"),),
    "prompt": (
        Mode("cache", causal_only=True),
        Mode("embeddings", setup=_prompt_embeddings, teardown=_prompt_cache, prompt_embeddings=True,
             peft="prompt_learning"),
    ),
    "bottleneck": (Mode("series", applies=_placement("sequential")), Mode("parallel", applies=_placement("parallel"))),
    "fusion": (Mode("fuse", macs=_fusion_macs),),
}


@dataclass
class CaseSpec:
    """One measured case: its rows for one batch size, what runs around it, its theoretical overhead."""

    label: str
    kind: str
    mode: str
    adapters: tuple[str, ...]
    batch: int
    entries: list  # one row entry per batch row, as Engine.generate_ids takes them
    owners: list[BenchAdapter | None] = field(default_factory=list)
    setup: Callable[[], object] | None = None
    teardown: Callable[[], object] | None = None
    theory: dict = field(default_factory=dict)
    peft: str | None = None


def _bind(step, engine, adapters):
    return None if step is None else (lambda: step(engine, adapters))


def _theory(mode: Mode, owners, by_name, work, prompt_len: int, new_tokens: int) -> dict:
    row_macs = [0 if o is None else mode.macs(o, by_name) for o in owners]
    row_virtual = [0 if o is None else overhead.virtual_tokens(o.adapter) for o in owners]
    return overhead.added_fractions(work, row_macs, row_virtual, prompt_len, new_tokens, mode.prompt_embeddings)


def base_case(batch: int, work, prompt_len: int, new_tokens: int) -> CaseSpec:
    """The bare base through the same engine: every row's adapter is None."""
    theory = overhead.added_fractions(work, [0] * batch, [0] * batch, prompt_len, new_tokens)
    return CaseSpec("base", "base", "-", (), batch, [None] * batch, [None] * batch, theory=theory)


def plan_cases(
    engine, adapters: Sequence[BenchAdapter], batch: int, work, prompt_len: int, new_tokens: int
) -> tuple[list[CaseSpec], list[dict]]:
    """Every (adapter, mode) case that applies at this batch size, and the skipped ones with why.

    A mode whose set-up fails on this engine (e.g. merging a LoRA whose bias has nowhere to go)
    is tried once here, undone, and reported as skipped with the engine's message.
    """
    by_name = {a.name: a for a in adapters}
    cases, skipped = [], []
    for kind, modes in MODES.items():
        of_kind = [a for a in adapters if a.kind == kind]
        if not of_kind:
            continue
        for mode in modes:
            if mode.causal_only and not engine.base.facts.spec.is_causal:
                continue
            groups = [of_kind] if mode.per_kind else [[a] for a in of_kind]
            for group in groups:
                names = tuple(a.name for a in group)
                label = f"{kind} {mode.name}: {'+'.join(names)}"
                reason = mode.applies(group, batch)
                if reason is None:
                    reason = _try_setup(engine, mode, group)
                if reason is not None:
                    if reason:
                        skipped.append({"case": label, "batch": batch, "reason": reason})
                    continue
                owners = mode.rows(group, batch)
                cases.append(CaseSpec(
                    label, kind, mode.name, names, batch,
                    entries=[None if o is None else o.entry for o in owners], owners=owners,
                    setup=_bind(mode.setup, engine, group), teardown=_bind(mode.teardown, engine, group),
                    theory=_theory(mode, owners, by_name, work, prompt_len, new_tokens), peft=mode.peft,
                ))
    return cases, skipped


def _try_setup(engine, mode: Mode, group: Sequence[BenchAdapter]) -> str | None:
    if mode.setup is None:
        return None
    try:
        mode.setup(engine, group)
    except AdaptkitError as exc:
        return str(exc)
    if mode.teardown is not None:
        mode.teardown(engine, group)
    return None


def unknown_kinds(adapters: Sequence[BenchAdapter]) -> list[str]:
    """Kinds the engine loaded that this table has no modes for (reported, never silently dropped)."""
    return sorted({a.kind for a in adapters} - set(MODES))
