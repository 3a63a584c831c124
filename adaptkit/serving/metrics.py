"""The server's counters, in Prometheus' text exposition format (``GET /metrics``).

Per model (the request's ``model``: an adapter name, the base's name, or ``mix`` for a weighted
``adapters`` mix): requests by outcome, prompt and generated tokens, request latency and time to
first token (histograms). Server-wide: queue depth, running rows, decode steps and rows decoded
(their ratio is the mean batch size), resident adapters, adapter loads and evictions.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict

from adaptkit.lora_stack import stack_memory

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Histogram:
    def __init__(self):
        self.counts = [0] * len(LATENCY_BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(LATENCY_BUCKETS):
            if value <= bound:
                self.counts[i] += 1
        self.total += 1
        self.sum += value


class ServeMetrics:
    """Thread-safe per-model counters; :meth:`render` adds the scheduler's and the pool's gauges."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str]] = Counter()  # (model, outcome)
        self.prompt_tokens: Counter[str] = Counter()
        self.generated_tokens: Counter[str] = Counter()
        self.latency: defaultdict[str, _Histogram] = defaultdict(_Histogram)
        self.first_token: defaultdict[str, _Histogram] = defaultdict(_Histogram)

    def finished(self, model: str, outcome: str, prompt_tokens: int, generated: int, seconds: float,
                 first_token_seconds: float | None) -> None:
        """Record one request at its end (outcome: stop, length, cancelled, timeout, error)."""
        with self._lock:
            self.requests[(model, outcome)] += 1
            if outcome == "error":  # refused at admission (e.g. context too long): nothing was served
                return
            self.prompt_tokens[model] += prompt_tokens
            self.generated_tokens[model] += generated
            self.latency[model].observe(seconds)
            if first_token_seconds is not None:
                self.first_token[model].observe(first_token_seconds)

    def rejected(self, model: str, outcome: str) -> None:
        """Record a request refused before it was queued (outcome: e.g. queue_full, invalid)."""
        with self._lock:
            self.requests[(model, outcome)] += 1

    def render(self, scheduler, base_name: str) -> str:
        snap = scheduler.snapshot()
        pool = scheduler.pool
        lines: list[str] = []

        def metric(name: str, kind: str, doc: str, samples) -> None:
            lines.append(f"# HELP {name} {doc}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{_labels(labels)} {_number(value)}" for labels, value in samples)

        with self._lock:
            metric("adaptkit_requests_total", "counter", "Requests by model and outcome.",
                   [({"model": m, "outcome": o}, n) for (m, o), n in sorted(self.requests.items())])
            metric("adaptkit_prompt_tokens_total", "counter", "Prompt tokens by model.",
                   [({"model": m}, n) for m, n in sorted(self.prompt_tokens.items())])
            metric("adaptkit_generation_tokens_total", "counter", "Generated tokens by model.",
                   [({"model": m}, n) for m, n in sorted(self.generated_tokens.items())])
            for name, doc, table in (
                ("adaptkit_request_latency_seconds", "Request latency, arrival to last token.", self.latency),
                ("adaptkit_time_to_first_token_seconds", "Arrival to first token.", self.first_token),
            ):
                lines.append(f"# HELP {name} {doc}")
                lines.append(f"# TYPE {name} histogram")
                for model, hist in sorted(table.items()):
                    for bound, count in zip(LATENCY_BUCKETS, hist.counts):
                        lines.append(f"{name}_bucket{_labels({'model': model, 'le': _number(bound)})} {count}")
                    lines.append(f"{name}_bucket{_labels({'model': model, 'le': '+Inf'})} {hist.total}")
                    lines.append(f"{name}_sum{_labels({'model': model})} {_number(hist.sum)}")
                    lines.append(f"{name}_count{_labels({'model': model})} {hist.total}")
        running = Counter(entry_label(e, base_name) for e in snap["running_entries"])
        metric("adaptkit_queue_depth", "gauge", "Requests waiting to join the batch.", [({}, snap["waiting"])])
        metric("adaptkit_running_requests", "gauge", "Rows in the running batch.", [({}, snap["running"])])
        metric("adaptkit_running_requests_by_model", "gauge", "Rows in the running batch by model.",
               [({"model": m}, n) for m, n in sorted(running.items())])
        stats = scheduler.stats
        metric("adaptkit_decode_steps_total", "counter", "Batched decode steps.", [({}, stats["steps"])])
        metric("adaptkit_decoded_rows_total", "counter", "Rows over all decode steps (/ steps = mean batch size).",
               [({}, stats["rows_decoded"])])
        metric("adaptkit_prefills_total", "counter", "Prefill mini-batches.", [({}, stats["prefills"])])
        metric("adaptkit_registered_adapters", "gauge", "Servable adapters, resident or not.", [({}, pool.count)])
        metric("adaptkit_resident_adapters", "gauge", "Adapters in memory.", [({}, len(snap["resident"]))])
        infos = scheduler.engine.adapters
        metric("adaptkit_resident_adapter_bytes", "gauge", "Bytes of each resident adapter's own tensors.",
               [({"adapter": a}, infos[a].nbytes) for a in sorted(snap["resident"]) if a in infos])
        stacks = stack_memory(scheduler.engine.model)
        metric("adaptkit_lora_stack_bytes", "gauge", "Bytes of the layers' stacked LoRA factors (batched path).",
               [({}, stacks["stacked"])])
        metric("adaptkit_lora_stack_padding_bytes", "gauge",
               "Of those, bytes holding no factor: ranks padded to their bucket, free slots.", [({}, stacks["padding"])])
        metric("adaptkit_adapter_loads_total", "counter", "Adapter loads from disk.",
               [({"adapter": a}, n) for a, n in sorted(pool.loads.items())])
        metric("adaptkit_adapter_evictions_total", "counter", "Adapters evicted (least recently used, idle).",
               [({"adapter": a}, n) for a, n in sorted(pool.evictions.items())])
        return "\n".join(lines) + "\n"


