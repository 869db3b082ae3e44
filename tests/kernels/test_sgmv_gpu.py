"""``fastlora.kernels.sgmv`` on a CUDA GPU (marker ``gpu``: ``pytest -m gpu``): bf16 and fp16 at Llama sizes,
decode and prefill layouts, mixed ranks 8-64, and a decode step (metadata + launches) captured in a CUDA
graph, which proves that nothing synchronises with the host. Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

triton = pytest.importorskip("triton")
kernels = pytest.importorskip("fastlora.kernels")

from fastlora.ops.multi_lora import adapter_batch  # noqa: E402
from fastlora.reference_multi import multi_lora_add_ref  # noqa: E402

DEVICE = "cuda"
HALF = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
ATOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def _compiled_kernels():
    from fastlora.kernels import _config
    from fastlora.kernels.sgmv import _sgmv_expand_kernel

    if _config.interpreted(_sgmv_expand_kernel):
        pytest.skip("TRITON_INTERPRET=1 is set: the GPU tests need the compiled kernels")


def _inputs(M, K, N, ranks, dtype, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    L, R = len(ranks), max(ranks)
    a = torch.zeros(L, R, K, device=DEVICE, dtype=dtype)
    b = torch.zeros(L, N, R, device=DEVICE, dtype=dtype)
    for s, r in enumerate(ranks):
        a[s, :r] = torch.randn(r, K, generator=gen, device=DEVICE).to(dtype) / K**0.5
        b[s, :, :r] = torch.randn(N, r, generator=gen, device=DEVICE).to(dtype) / r**0.5
    x = torch.randn(M, K, generator=gen, device=DEVICE).to(dtype)
    y = torch.randn(M, N, generator=gen, device=DEVICE).to(dtype)
    slots = torch.randint(-1, L, (M,), generator=gen, device=DEVICE).int()
    scalings = torch.rand(L, generator=gen, device=DEVICE) + 0.5
    return y, x, a, b, torch.tensor(ranks, dtype=torch.int32, device=DEVICE), scalings, slots


def _check(y, x, a, b, ranks, scalings, slots, block_m, dtype):
    meta = adapter_batch(slots, a.shape[0], block_m=block_m)
    out = y.clone()
    kernels.multi_lora_add(out, x, a, b, ranks, scalings, meta.token_slots, meta.sorted_tokens, meta.blocks,
                           meta.block_m)
    gold = multi_lora_add_ref(y.double(), x.double(), a.double(), b.double(), ranks, scalings.double(), slots)
    base = multi_lora_add_ref(y.clone(), x, a, b, ranks, scalings, slots)
    err = (out.double() - gold).abs().max().item()
    base_err = (base.double() - gold).abs().max().item()
    assert err <= 2 * base_err + ATOL[dtype], f"error {err:.3g} > 2 * torch's {base_err:.3g} + {ATOL[dtype]}"


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("M, block_m", [(32, 0), (32, 16), (4096, None), (1000, 32)])
@pytest.mark.parametrize("K, N", [(4096, 4096), (4096, 14336), (14336, 4096)])
def test_llama_sizes(M, block_m, K, N, dtype):
    ranks = [8, 16, 32, 64, 12, 48, 8, 64] * 4  # 32 adapters of mixed ranks 8-64
    _check(*_inputs(M, K, N, ranks, dtype), block_m, dtype)


@pytest.mark.parametrize("block_m", [0, 16])
def test_decode_step_captures_in_a_cuda_graph(block_m):
    y, x, a, b, ranks, scalings, slots = _inputs(32, 4096, 4096, [8, 16, 64, 32] * 2, torch.bfloat16)
    out = y.clone()

    def step():
        meta = adapter_batch(slots, a.shape[0], block_m=block_m)
        out.copy_(y)
        kernels.multi_lora_add(out, x, a, b, ranks, scalings, meta.token_slots, meta.sorted_tokens, meta.blocks,
                               meta.block_m)

    step()  # compile outside the capture
    expected = out.clone()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph):  # a host read (bincount, .item()) would make this raise
            step()
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
