"""NF4 kernels on a CUDA GPU (marker ``gpu``: ``pytest -m gpu``): bf16, Llama-size weights, the decode
path, CUDA graphs and torch.compile. Skipped without CUDA.

The quantized bytes and the dequantized bf16 values must be identical to the CPU reference (the
reference is bitsandbytes' format, checked byte for byte in tests/quant); matmuls follow the rule of
``test_lora_kernels.py``.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

triton = pytest.importorskip("triton")
kernels = pytest.importorskip("fastlora.kernels")

from fastlora import LinearNF4, LoraConfig, get_peft_model  # noqa: E402
from fastlora.ops import nf4_linear  # noqa: E402
from fastlora.quant import dequantize_nf4, quantize_nf4  # noqa: E402
from fastlora.quant.nf4 import NF4_CODE, _midpoints  # noqa: E402

DEVICE = "cuda"
ATOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3}
HALF = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


@pytest.fixture(autouse=True)
def _compiled_kernels():
    from fastlora.kernels import _config
    from fastlora.kernels.nf4 import _nf4_matmul_kernel

    if _config.interpreted(_nf4_matmul_kernel):
        pytest.skip("TRITON_INTERPRET=1 is set: the GPU tests need the compiled kernels")


def _rule(out, gold, base, atol, name):
    err = (out.double() - gold.double()).abs().max().item()
    base_err = (base.double() - gold.double()).abs().max().item()
    assert err <= 2 * base_err + atol, f"{name}: error {err:.3g} > 2 * torch's {base_err:.3g} + {atol:g}"


def _llama_weight(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 0.02


@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 4096), (11008, 4096), (4096, 11008)])
def test_quantize_and_dequantize_match_the_reference(shape, double_quant):
    w = _llama_weight(shape).to(torch.bfloat16)
    ref_packed, ref_state = quantize_nf4(w, blocksize=64, double_quant=double_quant)
    layer = LinearNF4.from_linear(torch.nn.Linear(shape[1], shape[0], bias=False, device=DEVICE, dtype=torch.bfloat16)
                                  .requires_grad_(False), double_quant=double_quant)
    with torch.no_grad():
        layer.requantize(w.to(DEVICE))  # through the Triton quantizer on CUDA
    assert torch.equal(layer.weight.cpu(), ref_packed)
    if not double_quant:
        assert torch.equal(layer.quant_state.absmax.cpu(), ref_state.absmax)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        out = kernels.nf4_dequantize(ref_packed.to(DEVICE), ref_state.to(DEVICE), dtype)
        assert torch.equal(out.cpu(), dequantize_nf4(ref_packed, ref_state, dtype)), dtype
    packed, absmax = kernels.nf4_quantize(w.to(DEVICE), _midpoints(NF4_CODE).to(DEVICE), 64)
    assert torch.equal(packed.cpu(), ref_packed)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("M", [1, 4, 16, 17, 256, 2048])
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_nf4_lora_linear_forward_backward(shape, M, dtype):
    N, K = shape
    r, scaling, p = 16, 2.0, 0.05
    packed, state = quantize_nf4(_llama_weight(shape, seed=1), double_quant=True)
    packed, state = packed.to(DEVICE), state.to(DEVICE)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype).requires_grad_(True)
    a = (torch.randn(r, K, generator=g) / K**0.5).to(DEVICE).requires_grad_(True)
    b = (torch.randn(N, r, generator=g) / r**0.5).to(DEVICE).requires_grad_(True)
    torch.manual_seed(3)
    seed = torch.randint(0, 2**31 - 1, (), device=DEVICE, dtype=torch.int64)
    torch.manual_seed(3)
    y = nf4_linear(x, packed, state, None, a, b, scaling, p, training=True)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, b), dy)
    w = dequantize_nf4(packed, state, torch.float32)
    keep = kernels.dropout_keep_mask(seed, M, K, p, DEVICE)

    def formula(dt):
        xs, as_, bs = (t.detach().to(dt).requires_grad_(True) for t in (x, a, b))
        out = xs @ w.to(dt).t() + scaling * ((xs * keep.to(dt) / (1 - p)) @ as_.to(dt).t()) @ bs.to(dt).t()
        return out, torch.autograd.grad(out, (xs, as_, bs), dy.to(dt))

    gold, gold_grads = formula(torch.float64)
    base, base_grads = formula(dtype)
    _rule(y, gold, base, ATOL[dtype], "y")
    for name, got, g_, b_ in zip(("dx", "dA", "dB"), grads, gold_grads, base_grads):
        _rule(got, g_, b_, ATOL[dtype] * 4, name)


def test_decode_is_cuda_graph_safe():
    packed, state = quantize_nf4(_llama_weight((4096, 4096)), double_quant=True)
    packed, state = packed.to(DEVICE), state.to(DEVICE)
    x = torch.randn(1, 4096, device=DEVICE, dtype=torch.bfloat16)
    a = torch.randn(16, 4096, device=DEVICE) * 0.01
    b = torch.randn(4096, 16, device=DEVICE) * 0.01
    expected = nf4_linear(x, packed, state, None, a, b, 2.0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            nf4_linear(x, packed, state, None, a, b, 2.0)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = nf4_linear(x, packed, state, None, a, b, 2.0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


def test_qlora_layer_under_torch_compile():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 1024))
    base = base.to(DEVICE, torch.bfloat16)
    from fastlora import quantize_model

    model = get_peft_model(quantize_model(base, skip=()), LoraConfig(r=8, target_modules=["0", "2"],
                                                                      init_lora_weights=False))
    x = torch.randn(64, 1024, device=DEVICE, dtype=torch.bfloat16)
    eager = model(x)
    compiled = torch.compile(model)(x)
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)
    compiled.float().sum().backward()
