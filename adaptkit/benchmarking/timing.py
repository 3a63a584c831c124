"""Latency accounting: interleaved timing of several cases, medians, p90 and ratios to a baseline.

Machines here are shared and noisy, so cases are timed round-robin (case 1, case 2, ..., case 1,
...) within one run and compared by ratio to the baseline measured in the same rounds.

A case is a callable, or a :class:`Case` with untimed ``setup``/``teardown`` around each call (whose
durations are kept as parts: e.g. a LoRA's merge and unmerge). A case may return named parts of
its own time (``{"prefill": s, "decode_token": s}``, see :class:`ForwardClock`), summarised like
the whole. ``adaptkit bench`` (``run.py``) is built on these primitives.

torch is imported inside the functions that need it: ``adaptkit/__init__.py`` imports this module
at ``import adaptkit`` (see the note there on ``ak.bench``), which must stay fast.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class Timing:
    """Samples (seconds) of one case and their summary."""

    name: str
    samples: list[float]
    median: float = 0.0
    p90: float = 0.0
    ratio: float | None = None  # median / baseline median
    extra: dict = field(default_factory=dict)  # raw detail a case returned as lists, one entry per round
    parts: dict[str, Timing] = field(default_factory=dict)  # named parts of each sample (and setup/teardown)

    def __post_init__(self):
        self.median = statistics.median(self.samples)
        self.p90 = percentile(self.samples, 90)


@dataclass
class Case:
    """A timed callable with untimed ``setup``/``teardown`` around every call (their durations are kept)."""

    run: Callable[[], object]
    setup: Callable[[], object] | None = None
    teardown: Callable[[], object] | None = None


def percentile(samples: list[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` (0-100) of the samples."""
    ordered = sorted(samples)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _is_cuda(device: torch.device | str | None) -> bool:
    if device is None:
        return False
    import torch

    return torch.device(device).type == "cuda"


def _sync(device: torch.device | str | None) -> None:
    if _is_cuda(device):
        import torch

        torch.cuda.synchronize(device)


def _timed(step: Callable[[], object] | None, device) -> tuple[float | None, object]:
    if step is None:
        return None, None
    _sync(device)
    start = time.perf_counter()
    result = step()
    _sync(device)
    return time.perf_counter() - start, result


def time_interleaved(
    cases: Mapping[str, Callable[[], object] | Case],
    baseline: str | None = None,
    repeats: int = 20,
    warmup: int = 3,
    device: torch.device | str | None = None,
    progress: str | None = None,
) -> dict[str, Timing]:
    """Time every case ``repeats`` times, round-robin, after ``warmup`` rounds; ratios vs ``baseline``.

    A case returning a mapping adds parts: float values are samples of that part (summarised and
    compared with the baseline's part of the same name), lists are kept raw in ``Timing.extra``.
    ``progress``: a label; a progress bar then counts every case run, naming the case and round.
    """
    names = list(cases)
    steps = {name: c if isinstance(c, Case) else Case(c) for name, c in cases.items()}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=(warmup + repeats) * len(names), desc=progress, unit="case")
    for round_ in range(warmup):
        for name in names:
            for step in (steps[name].setup, steps[name].run, steps[name].teardown):
                if step is not None:
                    step()
            if bar is not None:
                bar.set_postfix_str(f"warm-up {round_ + 1}/{warmup}: {name}", refresh=False)
                bar.update()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    parts: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    extra: dict[str, dict[str, list]] = {name: {} for name in names}
    for round_ in range(repeats):
        for name in names:
            if bar is not None:
                bar.set_postfix_str(f"round {round_ + 1}/{repeats}: {name}", refresh=False)
                bar.update()
            case = steps[name]
            setup_s, _ = _timed(case.setup, device)
            run_s, result = _timed(case.run, device)
            teardown_s, _ = _timed(case.teardown, device)
            samples[name].append(run_s)
            found = dict(result) if isinstance(result, Mapping) else {}
            found.update({k: v for k, v in (("setup", setup_s), ("teardown", teardown_s)) if v is not None})
            for key, value in found.items():
                if isinstance(value, list):
                    extra[name].setdefault(key, []).append(value)
                else:
                    parts[name].setdefault(key, []).append(float(value))
    if bar is not None:
        bar.close()
    timings = {
        name: Timing(name, s, extra=extra[name], parts={k: Timing(f"{name}/{k}", v) for k, v in parts[name].items()})
        for name, s in samples.items()
    }
    if baseline is not None:
        set_ratios(timings, baseline)
    return timings


