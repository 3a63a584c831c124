"""GGUF, the file llama.cpp and Ollama run: a whole model, or a LoRA adapter for one.

A model is written as llama.cpp's ``convert_hf_to_gguf.py`` writes it: tensors under the names of
gguf's own map (``gguf.get_tensor_name_map``: ``blk.N.attn_q.weight``, ...), each transformed the way
llama.cpp reads it, the architecture's hyper-parameters and the tokenizer as ``general.*``,
``{arch}.*`` and ``tokenizer.ggml.*`` keys. What llama.cpp reads differently from the Hugging Face
layout, per architecture:

- ``llama`` (Llama, Mistral, SmolLM): Q and K rows permuted from the rotate-half to the interleaved
  rotary layout (per head, pairs ``(i, i + d/2)`` become ``(2i, 2i + 1)``);
- ``gemma``, ``gemma2``: RMSNorm weights stored as ``1 + w`` (Gemma's norm multiplies by ``1 + w``);
- ``gpt2``: Conv1D weights, stored ``[in, out]``, transposed to ``[out, in]``.

A LoRA adapter is written as ``convert_lora_to_gguf.py`` writes one: ``general.type = adapter``,
``adapter.type = lora``, ``adapter.lora.alpha``, and per adapted tensor ``<name>.lora_a`` ``[r, in]`` and
``<name>.lora_b`` ``[out, r]`` (B's rows permuted like the weight's). llama.cpp scales each pair by
``alpha / r``; a layer whose own scale differs from that (rsLoRA, rank or alpha patterns) has the
difference folded into its B.

Tensors are written one at a time: their headers first (shapes and types are known from the
checkpoint's index), then each tensor read, transformed, converted and appended.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adaptkit.errors import MissingDependencyError, UnsupportedAdapterError

ARCHITECTURES = {  # transformers model_type -> llama.cpp architecture
    "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
    "gemma": "gemma", "gemma2": "gemma2", "phi3": "phi3", "gpt2": "gpt2",
}
OUTTYPES = ("f32", "f16", "bf16", "q8_0")

# llama.cpp names a BPE pre-tokenizer by the hash of the ids its tokenizer gives CHECK_TEXT
# (convert_hf_to_gguf.py, get_vocab_base_pre); these are the ones of common model families
CHECK_TEXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
              "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
              "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
              "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "mpt",
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",
}


def require_gguf():
    """The gguf module, or a MissingDependencyError saying how to get it."""
    try:
        import gguf
    except ImportError as exc:
        raise MissingDependencyError("writing GGUF needs the gguf package; pip install 'adaptkit[gguf]' "
                                     "(or pip install gguf)") from exc
    return gguf


def architecture(config) -> str:
    """llama.cpp's architecture for a transformers config; an error naming the model type where adaptkit has none."""
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise UnsupportedAdapterError(
            f"model type {config.model_type!r} cannot be exported to GGUF by adaptkit (it writes "
            f"{', '.join(sorted(set(ARCHITECTURES)))}); export a merged checkpoint (adaptkit merge) and convert it "
            "with llama.cpp's convert_hf_to_gguf.py")
    scaling = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else "default"
    if kind not in ("default", None):
        raise UnsupportedAdapterError(f"{config.model_type} with rope scaling {kind!r}: adaptkit writes GGUF for "
                                      "the default rotary embedding only")
    return arch


