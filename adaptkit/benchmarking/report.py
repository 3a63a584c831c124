"""``adaptkit bench`` output: the terminal tables and the PNG bar chart of the latency each case adds.

Both read only the bench record (the JSON ``run.bench`` writes), so a saved record can be
re-rendered without measuring again.
"""

from __future__ import annotations

import os
from pathlib import Path

from adaptkit.benchmarking.timing import format_table
from adaptkit.errors import MissingDependencyError

_MIB = 2**20


def require_matplotlib():
    """``matplotlib.pyplot`` on the Agg backend (files only), or a clear error naming the extra."""
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingDependencyError(
            "--plot needs matplotlib, which is not installed; pip install 'adaptkit[bench]' (or pip install "
            "matplotlib), or drop --plot"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ms(figure: dict | None) -> str:
    if not figure:
        return ""
    return f"{figure['median_s'] * 1e3:.3g} / {figure['p90_s'] * 1e3:.3g}"


def _ratio(figure: dict | None) -> str:
    return "" if not figure or figure.get("ratio") is None else f"{figure['ratio']:.3f}"


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:+.1f}%"


def case_rows(record: dict) -> list[dict]:
    """One row per adaptkit case, with the matching PEFT case's columns when it was compared."""
    peft = {(c["batch"], c["matches"]): c for c in record["cases"] if c["engine"] in ("peft", "transformers")}
    rows = []
    for case in record["cases"]:
        if case["engine"] != "adaptkit":
            continue
        row = {
            "case": case["case"],
            "batch": case["batch"],
            "prefill ms (med / p90)": _ms(case["prefill_s"]),
            "prefill x base": _ratio(case["prefill_s"]),
            "decode ms/token (med / p90)": _ms(case["decode_token_s"]),
            "decode x base": _ratio(case["decode_token_s"]),
            "tokens/s": f"{case['tokens_per_s']['median']:.4g}" if case["tokens_per_s"] else "",
            "peak MiB (+ vs base)": f"{case['peak_memory_bytes'] / _MIB:.0f} ({case['added_memory_bytes'] / _MIB:+.1f})",
            "theory decode": _percent(case["theory"]["added_fraction_decode"]),
        }
        other = peft.get((case["batch"], case["case"]))
        if record["settings"].get("compare") == "peft":
            row["peft decode ms/token"] = _ms(other["decode_token_s"]) if other else "n/a"
            row["peft decode x base"] = _ratio(other["decode_token_s"]) if other else ""
        rows.append(row)
    return rows


def adapter_rows(record: dict) -> list[dict]:
    """One row per adapter: size, load time, switch time (and merge + unmerge for LoRA)."""
    rows = []
    for name, item in record["adapters"].items():
        merge = item.get("merge_unmerge_s")
        rows.append({
            "adapter": name,
            "kind": item["kind"],
            "params": f"{item['params']:,}",
            "load ms (med / p90)": _ms(item["load_s"]),
            "switch us (med / p90)": f"{item['switch_s']['median_s'] * 1e6:.3g} / {item['switch_s']['p90_s'] * 1e6:.3g}",
            "merge+unmerge ms (med / p90)": _ms(merge) if merge else "",
        })
    return rows


def format_bench(record: dict) -> str:
    """The terminal output: settings line, the cases table, the adapters table, what was skipped."""
    s, m = record["settings"], record["machine"]
    classify = all(c["decode_token_s"] is None for c in record["cases"])  # an encoder: classification forwards
    work = (f"one classification forward of {s['prompt_len']} tokens per row (the prefill columns)" if classify else
            f"prompt {s['prompt_len']} tokens, {s['new_tokens']} new tokens")
    lines = [
        f"adaptkit bench {s['base']}: {s['dtype']}{' NF4' if s['quantize'] else ''} on {s['device']}, {work}, "
        f"{s['repeats']} rounds after {s['warmup']} warm-up; {m['cpu_model']}, torch threads {m['threads']}, "
        f"torch {m['torch']}",
        "",
    ]
    case_table = case_rows(record)
    if case_table:
        lines.append(format_table(case_table, list(case_table[0])))
    adapters = adapter_rows(record)
    if adapters:
        lines += ["", format_table(adapters, list(adapters[0]))]
    for skip in record["skipped"]:
        where = skip.get("case") or skip.get("adapter")
        batch = f" (batch {skip['batch']})" if "batch" in skip else ""
        lines.append(f"skipped {where}{batch}: {skip['reason']}")
    return "\n".join(lines)


def plot_added_latency(record: dict, path: str | os.PathLike) -> Path:
    """A PNG: added prefill and decode latency (% over the base, median ratio - 1) per case and batch,
    PEFT hatched beside adaptkit when compared, the overhead model's added work as black dots."""
    plt = require_matplotlib()
    cases = [c for c in record["cases"] if c["engine"] in ("adaptkit", "peft") and c["kind"] != "base"]
    batches = sorted({c["batch"] for c in cases})
    widest = max(batches, key=lambda b: sum(c["batch"] == b for c in cases)) if batches else None
    labels = list(dict.fromkeys([c["matches"] for c in cases if c["batch"] == widest] + [c["matches"] for c in cases]))
    series = [(engine, b) for b in batches for engine in ("adaptkit", "peft")
              if any(c["engine"] == engine and c["batch"] == b for c in cases)]
    width = 0.8 / max(1, len(series))
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 0.9 * len(labels) + 3), 8), sharex=True)
    for ax, figure, theory_key, title in (
        (axes[0], "prefill_s", "added_fraction_prefill", "prefill"),
        (axes[1], "decode_token_s", "added_fraction_decode", "decode (per token)"),
    ):
        for i, (engine, batch) in enumerate(series):
            found = {c["matches"]: c for c in cases if c["engine"] == engine and c["batch"] == batch and c[figure]}
            xs = [j + (i - (len(series) - 1) / 2) * width for j, label in enumerate(labels) if label in found]
            ys = [100 * (found[label][figure]["ratio"] - 1) for label in labels if label in found]
            ax.bar(xs, ys, width, label=f"{engine}, batch {batch}", hatch="//" if engine == "peft" else None,
                   color=f"C{batches.index(batch)}", edgecolor="black", linewidth=0.4)
            if engine == "adaptkit":
                theory = [100 * found[label]["theory"][theory_key] for label in labels if label in found]
                ax.scatter(xs, theory, color="black", s=12, zorder=3,
                           label="overhead model" if i == 0 else None)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_ylabel(f"added {title} latency, % of base")
        ax.set_title(f"{title}: median ratio to the base measured in the same rounds, minus 1")
        ax.legend(fontsize=7)
    axes[1].set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    s, m = record["settings"], record["machine"]
    fig.suptitle(f"adaptkit bench: {s['dtype']}{' NF4' if s['quantize'] else ''}, prompt {s['prompt_len']}, "
                 f"{s['new_tokens']} new tokens; {m['cpu_model']}, torch threads {m['threads']}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
