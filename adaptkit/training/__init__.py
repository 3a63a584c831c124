"""``adaptkit train`` / ``ak.train``: thin training wrappers over the modules the engine runs.

- ``loop.py``: :func:`train`, the optimizer loop, evaluation, checkpoints and resume
- ``methods.py``: one setup per method (lora, qlora, prefix, ptuning2, prompt, ptuning, ppt,
  bottleneck, fusion, pet), a static table of them
- ``virtual.py``: the unfolded, trainable forms of prefix and prompt adapters
- ``setup.py``: what a method setup hands the loop; ``data.py``: jsonl rows, tokenization, batches

Imports the core (engine, adapters, formats, quant) and nothing from serving/, benchmarking/ or merging/.
"""
