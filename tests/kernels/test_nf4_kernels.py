"""NF4 kernels against the pure-PyTorch reference (``fastlora.quant``), under the Triton interpreter on
CPU or compiled on CUDA.

fp32 and fp16 only: in the interpreter ``tl.dot`` on bf16 returns garbage, and its fp32 -> bf16 cast
truncates where the GPU rounds to nearest (seen with triton 3.9); bf16 is covered by the GPU tests.
Quantized bytes and dequantized values must be identical to the reference; matmuls follow the rule of
``test_lora_kernels.py`` (at most twice PyTorch's own error in the same dtype against an fp64 gold).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.interpreter

triton = pytest.importorskip("triton")
kernels = pytest.importorskip("fastlora.kernels")

from fastlora.kernels import _config  # noqa: E402
from fastlora.kernels.nf4 import _nf4_matmul_kernel  # noqa: E402
from fastlora.quant import dequantize_nf4, quantize_nf4  # noqa: E402
from fastlora.quant.nf4 import NF4_CODE, _midpoints  # noqa: E402

RUNNABLE = _config.interpreted(_nf4_matmul_kernel) or torch.cuda.is_available()
runnable = pytest.mark.skipif(not RUNNABLE, reason="no GPU and no Triton interpreter (see test_lora_kernels.py)")

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
# (N, K): K not a multiple of any blocksize, an odd element count, one short block, several nested blocks.
WEIGHTS = [pytest.param((48, 80), id="48x80"), pytest.param((33, 65), id="33x65"), pytest.param((7, 3), id="7x3"),
           pytest.param((96, 200), id="96x200")]


def _weight(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.05
    w.view(-1)[0] = 0.4
    return w.to(device=device, dtype=dtype)


@runnable
@pytest.mark.parametrize("dtype", [*DTYPES, pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("shape", WEIGHTS)
def test_quantize_is_byte_identical(shape, blocksize, dtype, kernel_device):
    w = _weight(shape, dtype, kernel_device)
    packed, absmax = kernels.nf4_quantize(w, _midpoints(NF4_CODE).to(kernel_device), blocksize)
    ref_packed, ref_state = quantize_nf4(w.cpu(), blocksize=blocksize)
    assert torch.equal(packed.cpu(), ref_packed)
    assert torch.equal(absmax.cpu(), ref_state.absmax)


@runnable
@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", WEIGHTS)
def test_dequantize_is_bit_identical(shape, dtype, double_quant, kernel_device):
    packed, state = quantize_nf4(_weight(shape, torch.float32, "cpu", seed=1), blocksize=32, double_quant=double_quant)
    out = kernels.nf4_dequantize(packed.to(kernel_device), state.to(kernel_device), dtype)
    assert out.dtype == dtype and out.shape == shape
    assert torch.equal(out.cpu(), dequantize_nf4(packed, state, dtype))


def _gold_and_base(x, w, bias, s, lora_B, scaling):
    """fp64 gold from the same values, and the same formula by PyTorch in x's dtype."""
    def formula(dtype):
        y = x.to(dtype) @ w.to(dtype).t()
        if bias is not None:
            y = y + bias.to(dtype)
        if s is not None:
            y = y + ((s * scaling).to(dtype) @ lora_B.to(dtype).t())
        return y
    return formula(torch.float64), formula(x.dtype)


@runnable
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lora", [None, 8, 12], ids=["nolora", "r8", "r12"])
@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("shape", [pytest.param((48, 80), id="48x80"), pytest.param((70, 129), id="70x129")])
def test_fused_matmul(shape, M, lora, dtype, kernel_device, assert_close_rule, dtype_atol):
    N, K = shape
    packed, state = quantize_nf4(_weight(shape, torch.float32, "cpu", seed=2), blocksize=64, double_quant=(M == 5))
    packed, state = packed.to(kernel_device), state.to(kernel_device)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, K, generator=g).to(kernel_device, dtype)
    bias = torch.randn(N, generator=g).to(kernel_device, dtype)
    s = lora_B = None
    if lora:
        s = torch.randn(M, lora, generator=g).to(kernel_device)
        lora_B = (torch.randn(N, lora, generator=g) / lora**0.5).to(kernel_device)
    y = kernels.nf4_matmul(x, packed, state, bias, s, lora_B, 0.5)
    w = dequantize_nf4(packed, state, dtype)  # the values the kernel dequantizes in registers
    gold, base = _gold_and_base(x, w, bias, s, lora_B, 0.5)
    assert y.dtype == dtype and y.shape == (M, N)
    assert_close_rule(y, gold, base, dtype_atol[dtype], "y")


