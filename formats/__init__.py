"""Readers and writers of adapter and checkpoint layouts (installed as ``adaptkit.formats``).

- ``detect.py``: which layout a folder holds, and the reader for it
- ``peft.py``: PEFT's LoRA layout (and what its other layouts share); ``peft_prompt.py``: prefix tuning,
  P-tuning and prompt tuning; ``peft_types.py``: the other delta methods (LoHa, LoKr, IA3, VeRA, ...)
- ``adapterhub.py``: AdapterHub bottleneck adapters and fusions; ``pet.py``: PET pattern/verbalizer folders
- ``prefix_file.py``: adaptkit's own prefix-cache file; ``fields.py``: config fields checked by name
- ``checkpoint.py``: model checkpoints (shards, index) and atomic output; ``tensors.py``: tensor files
- ``onnx.py``: ONNX graphs with a KV cache; ``gguf.py``: GGUF for llama.cpp and Ollama
"""
