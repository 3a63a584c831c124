"""``adaptkit bench`` / ``ak.bench``: the latency each adapter adds, measured side by side.

For the base and every (adapter, mode) case of ``cases.MODES``, at each batch size, every
row generates ``new_tokens`` tokens greedily from the same random ``prompt_len``-token prompt.
A :class:`~adaptkit.benchmarking.timing.ForwardClock` on the model splits each request into the prefill and the
decode steps (one new token for the whole batch, with the KV cache). All cases of one batch size
run round-robin in the same rounds (``time_interleaved``), so each figure's ratio to the base is
taken on the same machine state: these machines are shared and noisy, ratios are what hold.
Each case then runs once more for its peak memory. Adapter load time (``add_adapter`` from disk)
and switch time (routing the next request to another adapter) are timed round-robin too.

    result = ak.bench("tiny-llama", ["sql=adapters/sql", "adapters/prefix"], batch=(1, 8))
    print(result.table())
"""

from __future__ import annotations

import json
import os
import re
import statistics
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from adaptkit.benchmarking import peft_side
from adaptkit.benchmarking.cases import BenchAdapter, CaseSpec, base_case, plan_cases, unknown_kinds
from adaptkit.benchmarking.timing import (
    Case,
    ForwardClock,
    Timing,
    machine_info,
    peak_memory_bytes,
    reset_peak_memory,
    set_ratios,
    time_interleaved,
)
from adaptkit.errors import EngineStateError, InvalidArgumentError

RECORD_VERSION = 1
_INVALID_NAME_CHARS = re.compile(r"[^A-Za-z0-9_\-]")


@dataclass
class BenchResult:
    """What one bench run measured: ``record`` is the JSON written with ``json_path``."""

    record: dict
    json_path: Path | None = None
    plot_path: Path | None = None

    def table(self) -> str:
        from adaptkit.benchmarking.report import format_bench

        return format_bench(self.record)


def default_name(path: str) -> str:
    """An engine name from an adapter path: its folder or file stem, other characters as '_'."""
    return _INVALID_NAME_CHARS.sub("_", Path(path).stem)[:64] or "adapter"


def adapter_pairs(adapters) -> list[tuple[str, str]]:
    """``{name: path}``, or a list of ``"name=path"``, paths or ``(name, path)`` -> [(name, path)]."""
    items = []
    for entry in adapters.items() if isinstance(adapters, Mapping) else adapters:
        if isinstance(entry, (tuple, list)):
            items.append((str(entry[0]), str(entry[1])))
            continue
        text = str(entry)
        name, sep, path = text.partition("=")
        items.append((name, path) if sep and not Path(text).exists() else (default_name(text), text))
    names = [n for n, _ in items]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InvalidArgumentError(f"adapter name(s) {repeated} given twice; name them apart with NAME=PATH")
    return items


def _check_settings(batch, prompt_len: int, new_tokens: int, repeats: int, warmup: int, compare) -> None:
    if not batch or any(not isinstance(b, int) or b < 1 for b in batch):
        raise InvalidArgumentError(f"batch sizes must be positive integers, got {list(batch)!r}")
    if prompt_len < 1:
        raise InvalidArgumentError(f"prompt_len must be >= 1, got {prompt_len}")
    if new_tokens < 2:
        raise InvalidArgumentError(f"new_tokens must be >= 2 (the first token comes from the prefill), got {new_tokens}")
    if repeats < 1 or warmup < 0:
        raise InvalidArgumentError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if compare not in (None, "peft"):
        raise InvalidArgumentError(f"compare={compare!r} is unknown; known: peft")


def _figure(timing: Timing) -> dict:
    return {"median_s": timing.median, "p90_s": timing.p90, "ratio": timing.ratio, "samples_s": timing.samples}


