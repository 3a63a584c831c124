"""Tiny random configs for every model type of the installed transformers, built from each type's own
default config with its sizes shrunk (no hand-written config per type). Used by the architecture sweep."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# config fields that size a model, and the tiny value each gets (where the config has the field)
TINY = {
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "embed_dim": 64, "dim": 64, "model_dim": 64,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "d_ff": 128, "ffn_hidden_size": 128,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "expert_intermediate_size": 32,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4,
    "num_key_value_heads": 2, "n_kv_heads": 2, "num_kv_heads": 2, "multi_query_group_num": 2,
    "head_dim": 16, "kv_channels": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "q_lora_rank": 32, "kv_lora_rank": 32,
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_k": 2, "num_shared_experts": 1, "n_shared_experts": 1,
    "vocab_size": 320, "max_position_embeddings": 512, "n_positions": 512, "seq_length": 512,
    "sliding_window": 512, "attention_chunk_size": 512,
}
SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
DOC = Path(__file__).resolve().parents[1] / "docs" / "model-support.md"


def causal_lm_types() -> list[str]:
    """Every model type transformers maps to a causal-LM class, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_config(model_type: str):
    """The type's default config with every size field made tiny; layer lists resized to 2 layers."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name, value in TINY.items():
        if name in text.to_dict() and isinstance(text.to_dict()[name], int) and text.to_dict()[name] is not None:
            setattr(text, name, value)
    for name, value in SPECIAL_IDS.items():
        if hasattr(text, name):
            setattr(text, name, value)
    layers = getattr(text, "num_hidden_layers", 2)
    for name, value in list(text.to_dict().items()):
        if isinstance(value, list) and len(value) > layers and name.endswith(("layer_types", "_layers_block_type")):
            setattr(text, name, value[:layers])
    return config


MAX_PARAMETERS = 5_000_000  # a size field the shrinking missed: not tiny, not built


def tiny_model(model_type: str, seed: int = 0):
    """A tiny random causal LM of ``model_type`` (float32, eval), or raises what building it raised."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    size = sum(p.numel() for p in skeleton.parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(f"{model_type}: {size:,} parameters after shrinking; a size field is not in TINY")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@dataclass
class TypeResult:
    """One model type's LoRA check: the largest differences, or why it was skipped."""

    model_type: str
    skipped: str | None = None
    changed: float = 0.0  # PEFT's LoRA vs the base: the adapter does something
    unmerged: float = float("nan")  # adaptkit vs PEFT
    mixed: float = float("nan")  # rows with and without the adapter in one batch vs each alone
    checkpoint: float = float("nan")  # the merged checkpoint in plain transformers vs PEFT's merge_and_unload
    parameters: bool = False  # the LoRA adapts parameters (fused experts, routers) as well as modules
    # prompt and prefix tuning: {kind: (adaptkit vs PEFT, mixed vs alone)} or {kind: why not run}
    virtual: dict = None
    bottleneck: object = None  # (change vs the base, mixed vs alone), or adaptkit's refusal


