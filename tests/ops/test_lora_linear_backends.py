"""``fastlora.ops.lora_linear`` under ``torch.compile`` and autocast, and the backend switch
``FASTLORA_BACKEND`` (reference, auto, the Triton kernels through the interpreter, and the fallbacks).
The numerics, dropout and memory contracts are in test_lora_linear.py."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from fastlora.ops import dispatch, lora_linear
from fastlora.reference import lora_linear_ref
from lora_cases import _clone, _make


# ---- torch.compile and autocast -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend, fullgraph", [("aot_eager", True), ("inductor", False)])
def test_torch_compile(backend, fullgraph):
    torch._dynamo.reset()
    x, w, b, a, bb = _make(lead=(2, 9), k=24, n=16, r=4)

    def f(x, w, b, a, bb, training):
        # the op alone: a pointwise neighbour would make inductor compile C++ (~15 s on 2 cores)
        return lora_linear(x, w, b, a, bb, 0.5, 0.25, training=training)

    compiled = torch.compile(f, backend=backend, fullgraph=fullgraph)
    for training in (False, True):
        leaves_c, leaves_e = _clone((x, w, b, a, bb)), _clone((x, w, b, a, bb))
        torch.manual_seed(1)
        y_c = compiled(*leaves_c, training)
        torch.manual_seed(1)
        y_e = f(*leaves_e, training)
        torch.testing.assert_close(y_c, y_e)
        y_c.sum().backward()
        y_e.sum().backward()
        for lc, le in zip(leaves_c, leaves_e):
            if le.requires_grad:
                torch.testing.assert_close(lc.grad, le.grad)


def test_autocast_cpu_bf16():
    x, w, b, a, bb = _make(lead=(3, 7), k=32, n=24, r=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, w, b, a, bb, 0.5)
        base = torch.nn.functional.linear(x, w, b)
    assert y.dtype == base.dtype == torch.bfloat16
    expected = lora_linear_ref(x.bfloat16(), w.bfloat16(), b.bfloat16(), a, bb, 0.5)
    torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    assert torch.isfinite(a.grad).all() and bb.grad.abs().sum() > 0


# ---- backend switching --------------------------------------------------------------------------------------------

@pytest.fixture
def fresh_warnings():
    dispatch.warn_once.cache_clear()  # the fallback warns once per process and reason
    yield
    dispatch.warn_once.cache_clear()


@pytest.mark.parametrize("backend", ["reference", "auto", "AUTO", ""])
def test_reference_and_auto_backends_on_cpu(monkeypatch, fresh_warnings, backend):
    monkeypatch.setenv("FASTLORA_BACKEND", backend)
    x, w, b, a, bb = _make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = lora_linear(x, w, b, a, bb, 0.5)
    torch.testing.assert_close(y, lora_linear_ref(x, w, b, a, bb, 0.5))
    assert dispatch.resolve_backend("lora_linear", x.device) is None


def test_bad_backend_raises(monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", "cutlass")
    x, w, b, a, bb = _make()
    with pytest.raises(ValueError, match="FASTLORA_BACKEND='cutlass'.*auto, reference, triton"):
        lora_linear(x, w, b, a, bb, 0.5)


def test_triton_backend_on_cpu_without_interpreter_falls_back_with_a_warning(monkeypatch, fresh_warnings):
    monkeypatch.setenv("FASTLORA_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w, b, a, bb = _make()
    with pytest.warns(RuntimeWarning, match="TRITON_INTERPRET=1"):
        y = lora_linear(x, w, b, a, bb, 0.5)
    torch.testing.assert_close(y, lora_linear_ref(x, w, b, a, bb, 0.5))
    y.sum().backward()
    assert a.grad is not None


def test_triton_backend_with_interpreter_uses_the_kernels(monkeypatch, fresh_warnings):
    pytest.importorskip("triton")
    monkeypatch.setenv("FASTLORA_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernels = dispatch.load_kernels("lora_linear")
    assert not isinstance(kernels, str), kernels
    x, w, b, a, bb = _make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = lora_linear(x, w, b, a, bb, 0.5)
    messages = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]
    assert not any("reference implementation" in m for m in messages), messages
    torch.testing.assert_close(y, lora_linear_ref(x, w, b, a, bb, 0.5), rtol=1e-4, atol=1e-4)


def test_triton_backend_dropout_backward_uses_the_forwards_kernel_mask(monkeypatch, fresh_warnings):
    """Forward and backward run on the same backend, so the backward regenerates the kernels' own mask."""
    pytest.importorskip("triton")
    monkeypatch.setenv("FASTLORA_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernels = dispatch.load_kernels("lora_linear")
    x, w, b, a, bb = _make(lead=(9,), k=20, n=12, r=4)
    p, scaling = 0.4, 0.7
    seed_state = torch.get_rng_state()
    y = lora_linear(x, w, b, a, bb, scaling, p, training=True)
    dy = torch.randn_like(y)
    y.backward(dy)
    # The op draws its seed first thing from torch's generator: draw the same one for the oracle.
    torch.set_rng_state(seed_state)
    seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
    keep = kernels.dropout_keep_mask(seed, 9, 20, p, x.device).to(x.dtype)
    assert 0 < keep.sum() < keep.numel()
    x2, a2, b2 = (t.detach().clone().requires_grad_() for t in (x, a, bb))
    want = F.linear(x2, w, b) + scaling * ((x2 * keep / (1 - p)) @ a2.t()) @ b2.t()
    want.backward(dy)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    for got, ref in ((x, x2), (a, a2), (bb, b2)):
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-4, atol=1e-4)


def test_triton_backend_falls_back_on_what_the_kernels_do_not_cover(monkeypatch, fresh_warnings):
    pytest.importorskip("triton")
    monkeypatch.setenv("FASTLORA_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, w, b, a, bb = (t.detach().double().requires_grad_(t.requires_grad) for t in _make())
    with pytest.warns(RuntimeWarning, match="do not cover this call: .*float64"):
        y = lora_linear(x, w, b, a, bb, 0.5, 0.2, training=True)
    y.sum().backward()  # the backward follows the forward onto the reference
    assert a.grad is not None and x.grad is not None