def _load_adapters(engine, pairs, repeats: int, warmup: int) -> tuple[list[BenchAdapter], dict[str, Timing]]:
    """Time ``add_adapter(name, path)`` round-robin (a fusion's adapters loaded untimed around it), then load all."""
    from adaptkit.formats.detect import read_adapter

    read = {name: read_adapter(path) for name, path in pairs}
    paths = dict(pairs)
    for name, adapter in read.items():
        missing = [n for n in getattr(adapter, "adapter_names", ()) if n not in paths] if adapter.kind == "fusion" else []
        if missing:
            raise InvalidArgumentError(
                f"{paths[name]} fuses {list(adapter.adapter_names)}; pass {missing} too, under those names "
                f"(e.g. --adapters {missing[0]}=PATH,{name}={paths[name]})"
            )
    children = {name: list(a.adapter_names) if a.kind == "fusion" else [] for name, a in read.items()}

    def load_case(name: str) -> Case:
        def setup():
            for child in children[name]:
                engine.add_adapter(child, paths[child])

        def teardown():
            for loaded in [name, *reversed(children[name])]:
                engine.remove_adapter(loaded)

        return Case(lambda: engine.add_adapter(name, paths[name]), setup=setup, teardown=teardown)

    timings = time_interleaved({name: load_case(name) for name in paths}, repeats=repeats, warmup=warmup)
    order = sorted(pairs, key=lambda pair: read[pair[0]].kind == "fusion")  # fused adapters first
    loaded = [BenchAdapter(name, path, engine.add_adapter(name, path), read[name]) for name, path in order]
    return loaded, timings


def _switch_timings(engine, adapters: Sequence[BenchAdapter], batch: int, repeats: int) -> dict[str, Timing]:
    """Routing the next request to another adapter: ``set_default_adapter`` + the routing plan, round-robin."""
    def switch_to(entry):
        def run():
            engine.set_default_adapter(entry)
            engine.plan(None, batch)

        return run

    cases = {"(base)": switch_to(None), **{a.name: switch_to(a.entry) for a in adapters}}
    timings = time_interleaved(cases, repeats=max(repeats, 20), warmup=2)
    engine.set_default_adapter(None)
    return timings


def _measure_request(clocks: dict, stack: ExitStack, ids: torch.Tensor, new_tokens: int, device):
    """``measured(model, generate)``: a timed run of ``generate(ids, new_tokens)``, split by model's clock.
    ``new_tokens`` 0: one forward (an encoder's classification), its time as the prefill."""

    def measured(model, generate):
        if model not in clocks:
            clocks[model] = stack.enter_context(ForwardClock(model, device))
        clock = clocks[model]

        def run() -> dict:
            clock.start()
            generate(ids, new_tokens)
            if new_tokens == 0:
                return {"prefill": clock.split(1)[0]}
            prefill, steps = clock.split(new_tokens)
            return {"prefill": prefill, "decode_token": statistics.fmean(steps), "decode_steps": steps}

        return run

    return measured


def _peak_memory(cases: Mapping[str, Case], device) -> dict[str, tuple[int, str]]:
    """Each case once more, alone: (peak bytes during its request, what was measured)."""
    peaks = {}
    for name, case in cases.items():
        if case.setup is not None:
            case.setup()
        source = reset_peak_memory(device)
        case.run()
        peaks[name] = (peak_memory_bytes(device), source)
        if case.teardown is not None:
            case.teardown()
    return peaks


def _tokens_per_s(batch: int, decode: Timing) -> dict:
    """Decode throughput: at the median step, at the p90 step (the slow end), and vs the base (1 / ratio)."""
    return {"median": batch / decode.median, "p90": batch / decode.p90,
            "ratio": None if decode.ratio is None else 1 / decode.ratio}


def _case_record(label, engine_name, matches, spec: CaseSpec, timing: Timing, peak, base_peak, prompt_len, new_tokens):
    decode = timing.parts.get("decode_token")  # None: a classification forward (encoders), no decoding
    record = {
        "case": label, "engine": engine_name, "matches": matches, "kind": spec.kind, "mode": spec.mode,
        "adapters": list(spec.adapters), "batch": spec.batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "request_s": _figure(timing), "prefill_s": _figure(timing.parts["prefill"]),
        "decode_token_s": None if decode is None else _figure(decode),
        "decode_steps_s": timing.extra.get("decode_steps", []),
        "tokens_per_s": None if decode is None else _tokens_per_s(spec.batch, decode),
        "peak_memory_bytes": peak[0], "added_memory_bytes": peak[0] - base_peak, "memory_source": peak[1],
        "theory": spec.theory,
    }
    for part, key in (("setup", "setup_s"), ("teardown", "teardown_s")):
        if part in timing.parts:
            record[key] = _figure(timing.parts[part])
    return record


