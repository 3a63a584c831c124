"""``adaptkit bench --compare peft``: the same cases through Hugging Face PEFT on a plain transformers base.

Two extra copies of the base are loaded (``base.load_base``, as the engine loads it): one carries
PEFT's LoRA layers (every LoRA under test, for ``set_adapter``, ``merge_adapter`` and mixed
batches with ``adapter_names``); the other stays plain, for the ``base (transformers)`` case that
PEFT's ratios are taken against, and under PEFT's prefix / prompt wrappers, which inject nothing.

Generation mirrors PEFT's own ``generate``: the prefill goes through the ``PeftModel`` (which adds
the prefix or the soft prompt), each decode step through the model holding the adapter's layers
with the returned KV cache. (PEFT 0.21's ``generate`` itself cannot be timed on transformers 5:
it passes the cache under its old name and loses the prefix after the first step.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from adaptkit.benchmarking.cases import BenchAdapter, CaseSpec
from adaptkit.benchmarking.timing import Case
from adaptkit.errors import MissingDependencyError
from adaptkit.measured import cache_argument

BASE_LABEL = "base (transformers)"
PEFT_BASE_ROW = "__base__"  # PEFT's adapter_names entry for a row without an adapter


def require_peft() -> None:
    """Raise unless PEFT can be imported."""
    try:
        import peft  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            "--compare peft needs Hugging Face PEFT, which is not installed; pip install 'adaptkit[test]' "
            "(or pip install peft), or drop --compare"
        ) from exc


@dataclass
class PeftSide:
    """The PEFT models of one bench run."""

    plain: torch.nn.Module  # transformers model without adapters
    lora: torch.nn.Module | None = None  # PeftModel with every LoRA, on its own copy of the base
    prompt_learning: dict[str, torch.nn.Module] = field(default_factory=dict)  # name -> PeftModel over plain
    skipped: list[dict] = field(default_factory=list)  # adapters PEFT could not load, and why

    def hf_model(self, peft_model) -> torch.nn.Module:
        """The transformers model whose forwards a PeftModel runs (where its ForwardClock hooks)."""
        return peft_model.get_base_model()


def load_peft_side(load_copy: Callable[[], torch.nn.Module], adapters: Sequence[BenchAdapter]) -> PeftSide:
    """Load the adapters PEFT has (LoRA, prefix, prompt) into PEFT; note the ones it fails on."""
    from peft import PeftModel

    side = PeftSide(plain=load_copy())
    loras = [a for a in adapters if a.kind == "lora"]
    for item in loras:
        try:
            if side.lora is None:
                side.lora = PeftModel.from_pretrained(load_copy(), item.path, adapter_name=item.name).eval()
            else:
                side.lora.load_adapter(item.path, adapter_name=item.name)
        except Exception as exc:  # PEFT's own errors are of many types; report, do not stop the bench
            side.skipped.append({"adapter": item.name, "reason": f"PEFT could not load {item.path}: {exc}"})
    for item in adapters:
        if item.kind not in ("prefix", "prompt"):
            continue
        try:
            side.prompt_learning[item.name] = PeftModel.from_pretrained(side.plain, item.path).eval()
        except Exception as exc:
            side.skipped.append({"adapter": item.name, "reason": f"PEFT could not load {item.path}: {exc}"})
    return side


@torch.inference_mode()
def peft_generate(prefill_model, step_model, ids: torch.Tensor, new_tokens: int, **forward_kw) -> None:
    """Greedy generation as PEFT's ``generate`` runs it (see the module docstring); ids [B, S]."""
    batch = ids.shape[0]
    out = prefill_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **forward_kw)
    cache = out.past_key_values
    mask = torch.ones(batch, cache.get_seq_length(), dtype=ids.dtype, device=ids.device)  # virtual tokens too
    cache_kw = cache_argument(step_model.get_base_model() if hasattr(step_model, "get_base_model") else step_model)
    for _ in range(new_tokens - 1):
        token = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=mask.device)], dim=1)
        out = step_model(input_ids=token, attention_mask=mask, use_cache=True, **{cache_kw: cache}, **forward_kw)


def peft_case(side: PeftSide, spec: CaseSpec, measured: Callable) -> tuple[Case | None, torch.nn.Module | None, str]:
    """(the PEFT case matching ``spec``, the model it runs on, '') or (None, None, why there is none).

    ``measured(model, generate)`` wraps a generate callable into a timed run on ``model``'s clock.
    """
    if spec.peft is None:
        return None, None, f"PEFT has no {spec.kind} {spec.mode} mode"
    if spec.peft == "prompt_learning":
        model = side.prompt_learning.get(spec.adapters[0])
        if model is None:
            return None, None, "PEFT could not load the adapter"
        base = side.hf_model(model)
        return Case(measured(base, lambda ids, n: peft_generate(model, base, ids, n))), base, ""
    model = side.lora
    if model is None or any(name not in model.peft_config for name in spec.adapters):
        return None, None, "PEFT could not load the adapter"
    hf = side.hf_model(model)
    name = spec.adapters[0]
    if spec.peft == "mixed":
        rows = [PEFT_BASE_ROW if o is None else o.name for o in spec.owners]
        return Case(measured(hf, lambda ids, n: peft_generate(model, model, ids, n, adapter_names=rows))), hf, ""
    run = measured(hf, lambda ids, n: peft_generate(model, model, ids, n))
    if spec.peft == "merged":
        def merge():
            model.set_adapter(name)
            model.merge_adapter()

        return Case(run, setup=merge, teardown=model.unmerge_adapter), hf, ""
    return Case(run, setup=lambda: model.set_adapter(name)), hf, ""


def base_case(side: PeftSide, measured: Callable) -> tuple[Case, torch.nn.Module]:
    """The plain transformers base, generating the same way (PEFT's ratios are against it)."""
    plain = side.plain
    return Case(measured(plain, lambda ids, n: peft_generate(plain, plain, ids, n))), plain
