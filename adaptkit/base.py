"""Loading a base model: the only place ``from_pretrained`` is called on a base.

Also the base *fingerprint*: a short digest of the architecture, the sizes and a few
embedding rows, written into what adaptkit saves so that a wrong base/adapter pair is caught.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from adaptkit.arch import ModelFacts, facts_from_config, family_of_class, model_class_for, skeleton_of
from adaptkit.errors import BaseModelError, InvalidArgumentError
from adaptkit.hub import local_path
from adaptkit.measured import facts_of

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}

FINGERPRINT_ROWS = 4  # embedding rows hashed into the fingerprint


def parse_dtype(dtype: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """``"bf16"``/``"bfloat16"``/``torch.bfloat16`` -> ``torch.bfloat16``; None -> ``default``."""
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise InvalidArgumentError(f"dtype {dtype} is not supported; use one of {', '.join(DTYPES)}")
        return dtype
    name = _DTYPE_ALIASES.get(str(dtype), str(dtype))
    if name not in DTYPES:
        raise InvalidArgumentError(f"dtype {dtype!r} is not supported; use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def checkpoint_dtype(config) -> torch.dtype:
    """``dtype="auto"``: the dtype the checkpoint was saved in (config ``dtype`` / ``torch_dtype``), float32
    when it names none or one adaptkit does not compute in."""
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(stored).removeprefix("torch.") if stored is not None else None
    return DTYPES.get(name, torch.float32)


def read_config(path: str | os.PathLike):
    """The transformers config of a base folder, with a clear error when it is not one."""
    from transformers import AutoConfig

    path = local_path(path)
    if not (path / "config.json").is_file():
        raise BaseModelError(f"{path}: no config.json; give the folder of a Hugging Face model (save_pretrained output)")
    try:
        return AutoConfig.from_pretrained(str(path))
    except Exception as exc:  # transformers raises many types here
        raise BaseModelError(f"{path / 'config.json'}: cannot be read as a transformers config ({exc})") from exc


def fingerprint_of(facts: ModelFacts, embedding_rows: torch.Tensor) -> str:
    """Digest of sizes + the first embedding rows (rounded to bf16, so fp32/bf16 copies agree)."""
    digest = hashlib.sha256()
    sizes = [facts.family, facts.hidden_size, facts.num_layers, facts.num_heads, facts.num_kv_heads, facts.vocab_size]
    digest.update(json.dumps(sizes).encode())
    rows = embedding_rows[:FINGERPRINT_ROWS].detach().to("cpu", torch.bfloat16).to(torch.float32).contiguous()
    digest.update(rows.numpy().tobytes())
    return f"{facts.family}-{digest.hexdigest()[:16]}"


def _quiet_transformers() -> None:
    """transformers' own per-load progress bars and advisory logs would drown adaptkit's output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # on AVX512-BF16 CPUs bitsandbytes says on import that the optional `kernels` package is missing and
    # uses its own kernel, the one adaptkit expects (see quant.py): advice to its developers, not to users
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


