"""mergekit's YAML configs, read as adaptkit recipes (``adaptkit merge --recipe mergekit.yml -o OUT``).

::

    merge_method: ties
    base_model: models/base
    models:
      - model: models/base+adapters/sql     # a LoRA on the base: mergekit's "model+lora" syntax
        parameters: {weight: 0.7, density: 0.5}
      - model: models/math-finetune         # a full fine-tune of the base
        parameters: {weight: 0.3, density: 0.5}
    parameters: {normalize: true}
    dtype: bfloat16

The delta methods map onto adaptkit's (``adaptkit.merging.methods``) with mergekit's defaults:

=================  ==============================================  ==========================
mergekit           per tensor                                      adaptkit
=================  ==============================================  ==========================
linear             sum_i w_i W_i / sum_i w_i  (normalize: true)    linear, weights w_i/sum w
task_arithmetic    W + lambda sum_i w_i dW_i  (normalize: false)   linear, weights lambda w_i
ties               trim, elect, mean of agreeing (normalize: true)  ties
dare_ties          drop, elect, sum of agreeing (normalize: false)  dare_ties, normalize false
dare_linear        W + lambda sum_i w_i dare(dW_i)                 dare_linear
magnitude_prune    (adaptkit's and PEFT's name; not mergekit's)    magnitude_prune
=================  ==============================================  ==========================

A model listed that *is* the base adds nothing but its weight (to ``linear``'s normalisation);
``linear`` without ``base_model`` averages about its first model (``sum_i w_i W_i / sum_i w_i`` is
``W_0 + sum_i (w_i / sum w) (W_i - W_0)``).
DARE's masks come from adaptkit's seeded generator (``parameters.seed``, default 0) and kept
entries are divided by the density (the paper's rescale); mergekit draws from torch's global
generator and rescales to the delta's L1 norm: the same merge in expectation, not the same draw.
Every other mergekit method (slerp, model_stock, della, breadcrumbs, passthrough, ...) and option
that would change the result (``slices``, layer gradients, per-model densities that differ,
``rescale: false``, ``tokenizer_source``) is refused by name. ``int8_mask`` only saves memory in
mergekit and is accepted.
"""

from __future__ import annotations

from pathlib import Path

from adaptkit.hub import local_path

MERGEKIT_KEYS = ("merge_method", "models", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source",
                 "tokenizer", "chat_template", "slices", "name")
IMPLEMENTED = {"linear": "linear", "task_arithmetic": "linear", "ties": "ties", "dare_ties": "dare_ties",
               "dare_linear": "dare_linear", "magnitude_prune": "magnitude_prune"}
# mergekit's own defaults for `normalize` per method
NORMALIZE_DEFAULT = {"linear": True, "task_arithmetic": False, "ties": True, "dare_ties": False, "dare_linear": False,
                     "magnitude_prune": False}
GLOBAL_PARAMETERS = ("normalize", "lambda", "rescale", "int8_mask", "density", "weight", "seed")
MODEL_PARAMETERS = ("weight", "density")


def is_mergekit(data) -> bool:
    """A mergekit config (rather than an adaptkit recipe): it names ``merge_method`` or ``slices``."""
    return isinstance(data, dict) and ("merge_method" in data or "slices" in data)