def routing_lines(routing: Counter) -> str:
    """A replica's ``adaptkit_routing_total``: requests for each adapter that found it resident (hit) or not."""
    lines = ["# HELP adaptkit_routing_total Requests naming an adapter, by whether this replica held it (hit) "
             "or had to load it (miss).", "# TYPE adaptkit_routing_total counter"]
    lines += [f"adaptkit_routing_total{_labels({'adapter': a, 'outcome': o})} {n}" for (a, o), n in sorted(routing.items())]
    return "\n".join(lines) + "\n"


def federate(texts: dict[str, str]) -> str:
    """One exposition from several replicas' (``{replica: text}``): each sample gains a ``replica`` label,
    each metric family keeps one HELP/TYPE header with every replica's samples under it."""
    families: dict[str, list[str]] = {}
    headers: dict[str, list[str]] = {}
    for replica, text in texts.items():
        family = None
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split()[2]
                headers.setdefault(family, [])
                if len(headers[family]) < 2 and line not in headers[family]:
                    headers[family].append(line)
                families.setdefault(family, [])
            elif line and family is not None:
                head, _, value = line.rpartition(" ")
                name, brace, labels = head.partition("{")  # labels: 'k="v",...}' or ''
                replica_label = f'replica="{_escape(replica)}"'
                labels = f"{replica_label},{labels}" if brace else f"{replica_label}}}"
                families[family].append(f"{name}{{{labels} {value}")
    lines = []
    for family, samples in families.items():
        lines += [*headers[family], *samples]
    return "\n".join(lines) + "\n"


def entry_label(entry, base_name: str) -> str:
    """The ``model`` label of a row entry: the adapter's name, the base's name, or ``mix``."""
    if entry is None:
        return base_name
    return entry if isinstance(entry, str) else "mix"


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + ",".join(escaped) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)
