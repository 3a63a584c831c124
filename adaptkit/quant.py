"""4-bit NF4 bases through bitsandbytes: the only module that imports bitsandbytes.

QLoRA (Dettmers et al., 2023) stores each base linear weight ``W`` [out, in] as 4-bit codes of
the NormalFloat-4 grid, one absmax scale per block of 64 values (``W ~ code[q] * absmax[block]``)
and, with *double quantization*, the absmax themselves as 8-bit codes (blocks of 256) plus an
offset. Embeddings, the LM head and norms stay in the compute dtype.

bitsandbytes >= 0.49 changes a layer's storage on its first CPU forward where the CPU has
AVX512-BF16 (``Linear4bit.forward`` -> ``_convert_weight_packed_for_cpu``): the codes are
re-ordered into a [out, in/2] tiled layout (lossless) and the absmax are dequantized, transposed
and rounded to bfloat16 *in the same QuantState object* (lossy). Reading such a layer as if it
were still in the loaded layout gives garbage; reading its bf16 absmax gives weights that differ
from the ones loaded. So this module keeps, per layer, a shallow copy of the QuantState as it was
loaded (no tensor is copied: bitsandbytes replaces the tensors rather than writing into them) and
:func:`dequantize_weight` always returns the weights as loaded, whatever layout the layer is in now.
On such CPUs bitsandbytes also computes repacked layers in bfloat16, whatever the compute dtype.

Two kernels, and adaptkit decides which one runs when:

- the *inference* kernel: bitsandbytes' choice (on AVX512-BF16 CPUs the repacked bf16 ``gemv_4bit``,
  the one PEFT and transformers run). It has no autograd, and takes only layers with
  ``out_features % 32 == 0`` and ``in_features % 64 == 0``: :func:`choose_cpu_kernels` keeps the
  others on the generic kernel at load (still 4-bit) and names them.
- the *dequantizing* kernel, ``x @ deq(W)^T`` in the compute dtype, with autograd: training and exact
  references run inside :func:`dequantizing_kernels`, which puts every layer back in its loaded
  layout (exactly) and keeps it there until the block ends.
"""

from __future__ import annotations

import copy
import logging
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from adaptkit.errors import BaseModelError, InvalidArgumentError

QUANT_TYPES = {"nf4": "4-bit NormalFloat (QLoRA), blocks of 64"}
OPTIONS = ("double_quant", "skip_modules")  # what Engine.from_pretrained(..., quantize="nf4", **options) takes
BLOCKSIZE = 64  # transformers' BitsAndBytesConfig default for 4-bit weights
NESTED_BLOCKSIZE = 256  # bitsandbytes' block size for double-quantized absmax
_CPU_TILE = 32  # rows per tile in bitsandbytes' CPU layout (out_features must be a multiple)
_LISTED = 6  # layers named in a warning before "and N more"