@dataclass
class LoadedBase:
    """A base model in memory, with what adaptkit needs to know about it."""

    model: nn.Module
    tokenizer: object | None
    facts: ModelFacts
    path: Path
    dtype: torch.dtype
    fingerprint: str
    quantize: str | None = None
    generic_kernel_layers: dict[str, str] = field(default_factory=dict)  # NF4 layers bitsandbytes' CPU kernel can't take


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved beside a model, or None when the folder has none."""
    path = local_path(path)
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")
    if not any((path / n).is_file() for n in names):
        return None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise BaseModelError(f"{path}: the tokenizer files cannot be loaded ({exc})") from exc
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def _quantize_kwargs(path: Path, config, quantize: str | None, dtype: torch.dtype, device, options: dict):
    """(quantization in effect, extra ``from_pretrained`` kwargs): asked for, or already in config.json."""
    from adaptkit import quant

    stored = quant.stored_quantization(config, str(path / "config.json"))
    if stored is not None:
        if options or quantize not in (None, stored):
            asked = ", ".join([f"quantize={quantize!r}"] * (quantize is not None) + sorted(options))
            raise InvalidArgumentError(
                f"{path} is already quantized ({stored}, settings in config.json); drop {asked} to load it as saved"
            )
        return stored, {"device_map": {"": str(device)}}
    if quantize is None:
        if options:
            raise InvalidArgumentError(f"options {', '.join(sorted(options))} only apply with quantize='nf4'")
        return None, {}
    unknown = sorted(set(options) - set(quant.OPTIONS))
    if unknown:
        raise InvalidArgumentError(
            f"unknown quantization option(s) {', '.join(unknown)}; known: compute_dtype, {', '.join(quant.OPTIONS)}"
        )
    skeleton = meta_model(path) if quant.skip_list(options.get("skip_modules")) else None
    return quantize, quant.from_pretrained_kwargs(quantize, dtype, skeleton=skeleton, device=device, **options)


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device this torch and machine can use, or an error saying which can."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidArgumentError(f"device {device!r} is not a device name (use cpu, cuda or cuda:N)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
            raise InvalidArgumentError(f"device {str(device)!r}: {build}; use --device cpu (or install a CUDA torch "
                                       "on a machine with a GPU)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidArgumentError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type not in ("cpu", "mps", "xpu"):
        raise InvalidArgumentError(f"device {str(device)!r} is not supported; use cpu or cuda")
    return device


def load_base(
    path: str | os.PathLike,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device = "cpu",
    quantize: str | None = None,
    quantize_options: dict | None = None,
    attn_implementation: str = "eager",
) -> LoadedBase:
    """Load a Hugging Face model folder (single or sharded safetensors; ``.bin`` weights-only).

    Args:
        path: folder written by ``save_pretrained``.
        dtype: ``float32`` | ``float16`` | ``bfloat16`` (the compute dtype with ``quantize``), or
            ``"auto"``: the checkpoint's own dtype.
        device: where the weights go.
        quantize: None, or ``"nf4"`` for a 4-bit NF4 base (bitsandbytes, see ``quant.py``). A folder
            saved in NF4 (``config.json`` has a ``quantization_config``) loads in NF4 without it.
        quantize_options: ``double_quant`` (default True), ``skip_modules`` (kept in ``dtype`` besides
            the output embeddings), ``compute_dtype`` (overrides ``dtype``).
        attn_implementation: ``"eager"`` (exact, default) or ``"sdpa"``.

    Example:
        >>> base = load_base("tiny-llama", dtype="bfloat16")
    """
    path = local_path(path)
    device = check_device(device)
    config = read_config(path)
    torch_dtype = checkpoint_dtype(config) if dtype == "auto" else parse_dtype(dtype)
    facts = facts_from_config(config)
    weight_files = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    if not weight_files:
        raise BaseModelError(f"{path}: no *.safetensors or *.bin weight files next to config.json")
    cls = model_class_for(config)
    _quiet_transformers()
    options = dict(quantize_options or {})
    if "compute_dtype" in options:  # Engine.from_pretrained(..., quantize="nf4", compute_dtype=...)
        torch_dtype = parse_dtype(options.pop("compute_dtype"))
    kwargs = dict(dtype=torch_dtype, attn_implementation=attn_implementation, weights_only=True)
    quantize, quantize_kwargs = _quantize_kwargs(path, config, quantize, torch_dtype, device, options)
    kwargs.update(quantize_kwargs)
    try:
        model = cls.from_pretrained(str(path), **kwargs)
    except Exception as exc:
        raise BaseModelError(f"{path}: transformers could not load the weights ({type(exc).__name__}: {exc})") from exc
    generic_kernel_layers = {}
    if quantize is None:
        model.to(device)
    else:
        from adaptkit import quant

        quant.remember_loaded_states(model)  # before any forward can change bitsandbytes' layout
        generic_kernel_layers = quant.choose_cpu_kernels(model)
    model.eval()
    model.requires_grad_(False)
    embed = model.get_input_embeddings().weight
    return LoadedBase(
        model=model,
        tokenizer=load_tokenizer(path),
        facts=facts_of(model),  # the K/V layout measured from the model, before any adapter is injected
        path=path,
        dtype=torch_dtype,
        fingerprint=fingerprint_of(facts, embed),  # from the config alone, as checkpoint_fingerprint computes it
        quantize=quantize,
        generic_kernel_layers=generic_kernel_layers,
    )


def check_made_for(adapter, facts: ModelFacts, fingerprint: str | None) -> None:
    """Raise :class:`AdapterMismatchError` when the adapter records another base than this one."""
    from adaptkit.errors import AdapterMismatchError

    source = getattr(adapter, "source", None) or "adapter"
    recorded = getattr(adapter, "fingerprint", None)
    if recorded and fingerprint and recorded != fingerprint:
        raise AdapterMismatchError(
            f"{source}: made for base {recorded}, but this base is {fingerprint}; load it on the base it was trained on"
        )
    base_class = getattr(adapter, "base_class", None)
    other = family_of_class(base_class) if base_class else None
    if other is not None and other != facts.family:
        raise AdapterMismatchError(
            f"{source}: made for a {base_class} ({other} family) but the base is a {facts.model_type} "
            f"({facts.family} family); use a base of the architecture it was trained on"
        )


def meta_model(path: str | os.PathLike) -> nn.Module:
    """The base's module tree on the meta device: names and shapes without reading any weight."""
    return skeleton_of(read_config(path))


def checkpoint_fingerprint(checkpoint, config) -> str | None:
    """The base fingerprint computed from files (no model built); None if no embedding key is found."""
    facts = facts_from_config(config)
    shapes = checkpoint.keys_and_shapes()
    key = next((k for k in facts.spec.embedding_keys if k in shapes), None)
    if key is None:
        return None
    return fingerprint_of(facts, checkpoint.read_tensor(key))
