"""GGUF for llama.cpp and Ollama: a base with adapters merged (any merge :mod:`adaptkit.merging.checkpoint`
does), or a LoRA as llama.cpp's adapter file. The format itself (names, layouts, metadata, tokenizer) is
``formats/gguf.py``."""

from __future__ import annotations

import os
from pathlib import Path


def export_gguf(
    base: str | os.PathLike, out: str | os.PathLike, adapters=(), weights=None, outtype: str = "f16",
    method: str = "linear", force: bool = False, progress: bool = True, **method_params,
) -> tuple[Path, list[str]]:
    """Write ``base`` with ``adapters`` merged (any merge :func:`~adaptkit.merging.checkpoint.merge_checkpoint`
    does: several adapters, ``weights``, ``method``) as one GGUF file for llama.cpp and Ollama, tokenizer included.

    The merge runs in float32 into a temporary folder beside ``out``; the GGUF is then written from it one
    tensor at a time, as ``outtype`` (``f32``, ``f16``, ``bf16`` or ``q8_0``), and renamed to ``out`` when
    complete. Returns (the path, warnings: a pre-tokenizer llama.cpp may not name). Prefix and prompt
    adapters are refused: GGUF has no place for virtual tokens.

    Example:
        >>> export_gguf("SmolLM2-135M-Instruct", "sql.gguf", adapters=["adapters/sql"], outtype="q8_0")
    """
    import tempfile

    from adaptkit.base import read_config
    from adaptkit.formats import gguf as gguf_format
    from adaptkit.formats.checkpoint import atomic_output_file, check_not_an_input, open_checkpoint
    from adaptkit.hub import local_path
    from adaptkit.merging.checkpoint import merge_checkpoint

    gguf = gguf_format.require_gguf()
    _check_outtype(outtype)
    base = local_path(base)
    config = read_config(base)
    arch = gguf_format.architecture(config)
    _refuse_virtual(adapters)
    out = Path(out)
    check_not_an_input(out, [base])
    with atomic_output_file(out, force=force) as tmp, tempfile.TemporaryDirectory(dir=out.parent,
                                                                                   prefix=f".{out.name}.merge-") as work:
        source = base
        if adapters:
            source = merge_checkpoint(base, list(adapters), Path(work) / "merged", weights=weights, dtype="float32",
                                      method=method, progress=progress, **method_params)
        checkpoint = open_checkpoint(source)
        planned = gguf_format.plan_model(gguf, config, checkpoint.keys_and_shapes(), _transposed_keys(source), outtype)
        warnings = []

        def metadata(writer):
            writer.add_type("model")
            writer.add_name(base.name)
            writer.add_file_type(gguf_format.file_type(gguf, outtype))
            if outtype == "q8_0":
                writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            gguf_format.add_hyperparameters(writer, config, arch)
            warning = gguf_format.add_tokenizer(writer, gguf, base, config.vocab_size)
            if warning:
                warnings.append(warning)

        gguf_format.write_gguf(tmp, arch, metadata, planned, checkpoint.read_tensor, _progress("writing GGUF", progress))
    return out, warnings


def export_lora_gguf(
    adapter, base: str | os.PathLike, out: str | os.PathLike, outtype: str = "f16", force: bool = False,
) -> Path:
    """Write a LoRA ``adapter`` as llama.cpp's LoRA GGUF (``llama-server --lora``, Ollama's ``ADAPTER``), as
    its ``convert_lora_to_gguf.py`` writes one; ``base`` gives the architecture and the rotary layout (the
    base GGUF it runs on is :func:`export_gguf` of ``base`` alone).

    Example:
        >>> export_lora_gguf("adapters/sql", "SmolLM2-135M-Instruct", "sql-lora.gguf")
    """
    from adaptkit.base import read_config
    from adaptkit.describe import check_fits_checkpoint
    from adaptkit.formats import gguf as gguf_format
    from adaptkit.formats.checkpoint import atomic_output_file
    from adaptkit.formats.detect import load_lora_adapters
    from adaptkit.hub import local_path

    gguf = gguf_format.require_gguf()
    _check_outtype(outtype)
    _refuse_virtual([adapter])
    loaded = load_lora_adapters([adapter])[0]
    base = local_path(base)
    check_fits_checkpoint([loaded], base)
    config = read_config(base)
    arch = gguf_format.architecture(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    alpha, planned, tensors = gguf_format.lora_pairs(loaded, arch, config, names, outtype, gguf)

    def metadata(writer):
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_name(Path(str(loaded.source or "adapter")).name)
        writer.add_file_type(gguf_format.file_type(gguf, outtype))

    with atomic_output_file(out, force=force) as tmp:
        gguf_format.write_gguf(tmp, arch, metadata, planned, tensors.__getitem__)
    return Path(out)


def _check_outtype(outtype: str) -> None:
    from adaptkit.errors import InvalidArgumentError
    from adaptkit.formats.gguf import OUTTYPES

    if outtype not in OUTTYPES:
        raise InvalidArgumentError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")


def _refuse_virtual(adapters) -> None:
    """Prefix and prompt adapters (and other kinds that do not merge into weights) have no GGUF form."""
    from adaptkit.errors import UnsupportedAdapterError
    from adaptkit.formats.detect import detect_kind, is_model_folder

    for adapter in adapters:
        if not isinstance(adapter, (str, os.PathLike)) or is_model_folder(adapter):
            continue
        kind = detect_kind(adapter)
        if kind in ("prefix", "prompt"):
            raise UnsupportedAdapterError(
                f"{adapter}: a {kind} adapter adds virtual tokens, and GGUF has no place for them (llama.cpp runs "
                "weights only); export it with adaptkit export prefix-cache or serve it with adaptkit serve")
        if kind != "lora":
            raise UnsupportedAdapterError(f"{adapter}: a {kind} adapter does not merge into weights, so it has no GGUF "
                                          "form; only LoRA-family adapters do")


def _transposed_keys(folder: Path) -> set[str]:
    """The weights a checkpoint stores ``[in, out]`` (GPT-2's Conv1D), found on a meta-device copy."""
    from adaptkit.base import meta_model
    from adaptkit.inject import is_conv1d

    return {f"{name}.weight" for name, module in meta_model(folder).named_modules() if is_conv1d(module)}


def _progress(description: str, enabled: bool):
    from tqdm.auto import tqdm

    return lambda items: tqdm(items, desc=description, unit="tensor", disable=not enabled)
