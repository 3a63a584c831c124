"""Folding adapters into weights, and combining adapters with one another.

- ``checkpoint.py``: :func:`merge_checkpoint`, the streaming merge into a standalone checkpoint
  (shard by shard), and its verification against the unmerged adapters
- ``combine.py``: several LoRAs into one adapter (``merge --into-adapter``)
- ``extract.py``: a LoRA from the difference of a fine-tuned checkpoint and its base (SVD)
- ``recipe.py``: YAML/JSON recipes that run the above
- ``qlora.py``: merges on an NF4 base (dequantize, or re-quantize), NF4 bases saved
- ``gguf.py``: a merged model, or a LoRA, as GGUF for llama.cpp and Ollama (the format: ``formats/gguf.py``)
- ``methods/``: one file per combination method (linear, svd, ties, dare, magnitude_prune)

Imports the core (the LoRA math itself lives in ``adapters/lora.py``) and nothing from serving/,
training/ or benchmarking/.
"""
