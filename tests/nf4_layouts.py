"""Both of bitsandbytes' CPU layouts for 4-bit weights, forced on whatever CPU runs the tests.

bitsandbytes >= 0.49 decides per layer, when the layer is built (``Linear4bit.support_avx512bf16_for_cpu
= has_avx512bf16()``), whether its first no-grad CPU forward repacks the weight for an AVX512-BF16
kernel (bf16 compute, no autograd). CI machines differ in that flag from run to run, so the fixture
``cpu_layout`` (conftest.py) runs a test twice:

- ``generic``: the flag is off, layers keep their loaded layout and compute ``x @ deq(W)^T``
  (what every CPU without AVX512-BF16 does);
- ``avx512bf16``: the flag is on, layers are repacked by bitsandbytes' own conversion function on
  their first no-grad forward. Where the CPU has the instruction set, bitsandbytes' real kernel
  computes them; elsewhere :func:`emulated_packed_gemv` stands in for it (the same bf16 scales and
  bf16 products; test_qlora checks it against the real kernel where both exist).
"""

from __future__ import annotations

import copy

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnb_functional  # noqa: E402
import bitsandbytes.nn.modules as bnb_modules  # noqa: E402

CPU_HAS_AVX512BF16 = bool(bnb_functional.has_avx512bf16())


def emulated_packed_gemv(A, B, out=None, transposed_A=False, transposed_B=False, state=None):
    """bitsandbytes' AVX512-BF16 ``gemv_4bit`` in plain torch: ``bf16(A) @ bf16(deq(W))^T``, rounded to bf16.

    ``B`` [N, K/2] is in the repacked layout and ``state.absmax`` [K/64, N] in bf16; bitsandbytes' own
    inverse of the layout gives the codes back. Like the real kernel it has no autograd: its output
    requires grad when ``A`` does, but no gradient flows back through it.
    """
    if not getattr(state, "packing_format_for_cpu", False):
        return _real_gemv_4bit(A, B, out=out, transposed_A=transposed_A, transposed_B=transposed_B, state=state)
    with torch.no_grad():
        result = _emulated(A, B, out, state)
    return result.requires_grad_(A.requires_grad) if out is None else result


def _emulated(A, B, out, state):
    from bitsandbytes.functional import QuantState, _convert_weight_packed_for_cpu_inverse, dequantize_4bit

    scratch = copy.copy(state)  # the inverse writes into the state it gets
    scratch.original_nested = False  # keep the bf16 scales as they are
    codes, _ = _convert_weight_packed_for_cpu_inverse(B, scratch)
    scales = state.absmax.T.reshape(-1).float()
    plain = QuantState(scales, shape=state.shape, code=state.code, blocksize=state.blocksize,
                       quant_type=state.quant_type, dtype=torch.float32)
    weight = dequantize_4bit(codes, plain).to(torch.bfloat16)
    result = (A.to(torch.bfloat16).float() @ weight.float().T).to(torch.bfloat16).to(A.dtype)
    if out is not None:
        out.copy_(result)
        return out
    return result


_real_gemv_4bit = bnb_functional.gemv_4bit


def force_layout(layout: str, monkeypatch) -> str:
    """Layers built from now on (until ``monkeypatch`` undoes it) get ``layout``: ``generic`` or ``avx512bf16``."""
    repack = layout == "avx512bf16"
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: repack)
    if repack and not CPU_HAS_AVX512BF16:
        monkeypatch.setattr(bnb_functional, "gemv_4bit", emulated_packed_gemv)
    return layout