def check_lora_type(model_type: str, folder: Path) -> TypeResult:
    """Build, adapt with PEFT, serve and merge with adaptkit; the differences found (see the test)."""
    from peft import PeftModel, get_peft_model
    from peft_checks import save_random_base, save_trained
    from transformers import AutoModelForCausalLM

    import adaptkit as ak

    try:
        model = tiny_model(model_type)
        with torch.no_grad():
            model(input_ids=torch.randint(3, 300, (2, 5)))
        base = save_random_base(model, folder / "base")
    except Exception as exc:  # noqa: BLE001 - transformers' own tiny model does not build, run or save
        return TypeResult(model_type, skipped=f"transformers cannot run a tiny {model_type}: {type(exc).__name__}: "
                                               f"{str(exc)[:160]}")

    def load():
        return AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, attn_implementation="eager").eval()

    ids = torch.randint(3, 300, (3, 7), generator=torch.Generator().manual_seed(0))
    try:
        adapter = save_trained(get_peft_model(load(), _lora_config(load)), folder / "lora", std=0.1)
        with torch.no_grad():
            plain = load()(input_ids=ids).logits
            expected = PeftModel.from_pretrained(load(), str(adapter)).eval()(input_ids=ids).logits
            # the checkpoint's reference is PEFT's own merge: where a model reads a weight outside its module's
            # forward (Mamba's reference scan reads dt_proj.weight), unmerged and merged differ in PEFT too
            peft_merged = PeftModel.from_pretrained(load(), str(adapter)).merge_and_unload().eval()(input_ids=ids).logits
    except Exception as exc:  # noqa: BLE001 - PEFT itself refuses this LoRA
        return TypeResult(model_type, skipped=f"PEFT cannot serve an all-linear LoRA on {model_type}: "
                                               f"{type(exc).__name__}: {str(exc)[:160]}")
    import json

    result = TypeResult(model_type, changed=(expected - plain).abs().max().item(),
                        parameters=bool(json.loads((adapter / "adapter_config.json").read_text()).get("target_parameters")))
    engine = ak.Engine.from_pretrained(base)
    engine.add_adapter("a", adapter)
    result.unmerged = (engine.logits(ids, adapters="a") - expected).abs().max().item()
    mixed = engine.logits(ids, adapters=["a", None, "a"])
    result.mixed = max((mixed[0] - engine.logits(ids[:1], adapters="a")[0]).abs().max().item(),
                       (mixed[1] - engine.logits(ids[1:2])[0]).abs().max().item())
    merged = ak.merge_checkpoint(base, [adapter], folder / "merged", progress=False)
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32, attn_implementation="eager")
        result.checkpoint = (reloaded.eval()(input_ids=ids).logits - peft_merged).abs().max().item()
    result.bottleneck = _check_bottleneck(base, engine, ids)
    # an encoder run through its LM-head class without is_decoder is bidirectional: adaptkit serves it as an
    # encoder, the reference is PEFT's task for encoders without a head (FEATURE_EXTRACTION)
    task = "CAUSAL_LM" if engine.base.facts.spec.is_causal else "FEATURE_EXTRACTION"
    result.virtual = {kind: _check_virtual(kind, task, load, engine, ids, folder) for kind in ("prompt", "prefix")}
    return result


def _check_bottleneck(base: Path, engine, ids):
    """Mixed rows vs each alone for a random AdapterHub bottleneck (no reference runs on transformers 5), or
    adaptkit's refusal by name."""
    from adaptkit.demo import random_bottleneck
    from adaptkit.errors import AdaptkitError

    try:
        engine.add_adapter("bottleneck", random_bottleneck(base, "bottleneck", seed=4, std=0.5))
    except AdaptkitError as exc:
        return f"refused: {str(exc)[:160]}"
    alone, plain = engine.logits(ids, adapters="bottleneck"), engine.logits(ids)
    mixed = engine.logits(ids, adapters=["bottleneck", None, "bottleneck"])
    engine.remove_adapter("bottleneck")
    return ((alone - plain).abs().max().item(),
            max((mixed[0] - alone[0]).abs().max().item(), (mixed[1] - plain[1]).abs().max().item()))


def _lora_config(load):
    """All-linear, less the modules PEFT names as incompatible with the type (Mamba's out_proj, conv1d)."""
    import re

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    try:
        get_peft_model(load(), config)
    except ValueError as exc:
        found = re.search(r"Incompatible modules: \{([^}]*)\}", str(exc))
        if found is None:
            raise
        excluded = [name.strip(" '\"") for name in found.group(1).split(",")]
        config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=excluded)
    return config


