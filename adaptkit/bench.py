"""Latency accounting: interleaved timing of several cases, medians, p90 and ratios to a baseline.

Machines here are shared and noisy, so cases are timed round-robin (case 1, case 2, ..., case 1,
...) within one run and compared by ratio to the baseline measured in the same rounds.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class Timing:
    """Samples (seconds) of one case and their summary."""

    name: str
    samples: list[float]
    median: float = 0.0
    p90: float = 0.0
    ratio: float | None = None  # median / baseline median
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.median = statistics.median(self.samples)
        self.p90 = percentile(self.samples, 90)


def percentile(samples: list[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` (0-100) of the samples."""
    ordered = sorted(samples)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    cases: Mapping[str, Callable[[], object]],
    baseline: str | None = None,
    repeats: int = 20,
    warmup: int = 3,
    device: torch.device | str | None = None,
) -> dict[str, Timing]:
    """Time every case ``repeats`` times, round-robin, after ``warmup`` rounds; ratios vs ``baseline``."""
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            _sync(device)
            start = time.perf_counter()
            cases[name]()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    timings = {name: Timing(name, s) for name, s in samples.items()}
    if baseline is not None:
        base = timings[baseline].median
        for timing in timings.values():
            timing.ratio = timing.median / base
    return timings


def machine_info() -> dict:
    """Versions, threads and machine facts recorded beside every benchmark result."""
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or _cpu_model(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
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


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux/macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024


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