def _run_batch(engine, adapters, batch, work, settings, side, device, progress=False) -> tuple[list[dict], list[dict]]:
    """Every case of one batch size, interleaved; returns (case records, skipped)."""
    prompt_len, new_tokens = settings["prompt_len"], settings["new_tokens"]
    specs, skipped = plan_cases(engine, adapters, batch, work, prompt_len, new_tokens)
    base = base_case(batch, work, prompt_len, new_tokens)
    gen = torch.Generator().manual_seed(settings["seed"] + batch)
    ids = torch.randint(min(3, engine.base.facts.vocab_size - 1), engine.base.facts.vocab_size, (batch, prompt_len),
                        generator=gen)
    rows = ids.tolist()
    ids = ids.to(engine.device)
    clocks: dict = {}
    classify = not (engine.base.facts.spec.is_causal or engine.base.facts.spec.is_seq2seq)
    with ExitStack() as stack:
        measured = _measure_request(clocks, stack, ids, 0 if classify else new_tokens, device)
        cases, meta = {}, {}
        for spec in [base, *specs]:
            def generate(_ids, n, entries=spec.entries):
                if classify:  # an encoder: one forward, its head's logits (a classification request)
                    engine.logits(_ids, adapters=entries)
                    return
                engine.generate_ids(rows, adapters=entries, max_new_tokens=n, eos_token_id=[])

            cases[spec.label] = Case(measured(engine.model, generate), spec.setup, spec.teardown)
            meta[spec.label] = ("adaptkit", spec.label, spec)
        if side is not None:
            plain_case, _ = peft_side.base_case(side, measured)
            cases[peft_side.BASE_LABEL] = plain_case
            meta[peft_side.BASE_LABEL] = ("transformers", "base", base)
            for spec in specs:
                case, _, why = peft_side.peft_case(side, spec, measured)
                if case is None:
                    skipped.append({"case": f"peft {spec.label}", "reason": why})
                    continue
                cases[f"peft {spec.label}"] = case
                meta[f"peft {spec.label}"] = ("peft", spec.label, spec)
        timings = time_interleaved(cases, baseline="base", repeats=settings["repeats"], warmup=settings["warmup"],
                                   device=device, progress=f"bench, batch {batch}" if progress else None)
        if side is not None:
            set_ratios({k: t for k, t in timings.items() if meta[k][0] != "adaptkit"}, peft_side.BASE_LABEL)
        peaks = _peak_memory(cases, device)
    records = []
    for label, timing in timings.items():
        engine_name, matches, spec = meta[label]
        base_label = "base" if engine_name == "adaptkit" else peft_side.BASE_LABEL
        records.append(_case_record(label, engine_name, matches, spec, timing, peaks[label], peaks[base_label][0],
                                    prompt_len, new_tokens))
    return records, skipped


def _adapter_records(adapters, loads, switches, cases) -> dict:
    out = {}
    for item in adapters:
        info = item.info
        out[item.name] = {"kind": info.kind, "path": item.path, "params": info.params, "nbytes": info.nbytes,
                          "details": info.details, "load_s": _figure(loads[item.name]),
                          "switch_s": _figure(switches[item.name])}
        merged = next((c for c in cases if c["engine"] == "adaptkit" and c["kind"] == "lora" and c["mode"] == "merged"
                       and c["adapters"] == [item.name] and "setup_s" in c), None)
        if merged is not None:
            both = [a + b for a, b in zip(merged["setup_s"]["samples_s"], merged["teardown_s"]["samples_s"])]
            out[item.name]["merge_unmerge_s"] = _figure(Timing(f"{item.name} merge+unmerge", both))
    return out


