"""``adaptkit serve``: one base and many adapters behind an OpenAI-compatible HTTP API.

- ``server.py``: :class:`Server` (engine + scheduler + residency) and the ``serve`` entry point
- ``app.py``: the FastAPI app (routes, SSE streams, OpenAI-shaped errors)
- ``api.py``: request and response schema, validated field by field
- ``scheduler.py``: continuous batching on a thread of its own; ``batch.py``: joining and leaving rows
  of a running batch's KV cache
- ``residency.py``: which adapters stay in memory (LRU); ``metrics.py``: Prometheus counters;
  ``text.py``: detokenized streaming, stop strings, chat prompts
- ``--ray``: ``cluster.py`` (:class:`RayServer`: connect or start Ray, deploy), ``replica.py`` (the Ray Serve
  deployments: engine replicas with the adapter as the multiplexed model id, and the adapter registry),
  ``gateway.py`` (the front door: forwards to replicas, retries when one dies, federates /metrics)

Imports the core (engine, routing, generation, formats) and nothing from training/, benchmarking/
or merging/.
"""
