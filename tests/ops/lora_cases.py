"""Inputs for the ``lora_linear`` op tests (tests/ops/test_lora_linear*.py): leaves of one small call."""

from __future__ import annotations

import math

import torch


def _make(lead=(16,), k=32, n=24, r=4, dtype=torch.float32, adapter_dtype=None, bias=True, transposed=False,
          weight_grad=False, seed=0):
    """Leaves (x, weight_leaf, bias, A, B) and the weight as passed to the op (a ``.t()`` view when transposed)."""
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype
    x = torch.randn(*lead, k, generator=g).to(dtype).requires_grad_(True)
    if transposed:  # GPT-2 Conv1D: stored [in, out], handed over as a transposed view
        w_leaf = (torch.randn(k, n, generator=g) / math.sqrt(k)).to(dtype).requires_grad_(weight_grad)
    else:
        w_leaf = (torch.randn(n, k, generator=g) / math.sqrt(k)).to(dtype).requires_grad_(weight_grad)
    b = torch.randn(n, generator=g).to(dtype).requires_grad_(True) if bias else None
    a = (torch.randn(r, k, generator=g) / math.sqrt(k)).to(adapter_dtype).requires_grad_(True)
    bb = (torch.randn(n, r, generator=g) / math.sqrt(r)).to(adapter_dtype).requires_grad_(True)
    return x, w_leaf, b, a, bb


def _clone(leaves, dtype=None):
    out = []
    for t in leaves:
        if t is None:
            out.append(None)
            continue
        c = t.detach().clone() if dtype is None else t.detach().to(dtype)
        out.append(c.requires_grad_(t.requires_grad))
    return out