def set_ratios(timings: Mapping[str, Timing], baseline: str) -> None:
    """``ratio = median / baseline median`` for every timing and every part the baseline also has."""
    base = timings[baseline]
    for timing in timings.values():
        timing.ratio = timing.median / base.median
        for key, part in timing.parts.items():
            if key in base.parts and base.parts[key].median > 0:
                part.ratio = part.median / base.parts[key].median


class ForwardClock:
    """When each forward of a module ends (a forward hook, after a device sync), to split a
    generation into prefill and decode steps.

        with ForwardClock(model) as clock:
            clock.start()
            engine.generate_ids(prompts, max_new_tokens=n)
            prefill_s, step_s = clock.split(n)

    The prefill is the time from ``start()`` to the end of the first of the last ``n`` forwards
    (routing, cache set-up and any one-off forward before it included); each decode step is the
    time between consecutive forward ends: one new token for the whole batch with a KV cache, plus
    the sampling and bookkeeping between forwards.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device | str | None = None):
        self.module = module
        self.device = device
        self.started = 0.0
        self.ends: list[float] = []
        self._handle = None

    def __enter__(self) -> ForwardClock:
        self._handle = self.module.register_forward_hook(self._record)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def _record(self, module, args, output) -> None:
        _sync(self.device)
        self.ends.append(time.perf_counter())

    def start(self) -> None:
        self.ends.clear()
        _sync(self.device)
        self.started = time.perf_counter()

    def split(self, forwards: int) -> tuple[float, list[float]]:
        """(prefill seconds, [seconds of each decode step]) of the last ``forwards`` forwards."""
        if len(self.ends) < forwards:
            raise RuntimeError(f"expected {forwards} forwards since start(), saw {len(self.ends)}")
        ends = self.ends[-forwards:]
        return ends[0] - self.started, [b - a for a, b in zip(ends, ends[1:])]


def machine_info() -> dict:
    """Versions, threads and machine facts recorded beside every benchmark result."""
    import torch
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or _cpu_model(),
        "cpu_model": _lscpu_model() or _cpu_model(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # how busy the machine was
    }
    for package in ("peft", "bitsandbytes"):  # the version only: importing them costs seconds
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.platform()


def _lscpu_model() -> str | None:
    """``lscpu``'s "Model name" (what the README's figures name), None where lscpu is missing."""
    import shutil
    import subprocess

    if shutil.which("lscpu") is None:
        return None
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"^Model name:\s*(.+)$", out, flags=re.MULTILINE)
    return found.group(1).strip() if found else None


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak_memory(device: torch.device | str | None = None) -> str:
    """Start a new peak-memory window; returns what :func:`peak_memory_bytes` will measure.

    ``"cuda"``: ``torch.cuda.max_memory_allocated``. ``"rss"``: the process's resident peak
    (Linux ``VmHWM``, reset by writing 5 to ``/proc/self/clear_refs``). ``"rss-lifetime"``: the
    peak since the process started, where the window cannot be reset (macOS, locked-down /proc).
    """
    if _is_cuda(device):
        import torch

        torch.cuda.reset_peak_memory_stats(device)
        return "cuda"
    try:
        _CLEAR_REFS.write_text("5")
        return "rss"
    except OSError:
        return "rss-lifetime"


def peak_memory_bytes(device: torch.device | str | None = None) -> int:
    """Peak memory since :func:`reset_peak_memory` (see there for what is measured)."""
    if _is_cuda(device):
        import torch

        return torch.cuda.max_memory_allocated(device)
    try:
        found = re.search(r"^VmHWM:\s+(\d+) kB", _STATUS.read_text(), flags=re.MULTILINE)
    except OSError:
        found = None
    if found:
        return int(found.group(1)) * 1024
    from adaptkit.describe import peak_rss_bytes

    return peak_rss_bytes()


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of ``rows`` restricted to ``columns``."""
    def cell(value):
        if isinstance(value, float):
            return f"{value:.3g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(path: str | os.PathLike, rows: list[dict], timings: Mapping[str, Timing] | None = None, **meta) -> None:
    """JSON with machine info, the summary rows and every raw sample."""
    record = {"machine": machine_info(), "rows": rows, **meta}
    if timings:
        record["samples"] = {name: asdict(t) for name, t in timings.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=2, default=str))