def _check_virtual(kind: str, task: str, load, engine, ids, folder: Path):
    """(adaptkit vs PEFT, mixed vs alone) for a PEFT prompt or prefix adapter; a string where PEFT itself
    cannot run it, or adaptkit refuses it (the refusal's own words: a state-space layer, ...)."""
    from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from peft_checks import save_trained

    from adaptkit.errors import AdaptkitError

    config = (PromptTuningConfig if kind == "prompt" else PrefixTuningConfig)(task_type=task, num_virtual_tokens=4)
    try:
        adapter = save_trained(get_peft_model(load(), config), folder / kind, std=0.5)
        with torch.no_grad():
            expected = PeftModel.from_pretrained(load(), str(adapter)).eval()(input_ids=ids).logits[:, -ids.shape[1]:]
    except Exception as exc:  # noqa: BLE001 - PEFT itself cannot
        return f"PEFT cannot: {type(exc).__name__}: {str(exc)[:120]}"
    try:
        engine.add_adapter(kind, adapter)
    except AdaptkitError as exc:
        return f"refused: {str(exc).replace(f'{adapter}: ', '')[:200]}"
    alone = engine.logits(ids, adapters=kind)
    mixed = engine.logits(ids, adapters=[kind, None, kind])
    plain = engine.logits(ids)
    return ((alone - expected).abs().max().item(),
            max((mixed[0] - alone[0]).abs().max().item(), (mixed[1] - plain[1]).abs().max().item()))


def write_support_table(results: list[TypeResult], path: Path = DOC) -> None:
    """docs/model-support.md: every causal-LM type, LoRA as PEFT serves it, what adaptkit gives."""
    import peft
    import transformers

    rows = ["| model type | LoRA (all-linear) | LoRA vs PEFT: unmerged / checkpoint; mixed vs alone | prompt tuning | "
            "prefix tuning | bottleneck (mixed vs alone) |", "|---|---|---|---|---|---|"]

    def virtual(found) -> str:
        if isinstance(found, str):
            return found.replace("|", "/").replace("\n", " ")
        return ("equal to PEFT" if found[0] < 1e-4 and found[1] < 1e-5 else "DIFFERS") + f" ({found[0]:.0e})"

    def bottleneck(found) -> str:
        if isinstance(found, str):
            return found.replace("|", "/").replace("\n", " ")
        return ("served" if found[1] < 1e-5 else "DIFFERS") + f" ({found[1]:.0e})"

    for r in results:
        if r.skipped:
            rows.append(f"| `{r.model_type}` | not run: {r.skipped.replace('|', '/')} | | | | |")
            continue
        ok = r.unmerged < 1e-4 and r.checkpoint < 1e-4 and r.mixed < 1e-5
        what = ("equal to PEFT" if ok else "DIFFERS") + (" (experts and router through target_parameters)"
                                                          if r.parameters else "")
        rows.append(f"| `{r.model_type}` | {what} | {r.unmerged:.0e} / {r.checkpoint:.0e}; {r.mixed:.0e} | "
                    f"{virtual(r.virtual['prompt'])} | {virtual(r.virtual['prefix'])} | {bottleneck(r.bottleneck)} |")
    served = sum(1 for r in results if not r.skipped)
    path.write_text(
        "# Model types\n\n"
        f"Every causal-LM model type of transformers {transformers.__version__}, with a PEFT {peft.__version__} LoRA "
        "on every linear layer (`target_modules=\"all-linear\"`, less what PEFT calls incompatible with the type, as "
        "Mamba's `out_proj`; on mixture-of-experts types PEFT adds the fused "
        "experts and the router as `target_parameters`) on a tiny random model built from the type's own default "
        f"config. {served} of {len(results)} types run; the others are types whose tiny model transformers cannot "
        "build or run, or where PEFT refuses the LoRA itself. The checkpoint is compared with PEFT's `merge_and_unload` "
        "(on Mamba, whose reference scan reads `dt_proj.weight` directly, PEFT's unmerged and merged outputs differ). "
        "Generated by `python tests/model_zoo.py` "
        "(`tests/test_every_model_type.py` asserts the same for each type).\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":  # python tests/model_zoo.py: the sweep, into docs/model-support.md
    import tempfile
    import warnings

    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    results = []
    for name in causal_lm_types():
        with tempfile.TemporaryDirectory() as tmp:
            try:
                results.append(check_lora_type(name, Path(tmp)))
            except Exception as exc:  # noqa: BLE001 - adaptkit refused: shown in the table, failed by the test
                results.append(TypeResult(name, skipped=f"adaptkit FAILED: {type(exc).__name__}: {str(exc)[:160]}"))
        print(name, results[-1].skipped or "ok", flush=True)
    write_support_table(results)
