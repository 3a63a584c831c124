"""``adaptkit bench`` / ``ak.bench``: the latency each adapter kind adds, measured side by side.

- ``timing.py``: the harness (warm-up, interleaved rounds, medians and p90s, peak memory, JSON records)
- ``cases.py``: what is measured for each adapter kind and mode (one static table)
- ``run.py``: :func:`bench`, which runs the cases against the base; ``report.py``: tables and the PNG
- ``peft_side.py``: the same cases through Hugging Face PEFT (``--compare peft``)
- ``overhead.py``: the overhead model (added multiply-accumulates per kind)

Imports the core and nothing from serving/, training/ or merging/.
"""