# layer -> (the QuantState object it held when loaded, a shallow copy of that state's fields)
_LOADED_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_quantized(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear layer (``Linear4bit`` and its NF4/FP4 subclasses)."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def check_quantize(quantize: str) -> str:
    if quantize not in QUANT_TYPES:
        raise InvalidArgumentError(f"quantize={quantize!r} is not supported; known: {', '.join(sorted(QUANT_TYPES))}")
    return quantize


def skip_list(skip_modules: Sequence[str] | str | None) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]``; None -> ``[]``."""
    if isinstance(skip_modules, str):
        skip_modules = skip_modules.split(",")
    return [s.strip() for s in skip_modules or () if s.strip()]


def kept_dense_modules(skeleton: nn.Module, skip_modules: Sequence[str] | str | None = None) -> list[str]:
    """Modules left in the compute dtype: transformers' defaults (output embeddings, tied and last
    modules) plus ``skip_modules`` (names or patterns, as ``llm_int8_skip_modules``).

    transformers drops its defaults as soon as a skip list is given, so they are added back here.
    """
    from transformers.quantizers.base import get_keys_to_not_convert

    return sorted(set(get_keys_to_not_convert(skeleton)) | set(skip_list(skip_modules)))


def will_quantize(name: str, module: nn.Module, kept_dense: Sequence[str]) -> bool:
    """Whether transformers turns ``module`` (of a full-precision model) into a 4-bit layer."""
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.quantizers_utils import should_convert_module

    return (type(module) is nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, list(kept_dense))


def from_pretrained_kwargs(
    quantize: str,
    compute_dtype: torch.dtype,
    skeleton: nn.Module | None = None,
    device: str | torch.device = "cpu",
    double_quant: bool = True,
    skip_modules: Sequence[str] | str | None = None,
) -> dict:
    """``from_pretrained`` keyword arguments that load a base's linear layers in 4-bit NF4.

    Args:
        quantize: ``"nf4"``.
        compute_dtype: dtype of the 4-bit matmuls and of every module left unquantized.
        skeleton: the model on the meta device (for the default modules kept dense).
        double_quant: also quantize the absmax scales (QLoRA's double quantization).
        skip_modules: more modules to keep in ``compute_dtype`` (e.g. ``["mlp.down_proj"]``).
    """
    from transformers import BitsAndBytesConfig

    check_quantize(quantize)
    kept = None  # transformers' defaults
    if skip_list(skip_modules):
        assert skeleton is not None, "skip_modules needs the skeleton to keep transformers' default skips"
        kept = kept_dense_modules(skeleton, skip_modules)
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantize,
        bnb_4bit_use_double_quant=bool(double_quant),
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=kept,
    )
    return {"quantization_config": config, "device_map": {"": str(device)}}


def stored_quantization(config, where: str) -> str | None:
    """The quantization a saved base already carries (``config.json`` ``quantization_config``), if any."""
    stored = getattr(config, "quantization_config", None)
    if stored is None:
        return None
    stored = stored if isinstance(stored, dict) else stored.to_dict()
    method, quant_type = stored.get("quant_method"), stored.get("bnb_4bit_quant_type")
    if method != "bitsandbytes" or not stored.get("load_in_4bit") or quant_type not in QUANT_TYPES:
        raise BaseModelError(
            f"{where}: config.json quantization_config is {method} (4-bit: {stored.get('load_in_4bit')}, "
            f"type {quant_type}); adaptkit serves bitsandbytes NF4 bases only: save the base in 16/32-bit instead"
        )
    return quant_type


def remember_loaded_states(model: nn.Module) -> int:
    """Record every 4-bit layer's QuantState as loaded (call right after loading); returns the count."""
    count = 0
    for module in model.modules():
        if is_quantized(module):
            _remember(module)
            count += 1
    return count


def _remember(module: nn.Module) -> None:
    state = module.weight.quant_state
    _LOADED_STATES[module] = (state, copy.copy(state))


def _loaded_state(module: nn.Module):
    """The QuantState fields as loaded, if this layer's state object is still the one loaded."""
    entry = _LOADED_STATES.get(module)
    if entry is None or entry[0] is not module.weight.quant_state:
        return None
    return entry[1]


def is_cpu_packed(module: nn.Module) -> bool:
    """True once bitsandbytes has converted the layer to its AVX512-BF16 CPU layout."""
    return bool(getattr(module.weight.quant_state, "packing_format_for_cpu", False))


def _codes_from_cpu_layout(packed: torch.Tensor, state) -> torch.Tensor:
    """Invert bitsandbytes' CPU tiling exactly: packed [N, K/2] -> codes as loaded [N*K/2, 1] uint8.

    The CPU layout groups rows in tiles of 32; per tile and column pair the low nibbles hold rows
    0..31 and the high nibbles rows 32..63 of a 64-wide chunk (see
    ``bitsandbytes.functional._convert_weight_packed_for_cpu``). The loaded layout is row-major
    [N, K] with two codes per byte, the first in the high nibble.
    """
    n, k = state.shape
    chunks = packed.reshape(-1, _CPU_TILE)
    nibbles = torch.cat([chunks & 0xF, chunks >> 4], dim=-1)  # [-1, 64]: low then high
    # [N/32, K/2, 32, 2] -> [N/32, 32, K/2, 2] -> [N, K]: row-major codes
    codes = nibbles.reshape(n // _CPU_TILE, k // 2, _CPU_TILE, 2).transpose(1, 2).reshape(-1)
    pairs = (codes[0::2] << 4) | codes[1::2]
    return pairs.to(torch.uint8).reshape(state.original_qshape)


def _state_from_cpu_layout(state):
    """A plain QuantState from a CPU-layout one (absmax [K/64, N] bf16 -> [N*K/64] float32)."""
    from bitsandbytes.functional import QuantState

    absmax = state.absmax.T.reshape(-1).float()
    return QuantState(absmax, shape=state.shape, code=state.code, blocksize=state.blocksize,
                      quant_type=state.quant_type, dtype=state.original_dtype)


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as loaded, [out, in] float32, in whichever layout bitsandbytes holds it.

    After a CPU repack the codes are un-tiled (exact) and the absmax come from the state recorded
    at load; a layer never recorded falls back to the bf16 absmax its CPU kernel uses.
    """
    from bitsandbytes.functional import dequantize_4bit

    param = module.weight
    state = param.quant_state
    if state is None:
        raise InvalidArgumentError(f"{type(module).__name__} has no quant_state: it was never quantized (move it to a device)")
    loaded = _loaded_state(module)
    if is_cpu_packed(module):
        codes = _codes_from_cpu_layout(param.data, state)
        state = loaded if loaded is not None else _state_from_cpu_layout(state)
    else:
        codes = param.data
        state = loaded if loaded is not None else state
    return dequantize_4bit(codes, state).float()


def quantize_like(module: nn.Module, weight: torch.Tensor):
    """(codes, QuantState) of ``weight`` [out, in] with the layer's block size, type and storage.

    The same call ``Params4bit`` makes when transformers quantizes a weight at load; the weight is
    first cast to the dtype the layer's state dequantizes to (its load dtype).
    """
    from bitsandbytes.functional import quantize_4bit

    param = module.weight
    loaded = _loaded_state(module)
    if loaded is not None:
        dtype = loaded.dtype
    else:  # a CPU-layout state says bfloat16 but dequantized to original_dtype when loaded
        dtype = param.quant_state.original_dtype if is_cpu_packed(module) else param.quant_state.dtype
    return quantize_4bit(weight.to(dtype).contiguous(), blocksize=param.blocksize,
                         compress_statistics=param.compress_statistics, quant_type=param.quant_type,
                         quant_storage=param.quant_storage)


@dataclass(frozen=True)
class QuantSnapshot:
    """A 4-bit layer's storage at one moment: the very objects it held (nothing is copied).

    Merging gives the layer *new* code and state objects and never writes into these, so putting
    them back restores the layer bit for bit.
    """

    data: torch.Tensor
    state: object
    loaded: tuple | None


def snapshot(module: nn.Module) -> QuantSnapshot:
    """The layer's current storage, for :func:`restore`."""
    return QuantSnapshot(module.weight.data, module.weight.quant_state, _LOADED_STATES.get(module))


def replace_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Re-quantize ``weight`` [out, in] into the layer (its storage stays 4-bit).

    The layer then computes with ``Q(weight)``: the re-quantization error of NF4 is added (measure
    it with :func:`adaptkit.merging.qlora.relative_logit_error`). :func:`restore` undoes this exactly.
    """
    shape = tuple(module.weight.quant_state.shape)
    if tuple(weight.shape) != shape:
        raise InvalidArgumentError(f"new weight has shape {tuple(weight.shape)} but the 4-bit layer holds {shape}")
    codes, state = quantize_like(module, weight)
    module.weight.data = codes
    module.weight.quant_state = state
    module.quant_state = state
    _remember(module)


def restore(module: nn.Module, snapshot: QuantSnapshot) -> None:
    """Put back the storage recorded by :func:`snapshot` (bit-exact, same objects)."""
    module.weight.data = snapshot.data
    module.weight.quant_state = snapshot.state
    module.quant_state = snapshot.state
    if snapshot.loaded is None:
        _LOADED_STATES.pop(module, None)
    else:
        _LOADED_STATES[module] = snapshot.loaded


def restore_loaded_layout(model: nn.Module, lossy: bool = False) -> int:
    """Put CPU-repacked layers back in the layout they were loaded in, e.g. before saving.

    Exact for layers whose state was recorded at load. A layer loaded without adaptkit has only the
    bf16 scales left: with ``lossy=True`` bitsandbytes' own inverse re-quantizes those, otherwise the
    layer is left alone (``_save_to_state_dict`` converts it back itself). Returns the count converted.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    count = 0
    for module in model.modules():
        if not (is_quantized(module) and is_cpu_packed(module)):
            continue
        loaded = _loaded_state(module)
        if loaded is not None:
            data, state = _codes_from_cpu_layout(module.weight.data, module.weight.quant_state), copy.copy(loaded)
        elif lossy:
            data, state = _convert_weight_packed_for_cpu_inverse(module.weight.data, module.weight.quant_state)
        else:
            continue
        module.weight.data = data
        module.weight.quant_state = state
        module.quant_state = state
        if loaded is not None:
            _remember(module)
        count += 1
    return count


# ------------------------------------------------------------------ which kernel computes a layer
def _uses_cpu_repack(module: nn.Module) -> bool:
    """Whether bitsandbytes will repack this layer for its AVX512-BF16 kernel on a no-grad CPU forward."""
    return bool(getattr(module, "support_avx512bf16_for_cpu", False)) and module.weight.device.type == "cpu"


def cpu_kernel_misfit(module: nn.Module) -> str | None:
    """Why bitsandbytes' AVX512-BF16 kernel cannot take this layer (None when it can).

    Its layout tiles rows by 32 and reshapes the scales to [out, in / blocksize]
    (``functional._convert_weight_packed_for_cpu``).
    """
    out_features, in_features = module.weight.quant_state.shape
    blocksize = module.weight.quant_state.blocksize
    reasons = []
    if out_features % _CPU_TILE:
        reasons.append(f"out_features {out_features} is not a multiple of {_CPU_TILE}")
    if in_features % blocksize:
        reasons.append(f"in_features {in_features} is not a multiple of {blocksize}")
    return ", ".join(reasons) or None


def choose_cpu_kernels(model: nn.Module) -> dict[str, str]:
    """Keep layers that bitsandbytes' repacked CPU kernel cannot take on its generic kernel (call at load).

    Such a layer stays 4-bit and computes ``x @ deq(W)^T``; without this, its first inference forward
    fails inside bitsandbytes. Returns {layer name: why} and logs one warning naming them.
    """
    generic = {}
    for name, module in model.named_modules():
        if is_quantized(module) and _uses_cpu_repack(module):
            why = cpu_kernel_misfit(module)
            if why is not None:
                module.support_avx512bf16_for_cpu = False
                generic[name] = why
    if generic:
        shown = [f"{name} ({why})" for name, why in list(generic.items())[:_LISTED]]
        listed = "; ".join(shown) + (f"; and {len(generic) - _LISTED} more" if len(generic) > _LISTED else "")
        logging.getLogger("adaptkit").warning(
            "%d NF4 layer(s) compute with bitsandbytes' generic CPU kernel, not its AVX512-BF16 one: %s. "
            "They stay 4-bit and exact; to keep them dense instead, pass skip_modules (--skip-modules).",
            len(generic), listed)
    return generic


@contextmanager
def dequantizing_kernels(model: nn.Module) -> Iterator[None]:
    """Within the block every 4-bit layer computes ``x @ deq(W)^T`` with autograd, as loaded.

    Layers repacked for the CPU inference kernel are put back in their loaded layout (exactly, from
    the state recorded at load) and are not repacked while the block runs, so gradients reach the
    inputs of every layer; afterwards bitsandbytes may repack them again on the next no-grad forward.
    Training runs inside this block, and so do references that must not depend on the CPU
    (:func:`adaptkit.merging.qlora.qlora_merge_error`).
    """
    layers = [m for m in model.modules() if is_quantized(m) and hasattr(m, "support_avx512bf16_for_cpu")]
    flags = [m.support_avx512bf16_for_cpu for m in layers]
    restore_loaded_layout(model, lossy=True)
    for module in layers:
        module.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for module, flag in zip(layers, flags):
            module.support_avx512bf16_for_cpu = flag


# ------------------------------------------------------------------ memory accounting
def _state_nbytes(state) -> int:
    if state is None:
        return 0
    tensors = [state.absmax, state.code, getattr(state, "offset", None)]
    nested = getattr(state, "state2", None) if state.nested else None
    if nested is not None:
        tensors += [nested.absmax, nested.code]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def model_nbytes(model: nn.Module) -> int:
    """Bytes of a loaded model's parameters and buffers; 4-bit layers count codes + quant state."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        for tensor in tensors:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
            if hasattr(tensor, "quant_state"):
                total += _state_nbytes(tensor.quant_state)
    return total


def nf4_weight_nbytes(numel: int, double_quant: bool = True) -> int:
    """Bytes of one weight of ``numel`` values in NF4: codes + absmax (+ nested absmax) + code tables.

    codes ``numel/2``; absmax one per block of 64 (fp32, or uint8 with double quant plus one fp32
    per 256 blocks, a 256-entry fp32 code table and an fp32 offset); the 16-entry NF4 table in fp32.
    """
    blocks = -(-numel // BLOCKSIZE)
    codes = -(-numel // 2)
    if double_quant:
        nested_blocks = -(-blocks // NESTED_BLOCKSIZE)
        absmax = blocks + 4 * nested_blocks + 4 * 256 + 4
    else:
        absmax = 4 * blocks
    return codes + absmax + 4 * 16


def estimate_nbytes(
    skeleton: nn.Module, dtype: torch.dtype, quantize: str | None = None,
    double_quant: bool = True, skip_modules: Sequence[str] | str | None = None,
) -> int:
    """Bytes a base takes when loaded in ``dtype`` (and with ``quantize``), from shapes alone.

    ``skeleton`` is the model on the meta device; the count matches :func:`model_nbytes` of the
    loaded model.
    """
    kept = kept_dense_modules(skeleton, skip_modules) if quantize else []
    element = torch.empty((), dtype=dtype).element_size()
    quantized_params: set[int] = set()
    total = 0
    if quantize:
        for name, module in skeleton.named_modules():
            if will_quantize(name, module, kept):
                quantized_params.add(id(module.weight))
                total += nf4_weight_nbytes(module.weight.numel(), double_quant)
    seen: set[int] = set()
    for tensor in skeleton.parameters():  # parameters are loaded in dtype; buffers keep their own
        if id(tensor) not in seen and id(tensor) not in quantized_params:
            seen.add(id(tensor))
            total += tensor.numel() * (element if tensor.is_floating_point() else tensor.element_size())
    return total + sum(b.numel() * b.element_size() for b in skeleton.buffers())


# ------------------------------------------------------------------ training
def training_optimizer(params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """QLoRA's optimizer for the adapter parameters: bitsandbytes' paged 8-bit AdamW when they live on
    CUDA (optimizer state in 8-bit blocks, paged to CPU memory under pressure), plain AdamW elsewhere
    (bitsandbytes' paged optimizers need CUDA unified memory)."""
    params = list(params)
    if torch.cuda.is_available() and params and params[0].is_cuda:
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