def translate(data: dict, check, out: str | None):
    """The :class:`~adaptkit.merging.recipe.Recipe` of a mergekit config; ``check`` reports errors with the
    file, line and field (``adaptkit.merging.recipe._Checker``)."""
    from adaptkit.merging.recipe import Recipe

    check.mapping(data, (), MERGEKIT_KEYS)
    if "slices" in data:
        check.fail(("slices",), "mergekit slices (layer ranges from several models) are not implemented by adaptkit; "
                                "list whole models under 'models', or run this config with mergekit itself")
    for key in ("tokenizer_source", "tokenizer", "chat_template"):
        if data.get(key) not in (None, "base"):
            check.fail((key,), f"adaptkit keeps the base's tokenizer and chat template; {key}: {data[key]!r} is not "
                               "implemented (drop it, or set it to 'base')")
    name = check.text(data.get("merge_method"), ("merge_method",))
    if name not in IMPLEMENTED:
        check.fail(("merge_method",), f"mergekit method {name!r} is not implemented by adaptkit (it implements "
                                      f"{', '.join(IMPLEMENTED)}); run this config with mergekit itself")
    if out is None:
        check.fail((), "a mergekit config names no output folder; pass it on the command line: -o OUT")
    params = check.mapping(data.get("parameters") or {}, ("parameters",), GLOBAL_PARAMETERS)
    for key, value in params.items():
        _scalar(check, ("parameters", key), value)
    if params.get("rescale", True) is not True and name.startswith("dare"):
        check.fail(("parameters", "rescale"), "adaptkit's DARE always rescales the kept entries (by 1/density); "
                                              "rescale: false is not implemented")
    normalize = params.get("normalize", NORMALIZE_DEFAULT[name])
    scale = check.number(params.get("lambda", 1.0), ("parameters", "lambda"))

    base = None
    if data.get("base_model") is not None:
        base = _existing(check, data["base_model"], ("base_model",))
    models = data.get("models")
    if not isinstance(models, list) or not models:
        check.fail(("models",), "expected a non-empty list of {model, parameters} entries")
    sources, weights, densities = [], [], []
    for i, entry in enumerate(models):
        check.mapping(entry, ("models", i), ("model", "parameters"))
        spec = check.text(entry.get("model"), ("models", i, "model"))
        own = check.mapping(entry.get("parameters") or {}, ("models", i, "parameters"), MODEL_PARAMETERS)
        weight = own.get("weight", params.get("weight"))
        if weight is None:
            check.fail(("models", i, "parameters", "weight"), "mergekit requires a weight for every model (or a "
                                                              "global parameters.weight)")
        weights.append(check.number(_scalar(check, ("models", i, "parameters", "weight"), weight),
                                    ("models", i, "parameters", "weight")))
        density = own.get("density", params.get("density"))
        densities.append(None if density is None else _scalar(check, ("models", i, "parameters", "density"), density))
        model, plus, lora = spec.partition("+")
        model_path = _existing(check, model, ("models", i, "model"))
        if plus:
            if base is None:
                base = model_path
            elif model_path.resolve() != base.resolve():
                check.fail(("models", i, "model"), f"{spec!r} puts a LoRA on {model!r}, not on base_model; adaptkit "
                                                   "merges deltas onto one base")
            sources.append(_existing(check, lora, ("models", i, "model")))
        elif base is not None and model_path.resolve() == base.resolve():
            sources.append(None)  # the base itself: no delta, only its weight
        else:
            sources.append(model_path)
    if base is None and name == "linear" and normalize and "+" not in str(models[0].get("model")):
        base = _existing(check, models[0]["model"], ("models", 0, "model"))  # sum w_i W_i / sum w_i, about model 0
    if base is None:
        check.fail(("base_model",), "name base_model (the model the deltas apply to), or give LoRAs as base+lora")
    sources = [None if s is not None and s.resolve() == base.resolve() else s for s in sources]  # listed before

    given = {d for d in densities if d is not None}
    if len(given) > 1:
        check.fail(("models",), f"the models have different densities {sorted(given)}; adaptkit applies one density to "
                                "every delta (give the same density, or a global parameters.density)")
    density = given.pop() if given else None
    takes = {"ties": ("density",), "dare_ties": ("density", "seed"), "dare_linear": ("density", "seed"),
             "magnitude_prune": ("density",)}.get(name, ())
    method = IMPLEMENTED[name]
    if density is not None and "density" not in takes:
        check.fail(("models",), f"mergekit method {name!r} takes no density")
    if "density" in takes and density is None:
        density = 1.0  # mergekit's default: nothing dropped
    total = sum(weights)
    if method in ("linear", "dare_linear", "magnitude_prune"):
        # sums of weighted deltas: normalisation and lambda are factors on the weights
        if normalize and abs(total) < 1e-8:
            check.fail(("models",), "normalize: true with weights that sum to 0")
        weights = [scale * w / (total if normalize else 1.0) for w in weights]
        scale, normalize_param = 1.0, None
    else:
        normalize_param = bool(normalize)
    kept = [(s, w) for s, w in zip(sources, weights) if s is not None]
    if not kept:
        check.fail(("models",), "every model listed is the base: the merge would change nothing")
    parameters = {k: v for k, v in (("density", density), ("seed", params.get("seed")),
                                    ("normalize", normalize_param)) if v is not None}
    out_dtype = data.get("out_dtype") or data.get("dtype")
    return Recipe(source=check.source, method=method, into="checkpoint", out=Path(out),
                  adapters=tuple(s for s, _ in kept), weights=tuple(w for _, w in kept), base=base,
                  dtype=out_dtype, parameters=parameters, scale=scale)


def _scalar(check, path: tuple, value):
    if isinstance(value, (list, dict)):
        check.fail(path, "mergekit gradients and filters (a list or mapping per layer) are not implemented by "
                         "adaptkit; give one number")
    return value


def _existing(check, value, path: tuple) -> Path:
    text = check.text(value, path)
    given = Path(text)
    candidate = given if given.is_absolute() else check.source.parent / given
    if candidate.exists():
        return candidate
    try:
        resolved = local_path(text)  # a Hub id in the local cache
    except Exception:
        resolved = None
    if resolved is None or not resolved.exists():
        check.fail(path, f"no such folder {str(candidate)!r} (relative paths are relative to the config file), and "
                         "not a Hugging Face Hub id in the local cache")
    return resolved
