"""``fastlora.ops.nf4_linear`` on the reference path: the math, autograd, the registered op, errors."""

from __future__ import annotations

import pytest
import torch

from fastlora.ops import nf4_linear
from fastlora.quant import dequantize_nf4, quantize_nf4


def _inputs(M=6, N=24, K=40, r=4, double_quant=True, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    packed, state = quantize_nf4(torch.randn(N, K, generator=g) * 0.1, blocksize=32, double_quant=double_quant)
    x = torch.randn(M, K, generator=g).to(dtype).requires_grad_(True)
    bias = torch.randn(N, generator=g).requires_grad_(True)
    a = (torch.randn(r, K, generator=g) * 0.2).requires_grad_(True)
    b = (torch.randn(N, r, generator=g) * 0.2).requires_grad_(True)
    return packed, state, x, bias, a, b


@pytest.mark.parametrize("lead", [(6,), (2, 3)], ids=["2d", "3d"])
def test_matches_the_formula_forward_and_backward(lead):
    packed, state, x, bias, a, b = _inputs()
    x = x.detach().reshape(*lead, -1).requires_grad_(True)
    y = nf4_linear(x, packed, state, bias, a, b, 1.5)
    w = dequantize_nf4(packed, state, torch.float32)
    expected = x @ w.t() + bias + 1.5 * (x @ a.t()) @ b.t()
    torch.testing.assert_close(y, expected)
    dy = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, (x, bias, a, b), dy),
                         torch.autograd.grad(expected, (x, bias, a, b), dy)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_without_lora_and_frozen_inputs():
    packed, state, x, bias, _, _ = _inputs(double_quant=False)
    w = dequantize_nf4(packed, state, torch.float32)
    y = nf4_linear(x, packed, state, bias)
    torch.testing.assert_close(y, x @ w.t() + bias)
    dx, db = torch.autograd.grad(y.sum(), (x, bias))
    torch.testing.assert_close(dx, torch.ones_like(y) @ w)
    torch.testing.assert_close(db, torch.full_like(bias, y.shape[0]))
    with torch.no_grad():
        assert not nf4_linear(x, packed, state, bias).requires_grad


def test_dropout_is_reproducible_and_only_in_training():
    packed, state, x, bias, a, b = _inputs()
    torch.manual_seed(0)
    y1 = nf4_linear(x, packed, state, bias, a, b, 1.0, 0.5, training=True)
    torch.manual_seed(0)
    y2 = nf4_linear(x, packed, state, bias, a, b, 1.0, 0.5, training=True)
    torch.manual_seed(1)
    y3 = nf4_linear(x, packed, state, bias, a, b, 1.0, 0.5, training=True)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    eval_ = nf4_linear(x, packed, state, bias, a, b, 1.0, 0.5, training=False)
    torch.testing.assert_close(eval_, nf4_linear(x, packed, state, bias, a, b, 1.0))
    torch.autograd.grad(y1.sum(), (x, a, b))  # the backward regenerates the mask from the seed


def test_computes_in_the_input_dtype_and_under_autocast():
    packed, state, x, bias, a, b = _inputs(dtype=torch.bfloat16)
    y = nf4_linear(x, packed, state, bias, a, b, 1.0)
    assert y.dtype == torch.bfloat16
    x32 = x.detach().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert nf4_linear(x32, packed, state, bias, a, b, 1.0).dtype == torch.bfloat16


def test_bad_input():
    packed, state, x, bias, a, b = _inputs()
    with pytest.raises(ValueError, match="shapes do not fit"):
        nf4_linear(x[:, :-1], packed, state, bias, a, b)
    with pytest.raises(ValueError, match="come together"):
        nf4_linear(x, packed, state, bias, a, None)
    with pytest.raises(ValueError, match="dropout_p"):
        nf4_linear(x, packed, state, bias, a, b, 1.0, 1.0, training=True)
    with pytest.raises(ValueError, match="shapes do not fit"):
        nf4_linear(x, packed, state, bias, a[:, :-1], b)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "nolora"])
def test_opcheck(lora):
    packed, state, x, bias, a, b = _inputs()
    from fastlora.ops.nf4_linear import _state_args

    args = (x, packed, *_state_args(state), bias, a if lora else None, b if lora else None, 0.5, 0.0)
    torch.library.opcheck(torch.ops.fastlora.nf4_linear.default, args)


def test_torch_compile_matches_eager():
    packed, state, x, bias, a, b = _inputs()

    def f(x, a, b):
        return nf4_linear(x, packed, state, bias, a, b, 0.5)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    y, y_c = f(x, a, b), compiled(x, a, b)
    torch.testing.assert_close(y_c, y)
    for got, want in zip(torch.autograd.grad(y_c.sum(), (x, a, b)), torch.autograd.grad(y.sum(), (x, a, b))):
        torch.testing.assert_close(got, want)