def _op_inputs(M, N, K, r, dtype, device, double_quant, seed=4):
    g = torch.Generator().manual_seed(seed)
    packed, state = quantize_nf4(torch.randn(N, K, generator=g) * 0.05, blocksize=64, double_quant=double_quant)
    x = torch.randn(M, K, generator=g).to(device, dtype).requires_grad_(True)
    bias = torch.randn(N, generator=g).to(device, dtype).requires_grad_(True)
    a = (torch.randn(r, K, generator=g) / K**0.5).to(device).requires_grad_(True)  # fp32 adapters, as PEFT
    b = (torch.randn(N, r, generator=g) / r**0.5).to(device).requires_grad_(True)
    return packed.to(device), state.to(device), x, bias, a, b


@runnable
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p25"])
@pytest.mark.parametrize("M", [3, 40], ids=["fused-M3", "dequant-M40"])
def test_nf4_linear_forward_backward(M, p, dtype, kernel_device, monkeypatch, assert_close_rule, dtype_atol):
    """The whole op on the kernels: forward, and dx / db / dA / dB against the formula with the kernels'
    own dropout mask (regenerated from the seed the forward drew)."""
    from fastlora.ops import nf4_linear

    monkeypatch.setenv("FASTLORA_BACKEND", "triton")
    N, K, r, scaling = 56, 96, 8, 2.0
    packed, state, x, bias, a, b = _op_inputs(M, N, K, r, dtype, kernel_device, double_quant=True)
    torch.manual_seed(11)
    seed = torch.randint(0, 2**31 - 1, (), device=kernel_device, dtype=torch.int64)
    torch.manual_seed(11)
    y = nf4_linear(x, packed, state, bias, a, b, scaling, p, training=True)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, bias, a, b), dy)

    w = dequantize_nf4(packed, state, torch.float32)
    keep = kernels.dropout_keep_mask(seed, M, K, p, kernel_device) if p > 0 else None

    def formula(dtype_):
        xs, bs, as_, bbs = (t.detach().to(dtype_).requires_grad_(True) for t in (x, bias, a, b))
        xd = xs if keep is None else xs * keep.to(dtype_) / (1 - p)
        out = xs @ w.to(dtype_).t() + bs + scaling * (xd @ as_.t()) @ bbs.t()
        return out, torch.autograd.grad(out, (xs, bs, as_, bbs), dy.to(dtype_))

    gold, gold_grads = formula(torch.float64)
    base, base_grads = formula(dtype)
    assert_close_rule(y, gold, base, dtype_atol[dtype], "y")
    for name, got, g_, b_ in zip(("dx", "db", "dA", "dB"), grads, gold_grads, base_grads):
        assert got.dtype == {"dx": dtype, "db": dtype, "dA": torch.float32, "dB": torch.float32}[name]
        assert_close_rule(got, g_, b_, dtype_atol[dtype] * 4, name)


@runnable
def test_workspace_is_shared_and_grows(kernel_device, monkeypatch):
    """Layers of different sizes, called in turn on the dequantize path, each get their own weight."""
    from fastlora.ops import nf4_linear

    monkeypatch.setenv("FASTLORA_BACKEND", "triton")
    kernels.nf4_workspace_clear()
    layers = [quantize_nf4(_weight(shape, torch.float32, "cpu", seed=i)) for i, shape in
              enumerate([(32, 64), (96, 64), (16, 64)])]
    x = torch.randn(40, 64, device=kernel_device)
    for _ in range(2):
        for packed, state in layers:
            y = nf4_linear(x, packed.to(kernel_device), state.to(kernel_device))
            expected = x @ dequantize_nf4(packed, state).to(kernel_device).t()
            torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
