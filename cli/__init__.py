"""adaptkit's command line (installed as ``adaptkit.cli``), one module per command group:

- ``main``: the ``adaptkit`` group (errors, signals) and the assembly of the commands below; the entry point
- ``options``: what several commands share: value parsers and identically declared click options
- ``merge``: ``merge``, ``quantize`` and ``extract``
- ``inspect_command``: ``inspect`` (not ``inspect.py``: run as ``python cli/main.py``, it would shadow the stdlib)
- ``generate``: ``generate``
- ``demo``: ``demo``
- ``bench``: ``bench``
- ``serve``: ``serve``
- ``train``: ``train``
- ``export``: the ``export`` group: ``prefix-cache``, ``onnx`` and ``gguf``
"""