def bench(
    base: str | os.PathLike,
    adapters=(),
    batch: Sequence[int] = (1, 8),
    prompt_len: int = 128,
    new_tokens: int = 32,
    quantize: str | None = None,
    repeats: int = 10,
    warmup: int = 2,
    dtype: str = "float32",
    device: str = "cpu",
    compare: str | None = None,
    json_path: str | os.PathLike | None = None,
    plot_path: str | os.PathLike | None = None,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = False,
) -> BenchResult:
    """Measure the latency, throughput and memory each adapter adds to ``base``, in every mode that applies.

    Args:
        base: a causal LM folder. ``quantize="nf4"`` loads it in NF4 (``dtype`` is then the compute dtype).
        adapters: ``{name: path}``, or ``"name=path"`` / path strings; a fusion needs its adapters too.
        batch: batch sizes; every row of a batch generates from the same random prompt of ``prompt_len``.
        repeats, warmup: timed rounds and untimed warm-up rounds (all cases round-robin in each).
        compare: ``"peft"`` also runs every case PEFT has (LoRA, prefix, prompt) through PEFT.
        json_path, plot_path: write the record (every raw sample) and the PNG bar chart there.
        threads: torch CPU threads for the run (restored after); None keeps the current setting.
            On a loaded machine 1 thread is far steadier than several.
        progress: a progress bar per batch size, naming the case and round being timed.

    Example:
        >>> result = ak.bench("tiny-llama", {"sql": "adapters/sql"}, batch=(1, 8), json_path="bench.json")
        >>> print(result.table())
    """
    batch = [int(b) for b in batch]
    _check_settings(batch, prompt_len, new_tokens, repeats, warmup, compare)
    if threads is not None and threads < 1:
        raise InvalidArgumentError(f"threads must be >= 1, got {threads}")
    if plot_path is not None:
        from adaptkit.benchmarking.report import require_matplotlib

        require_matplotlib()  # before minutes of measuring, not after
    if compare == "peft":
        peft_side.require_peft()
    pairs = adapter_pairs(adapters)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        record = _measure(base, pairs, batch, prompt_len, new_tokens, quantize, repeats, warmup, dtype, device,
                          compare, seed, progress)
    finally:
        torch.set_num_threads(before)
    result = BenchResult(record)
    if json_path is not None:
        result.json_path = Path(json_path)
        result.json_path.parent.mkdir(parents=True, exist_ok=True)
        result.json_path.write_text(json.dumps(record, indent=1, default=str))
    if plot_path is not None:
        from adaptkit.benchmarking.report import plot_added_latency

        result.plot_path = plot_added_latency(record, plot_path)
    return result


def _measure(base, pairs, batch, prompt_len, new_tokens, quantize, repeats, warmup, dtype, device, compare,
             seed, progress=False) -> dict:
    """Everything ``bench`` measures, as the JSON record."""
    from adaptkit.benchmarking.overhead import base_work
    from adaptkit.engine import Engine

    engine = Engine.from_pretrained(base, dtype=dtype, quantize=quantize, device=device)
    facts = engine.base.facts
    if compare == "peft" and not (facts.spec.is_causal or facts.spec.is_seq2seq):
        raise EngineStateError(f"{base} is a {facts.model_type} encoder; --compare peft runs generation cases only")
    work = base_work(engine.model, facts)
    loaded, loads = _load_adapters(engine, pairs, repeats, warmup)
    switches = _switch_timings(engine, loaded, max(batch), repeats)
    side = None
    if compare == "peft":
        from adaptkit.base import load_base

        side = peft_side.load_peft_side(
            lambda: load_base(base, dtype=dtype, device=device, quantize=quantize).model, loaded)
    settings = {"base": str(base), "adapters": {n: p for n, p in pairs}, "batch": batch, "prompt_len": prompt_len,
                "new_tokens": new_tokens, "quantize": quantize, "dtype": dtype, "device": str(engine.device),
                "repeats": repeats, "warmup": warmup, "compare": compare, "seed": seed}
    cases, skipped = [], [{"adapter": a.name, "reason": f"no bench modes for kind {a.kind!r}"}
                          for a in loaded if a.kind in unknown_kinds(loaded)]
    if side is not None:
        skipped += side.skipped
    for size in batch:
        found, missed = _run_batch(engine, loaded, size, work, settings, side, engine.device, progress)
        cases += found
        skipped += missed
    return {
        "adaptkit_bench": RECORD_VERSION,
        "machine": machine_info(),
        "settings": settings,
        "model": {"model_type": facts.model_type, "hidden_size": facts.hidden_size, "num_layers": facts.num_layers,
                  "num_heads": facts.num_heads, "num_kv_heads": facts.num_kv_heads, "head_dim": facts.head_dim,
                  "vocab_size": facts.vocab_size, "linear_macs_per_token": work.linear_macs,
                  "parameters": sum(p.numel() for p in engine.model.parameters())},
        "adapters": _adapter_records(loaded, loads, switches, cases),
        "cases": cases,
        "skipped": [dict(s) for s in dict.fromkeys(tuple(sorted(s.items())) for s in skipped)],  # once each
    }
