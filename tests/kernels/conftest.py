"""Kernel tests: the Triton kernels of ``fastlora.kernels`` against plain-PyTorch oracles.

Without a GPU they run on CPU tensors under the Triton interpreter. ``TRITON_INTERPRET`` is read when
triton is imported (``triton.jit`` picks interpreter or compiler then, and so do triton's own library
functions such as ``tl.philox``), so it is set here, before the first triton import, unless the caller
chose (``TRITON_INTERPRET=0``) or a GPU is present (then the same tests run compiled on CUDA).

When an earlier test module already imported triton without it (``import peft`` imports triton), the
interpreter cannot be switched on any more: ``test_lora_kernels.py`` then fails one test saying so and
skips the others. Setting the variable in ``tests/conftest.py`` avoids that.

Fixtures:
- ``kernel_device``: "cuda" when the kernels run compiled on a GPU, else "cpu".
- ``lora_inputs(M, K, N, r, dtype, ...)``: seeded inputs of unit scale (``W``, ``A``: 1/sqrt(K),
  ``B``: 1/sqrt(r)); ``transposed=True`` hands ``W`` over as the ``.t()`` view of a ``[K, N]`` tensor.
- ``lora_formula(x, w, b, A, B, scaling, keep, p)``: ``y`` through plain differentiable torch ops with an
  explicit keep-mask: the oracle (in float64) and PyTorch's own same-dtype baseline.
- ``philox_keep(seed, M, K, p)``: the documented dropout mask computed in NumPy, independently of triton.
- ``assert_close_rule(out, gold, base, atol)``: flash-attention's rule: ``|out - gold| <= 2 |base - gold| + atol``.
"""

from __future__ import annotations

import math
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="session")
def kernel_device() -> str:
    return "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _inputs(M, K, N, r, dtype=torch.float32, adapter_dtype=None, bias=True, transposed=False, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

    x = rand(M, K)
    w = rand(K, N, scale=1 / math.sqrt(K)).t() if transposed else rand(N, K, scale=1 / math.sqrt(K))
    b = rand(N) if bias else None
    a = rand(r, K, scale=1 / math.sqrt(K), dt=adapter_dtype)
    bb = rand(N, r, scale=1 / math.sqrt(r), dt=adapter_dtype)
    dy = rand(M, N)
    return SimpleNamespace(x=x, w=w, b=b, a=a, bb=bb, dy=dy)


@pytest.fixture
def lora_inputs(kernel_device):
    def make(*args, **kw):
        kw.setdefault("device", kernel_device)
        return _inputs(*args, **kw)
    return make


def _formula(x, w, b, a, bb, scaling, keep, p):
    dtype = x.dtype
    xd = x if keep is None else x * keep.to(dtype) / (1.0 - p)
    y = torch.nn.functional.linear(x, w, None if b is None else b.to(dtype))
    return y + scaling * ((xd @ a.to(dtype).t()) @ bb.to(dtype).t())


@pytest.fixture
def lora_formula():
    return _formula


def _assert_close_rule(out, gold, base, atol, name=""):
    err = (out.double() - gold.double()).abs().max().item()
    base_err = (base.double() - gold.double()).abs().max().item()
    assert err <= 2 * base_err + atol, f"{name}: error {err:.3g} > 2 * torch's {base_err:.3g} + {atol:g}"


@pytest.fixture
def assert_close_rule():
    return _assert_close_rule


@pytest.fixture
def dtype_atol():
    return ATOL


def _philox_keep(seed: int, M: int, K: int, p: float) -> np.ndarray:
    """The documented mask, independently: Philox4x32-10, key (seed, 0), counter (k // 8, m, 0, 0);
    element k takes 16-bit lane k % 8 (word lane // 2, low half first) and is kept when lane >= round(p 2^16)."""
    mask32 = np.uint64(0xFFFFFFFF)
    groups = (K + 7) // 8
    c0 = np.broadcast_to(np.arange(groups, dtype=np.uint64)[None, :], (M, groups)).copy()
    c1 = np.broadcast_to(np.arange(M, dtype=np.uint64)[:, None], (M, groups)).copy()
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c0
        p1 = np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0) & mask32, p1 & mask32, \
            ((p0 >> np.uint64(32)) ^ c3 ^ k1) & mask32, p0 & mask32
        k0 = (k0 + np.uint64(0x9E3779B9)) & mask32
        k1 = (k1 + np.uint64(0xBB67AE85)) & mask32
    lanes = np.stack([w >> np.uint64(shift) & np.uint64(0xFFFF) for w in (c0, c1, c2, c3) for shift in (0, 16)], -1)
    return (lanes.reshape(M, groups * 8)[:, :K] >= round(p * 2**16))


@pytest.fixture
def philox_keep():
    return _philox_keep
