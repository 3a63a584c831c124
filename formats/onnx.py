"""ONNX files of causal LMs with a key/value cache: one graph for prefill and decode.

Inputs and outputs (the names ``optimum`` uses, so ONNX Runtime GenAI-style loops work unchanged)::

    input_ids                    int64   [B, S]
    attention_mask               int64   [B, T]            T = past + S (the caller's tokens only)
    position_ids                 int64   [B, S]            the caller's positions (0 for the first token)
    past_key_values.{l}.key      float32 [B, H_kv, past, D]  past = 0 at prefill
    past_key_values.{l}.value    float32 [B, H_kv, past, D]
    -> logits                    float32 [B, S, V]
    -> present.{l}.key / .value  float32 [B, H_kv, T, D]     fed back as the next step's past

A prefix (prefix tuning, P-tuning v2, or a prompt's K/V) is baked in as constants [L, H_kv, P, D]:
inside the graph it is put before the past, the mask gets P ones in front and the positions move
by P; the presents leave it out. So a model with a prefix has exactly the inputs and outputs of the
bare one, and the caller's loop does not change.

The graph is traced with the TorchScript exporter (``dynamo=False``): it needs no ``onnxscript``
and traces transformers' ``DynamicCache`` as plain tensors. Files are written atomically.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from adaptkit.formats.checkpoint import atomic_output_file

OPSET = 17


def input_names(num_layers: int) -> list[str]:
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past]


def output_names(num_layers: int) -> list[str]:
    return ["logits", *[f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]]


class CachedDecoder(nn.Module):
    """``model`` as a function of tensors only: (ids, mask, positions, *past) -> (logits, *present).

    ``prefix_keys``/``prefix_values`` ([L, H_kv, P, D]) are buffers, so they become graph constants.
    """

    def __init__(self, model: nn.Module, prefix: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        from adaptkit.measured import cache_argument

        self.model = model
        self.num_layers = model.config.num_hidden_layers
        self.cache_kw = cache_argument(model)
        self.prefix_length = 0 if prefix is None else prefix[0].shape[2]
        if prefix is not None:
            self.register_buffer("prefix_keys", prefix[0].detach().float().contiguous())
            self.register_buffer("prefix_values", prefix[1].detach().float().contiguous())

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        batch = input_ids.shape[0]
        cache = DynamicCache(config=self.model.config)
        for layer in range(self.num_layers):
            keys, values = past[2 * layer], past[2 * layer + 1]  # [B, H_kv, past, D]
            if self.prefix_length:
                prefix_k = self.prefix_keys[layer].unsqueeze(0).expand(batch, -1, -1, -1)
                prefix_v = self.prefix_values[layer].unsqueeze(0).expand(batch, -1, -1, -1)
                keys, values = torch.cat([prefix_k, keys], dim=2), torch.cat([prefix_v, values], dim=2)
            cache.update(keys, values, layer)
        if self.prefix_length:
            ones = torch.ones(batch, self.prefix_length, dtype=attention_mask.dtype, device=attention_mask.device)
            attention_mask = torch.cat([ones, attention_mask], dim=1)
            position_ids = position_ids + self.prefix_length  # the real tokens continue after the prefix
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self.cache_kw: cache})
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys[:, :, self.prefix_length :], layer.values[:, :, self.prefix_length :]]
        return (out.logits, *present)


def _example_inputs(model: nn.Module, facts) -> tuple[torch.Tensor, ...]:
    """A batch of 2 with 3 new tokens after 2 cached ones: the general case is the one traced."""
    batch, seq, past = 2, 3, 2
    device = next(model.parameters()).device
    ids = torch.randint(3, facts.vocab_size, (batch, seq), device=device)
    mask = torch.ones(batch, past + seq, dtype=torch.long, device=device)
    positions = torch.arange(past, past + seq, device=device).expand(batch, -1)
    kv = [torch.zeros(batch, facts.num_kv_heads, past, facts.head_dim, device=device) for _ in range(2 * facts.num_layers)]
    return (ids, mask, positions, *kv)


def write_onnx(
    model: nn.Module, facts, out: str | os.PathLike, prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    opset: int = OPSET, force: bool = False,
) -> Path:
    """Trace ``model`` (a float32 causal LM, eval mode) with its KV cache into one ONNX file, atomically.

    ``prefix``: (keys, values), each [L, H_kv, P, D], baked in as constants (see the module docstring).
    """
    import onnx

    out = Path(out)
    decoder = CachedDecoder(model, prefix).eval()
    names_in, names_out = input_names(facts.num_layers), output_names(facts.num_layers)
    dynamic = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
               "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    dynamic.update({n: {0: "batch", 2: "past_sequence"} for n in names_in[3:]})
    dynamic.update({n: {0: "batch", 2: "total_sequence"} for n in names_out[1:]})
    with atomic_output_file(out, force) as tmp, torch.no_grad(), _quiet_export():
        torch.onnx.export(decoder, _example_inputs(model, facts), str(tmp), dynamo=False, input_names=names_in,
                          output_names=names_out, dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True)
        onnx.checker.check_model(str(tmp))
    return out


@contextlib.contextmanager
def _quiet_export():
    """The TorchScript exporter warns about every traced Python branch; they are expected here."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def require_onnxruntime():
    """The onnxruntime module, or a MissingDependencyError saying how to get it."""
    try:
        import onnxruntime
    except ImportError as exc:
        from adaptkit.errors import MissingDependencyError

        raise MissingDependencyError("verifying an ONNX graph needs onnxruntime; pip install onnxruntime "
                                     "(or drop --verify)") from exc
    return onnxruntime


def session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session for a file written by :func:`write_onnx`."""
    ort = require_onnxruntime()

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_step(sess, input_ids, attention_mask, position_ids, past: list) -> tuple:
    """One prefill/decode step through an ONNX session: (logits, present list), numpy in and out."""
    feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    names = [i.name for i in sess.get_inputs()][3:]
    feed.update(dict(zip(names, past)))
    logits, *present = sess.run(None, feed)
    return logits, present


def empty_past(sess, batch: int) -> list:
    """Zero-length past tensors [B, H_kv, 0, D] for the prefill step, shapes read from the graph."""
    import numpy as np

    past = []
    for node in sess.get_inputs()[3:]:
        heads, head_dim = node.shape[1], node.shape[3]
        past.append(np.zeros((batch, heads, 0, head_dim), dtype=np.float32))
    return past