@dataclass
class Planned:
    """One tensor of the output: its GGUF name, the source key, how to transform it, its stored type."""

    name: str
    key: str
    shape: tuple[int, ...]
    transform: Callable[[torch.Tensor], torch.Tensor]
    qtype: object  # gguf.GGMLQuantizationType


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Q/K rows from Hugging Face's rotate-half layout to llama.cpp's interleaved one (llama architecture)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def row_transform(arch: str, config, key: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The permutation llama.cpp expects of the output rows of ``key`` (a weight, bias or LoRA B), if any."""
    if arch != "llama":
        return None
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if ".q_proj." in key:
        return lambda t: permute_rotary(t, heads)
    if ".k_proj." in key:
        return lambda t: permute_rotary(t, kv_heads)
    return None


def stored_type(gguf, outtype: str, shape: tuple[int, ...]):
    """The GGML type a tensor is stored as: 1-D tensors (norms, biases) in F32, as llama.cpp's converter
    keeps them; Q8_0 only where rows are whole 32-value blocks (others F16)."""
    Q = gguf.GGMLQuantizationType
    if len(shape) < 2 or outtype == "f32":
        return Q.F32
    if outtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[outtype]


def encoded(gguf, tensor: torch.Tensor, qtype) -> np.ndarray:
    """``tensor`` as the bytes (or float array) GGUF stores for ``qtype``."""
    data = tensor.detach().to(torch.float32).contiguous().numpy()
    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return data
    if qtype == Q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def stored_nbytes(gguf, shape: tuple[int, ...], qtype) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def add_tensor_header(writer, gguf, name: str, shape: tuple[int, ...], qtype) -> None:
    Q = gguf.GGMLQuantizationType
    if qtype in (Q.F32, Q.F16):
        dtype = np.float32 if qtype == Q.F32 else np.float16
        writer.add_tensor_info(name, shape, np.dtype(dtype), stored_nbytes(gguf, shape, qtype))
    else:  # quantized: the writer takes the byte shape of its rows
        byte_shape = (*shape[:-1], shape[-1] // gguf.GGML_QUANT_SIZES[qtype][0] * gguf.GGML_QUANT_SIZES[qtype][1])
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), stored_nbytes(gguf, shape, qtype), raw_dtype=qtype)


def plan_model(gguf, config, shapes: dict[str, tuple[int, ...]], transposed: set[str], outtype: str) -> list[Planned]:
    """Every tensor of a checkpoint (``shapes``: key -> shape) under its GGUF name, with its transform.

    ``transposed``: the weights stored ``[in, out]`` (Conv1D). A key gguf's map does not name is an error
    (llama.cpp would not read it)."""
    arch = architecture(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    planned, unknown = [], []
    for key, shape in shapes.items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            if key.endswith(("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")):
                continue  # buffers transformers rebuilds, not weights
            unknown.append(key)
            continue
        steps = []
        if key in transposed:
            steps.append(lambda t: t.T)
            shape = tuple(reversed(shape))
        rows = row_transform(arch, config, key)
        if rows is not None:
            steps.append(rows)
        if arch in ("gemma", "gemma2") and key.endswith("norm.weight"):
            steps.append(lambda t: t + 1)

        def transform(t, steps=tuple(steps)):
            for step in steps:
                t = step(t)
            return t

        planned.append(Planned(name, key, tuple(shape), transform, stored_type(gguf, outtype, tuple(shape))))
    if unknown:
        raise UnsupportedAdapterError(f"{config.model_type}: llama.cpp has no name for {', '.join(unknown[:3])}"
                                      f"{' ...' if len(unknown) > 3 else ''}; this checkpoint cannot be written as GGUF")
    return planned


def rope_theta(config) -> float:
    """The rotary base, where transformers 5 keeps it (``rope_parameters``) or where 4.x did (``rope_theta``)."""
    parameters = getattr(config, "rope_parameters", None)
    if isinstance(parameters, dict) and "rope_theta" in parameters:
        return float(parameters["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def add_hyperparameters(writer, config, arch: str) -> None:
    """``{arch}.*``: what llama.cpp builds the graph from (block count, sizes, heads, norms, rotary base)."""
    if arch == "gpt2":
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_vocab_size(config.vocab_size)
    rotary = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
    writer.add_rope_dimension_count(rotary)
    if head_dim != config.hidden_size // heads or arch in ("qwen3", "gemma", "gemma2"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping or 0.0)
        writer.add_final_logit_softcapping(config.final_logit_softcapping or 0.0)
        writer.add_sliding_window(config.sliding_window)
    if arch == "phi3":
        writer.add_rope_scaling_orig_ctx_len(getattr(config, "original_max_position_embeddings", None)
                                             or config.max_position_embeddings)
        if getattr(config, "sliding_window", None):
            writer.add_sliding_window(config.sliding_window)


def add_tokenizer(writer, gguf, folder: Path, vocab_size: int) -> str | None:
    """``tokenizer.ggml.*`` from the folder's tokenizer.json: a byte-level BPE as llama.cpp's ``gpt2`` model
    (its pre-tokenizer named by hash where known, else ``default``), a byte-fallback BPE (a SentencePiece
    model converted: Llama 2, Mistral, Gemma, Phi-3) as its ``llama`` model; special ids, merges and the chat
    template as the converter writes them. Returns a warning where llama.cpp may pre-tokenize differently."""
    path = folder / "tokenizer.json"
    if not path.exists():
        raise UnsupportedAdapterError(f"{folder}: no tokenizer.json; GGUF carries the tokenizer, so the base folder "
                                      "needs one (save_pretrained of its fast tokenizer)")
    model = json.loads(path.read_text(encoding="utf-8"))["model"]
    if model.get("type") != "BPE":
        raise UnsupportedAdapterError(f"{path}: a {model.get('type')} tokenizer; adaptkit writes BPE tokenizers to GGUF")
    warning = None
    if model.get("byte_fallback"):
        vocab = gguf.LlamaHfVocab(folder)
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind)
        tokens, types = _padded(tokens, types, vocab_size, gguf)
        scores += [-1000.0] * (len(tokens) - len(scores))
        _add_vocab(writer, gguf, folder, "llama", "default", tokens, types, scores)
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    digest = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    pre = PRE_TOKENIZERS.get(digest)
    if pre is None:
        pre = "default"
        warning = (f"the tokenizer's pre-tokenizer is not one llama.cpp names (hash {digest[:12]}...): written as "
                   "'default', so llama.cpp may split some text differently from transformers")
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    tokens, types = [], []
    for i in range(max(vocab_size, len(by_id))):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            special = tokenizer.added_tokens_decoder[i].special
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    _add_vocab(writer, gguf, folder, "gpt2", pre, tokens, types)
    return warning


def _add_vocab(writer, gguf, folder: Path, model: str, pre: str, tokens: list, types: list, scores=None) -> None:
    """The ``tokenizer.ggml.*`` keys of one vocabulary, with the folder's special ids, flags, chat template and
    (a ``gpt2`` BPE) merges."""
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if scores is not None:
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=model == "gpt2", n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _padded(tokens: list, types: list, vocab_size: int, gguf) -> tuple[list, list]:
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        types.append(gguf.TokenType.UNUSED)
    return tokens, types


def write_gguf(out: Path, arch: str, metadata: Callable, planned: list[Planned],
               read: Callable[[str], torch.Tensor], progress: Callable[[Iterator], Iterator] = iter) -> None:
    """Write ``out``: ``metadata(writer)`` adds the keys, then every planned tensor's header, then each tensor
    read (``read(key)``), transformed and converted, one in memory at a time."""
    gguf = require_gguf()
    writer = gguf.GGUFWriter(str(out), arch, use_temp_file=False)
    try:
        metadata(writer)
        for item in planned:
            add_tensor_header(writer, gguf, item.name, item.shape, item.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for item in progress(planned):
            data = encoded(gguf, item.transform(read(item.key).to(torch.float32)), item.qtype)
            writer.write_tensor_data(data)
    finally:
        writer.close()


def file_type(gguf, outtype: str):
    """``general.file_type``: the type most tensors have."""
    kinds = gguf.LlamaFileType
    return {"f32": kinds.ALL_F32, "f16": kinds.MOSTLY_F16, "bf16": kinds.MOSTLY_BF16, "q8_0": kinds.MOSTLY_Q8_0}[outtype]


def lora_pairs(adapter, arch: str, config, names, outtype: str, gguf) -> tuple[float, list[Planned], dict]:
    """(alpha, the ``lora_a``/``lora_b`` tensors planned, those tensors by key) of a plain-LoRA ``adapter``.

    llama.cpp scales each pair by ``alpha / r``: alpha is the first layer's ``scale * r``, and a layer whose
    scale differs (rank or alpha patterns) carries the ratio in its B; rsLoRA's ``alpha / sqrt(r)`` is such a
    scale. DoRA, LoRA biases and delta kinds other than plain factors are refused by name."""
    if adapter.config.use_dora:
        raise UnsupportedAdapterError(f"{adapter.source}: DoRA has no GGUF adapter form (llama.cpp adds B A only); "
                                      "export the merged model instead (adaptkit export gguf BASE --adapter ...)")
    alpha, planned, tensors = None, [], {}
    for module, weights in adapter.layers.items():
        if getattr(weights, "exact_only", False) or not hasattr(weights, "lora_A") or \
                weights.magnitude is not None or weights.lora_B_bias is not None:
            raise UnsupportedAdapterError(
                f"{adapter.source}: {module} is not a plain LoRA pair ({type(weights).__name__}); llama.cpp's LoRA "
                "GGUF holds B A factors only: export the merged model instead")
        name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if name is None:
            raise UnsupportedAdapterError(f"{adapter.source}: llama.cpp has no tensor for {module}")
        alpha = weights.scale * weights.rank if alpha is None else alpha
        ratio = weights.scale * weights.rank / alpha
        rows = row_transform(arch, config, f"{module}.weight")

        def lora_b(B, ratio=ratio, rows=rows):
            B = B * ratio if ratio != 1.0 else B
            return rows(B) if rows is not None else B

        for suffix, tensor, transform in ((".lora_a", weights.lora_A, lambda A: A), (".lora_b", weights.lora_B, lora_b)):
            shape = tuple(tensor.shape)
            tensors[module + suffix] = tensor.detach()
            planned.append(Planned(name + suffix, module + suffix, shape, transform, stored_type(gguf, outtype, shape)))
    if not planned:
        raise UnsupportedAdapterError(f"{adapter.source}: no LoRA layer to write")
    return alpha, planned, tensors
