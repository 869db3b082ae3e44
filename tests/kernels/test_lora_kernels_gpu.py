"""``fastlora.kernels`` on a CUDA GPU (marker ``gpu``: ``pytest -m gpu``): bf16, real LLM shapes, the
decode path, CUDA graphs and torch.compile. Skipped without CUDA.

Shapes are Llama-size projections (hidden 4096, MLP 14336, rank 16) with 2048 tokens for training and
1..16 rows for decode. Tolerances follow the rule of ``test_lora_kernels.py``: at most twice PyTorch's
own error in the same dtype against an fp64 gold, plus a per-dtype atol.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

triton = pytest.importorskip("triton")
kernels = pytest.importorskip("fastlora.kernels")

DEVICE = "cuda"
SCALING = 2.0
HALF = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


@pytest.fixture(autouse=True)
def _compiled_kernels():
    from fastlora.kernels import _config
    from fastlora.kernels.lora_gemm import _lora_gemm_kernel

    if _config.interpreted(_lora_gemm_kernel):
        pytest.skip("TRITON_INTERPRET=1 is set: the GPU tests need the compiled kernels")


def _seed(value):
    return torch.tensor(value, dtype=torch.int64, device=DEVICE)


def _keep(seed, M, K, p):
    return kernels.dropout_keep_mask(seed, M, K, p, DEVICE) if p > 0.0 else None


def _fwd_bwd_check(inp, dtype, p, lora_formula, assert_close_rule, atol, seed=1234, check_grads=True):
    M, K = inp.x.shape
    seed = _seed(seed)
    y, s = kernels.lora_linear_fwd(inp.x, inp.w, inp.b, inp.a, inp.bb, SCALING, p, seed)
    assert y.dtype == dtype and s.dtype == torch.float32 and s.shape == (M, inp.a.shape[0])
    keep = _keep(seed, M, K, p)
    leaves = [None if t is None else t.detach().double().requires_grad_(check_grads)
              for t in (inp.x, inp.w, inp.b, inp.a, inp.bb)]
    base_leaves = [None if t is None else t.detach().clone().requires_grad_(check_grads)
                   for t in (inp.x, inp.w, inp.b, inp.a, inp.bb)]
    gold = lora_formula(*leaves, SCALING, keep, p)
    base = lora_formula(*base_leaves, SCALING, keep, p)
    assert_close_rule(y, gold, base, atol, "y")
    if not check_grads:
        return
    grads = kernels.lora_linear_bwd(inp.dy, inp.x, inp.w, inp.a, inp.bb, s, seed, SCALING, p,
                                    True, True, inp.b is not None, True, True)
    gold.backward(inp.dy.double())
    base.backward(inp.dy)
    for name, g, lg, lb in zip(("dx", "dW", "db", "dA", "dB"), grads, leaves, base_leaves):
        if lg is None:
            assert g is None
            continue
        assert g.dtype == lb.dtype and g.shape == lb.shape, name
        assert_close_rule(g, lg.grad, lb.grad, atol, name)


@pytest.mark.parametrize("p", [pytest.param(0.0, id="p0"), pytest.param(0.1, id="p0.1")])
@pytest.mark.parametrize("dtype", HALF)
def test_training_shape(dtype, p, lora_inputs, lora_formula, assert_close_rule, dtype_atol):
    """M=2048 tokens, K=N=4096, r=16, fp32 adapters (PEFT's default) on a half-precision model."""
    inp = lora_inputs(2048, 4096, 4096, 16, dtype=dtype, adapter_dtype=torch.float32, bias=False)
    _fwd_bwd_check(inp, dtype, p, lora_formula, assert_close_rule, dtype_atol[dtype])


@pytest.mark.parametrize("M", [1, 7, 16])
@pytest.mark.parametrize("N", [4096, 14336])
def test_decode_shapes(M, N, lora_inputs, lora_formula, assert_close_rule, dtype_atol):
    """The decode path (split-K shrink reduced in the GEMM's epilogue), bf16, with the S it returns."""
    inp = lora_inputs(M, 4096, N, 16, dtype=torch.bfloat16, adapter_dtype=torch.bfloat16, bias=True)
    _fwd_bwd_check(inp, torch.bfloat16, 0.0, lora_formula, assert_close_rule, dtype_atol[torch.bfloat16],
                   check_grads=False)
    _, s = kernels.lora_linear_fwd(inp.x, inp.w, inp.b, inp.a, inp.bb, SCALING, 0.0, _seed(0))
    s_gold = inp.x.double() @ inp.a.double().t()
    s_base = (inp.x @ inp.a.t()).float()
    assert_close_rule(s, s_gold, s_base, dtype_atol[torch.bfloat16], "S")


@pytest.mark.parametrize("dtype", HALF + [pytest.param(torch.float32, id="fp32")])
@pytest.mark.parametrize("r", [1, 12, 64, 200])
def test_ranks_and_conv1d_weight(dtype, r, lora_inputs, lora_formula, assert_close_rule, dtype_atol):
    """Rank buckets 16..256 (200 walks the epilogue in chunks), odd sizes, a transposed [K, N] weight."""
    inp = lora_inputs(1000, 768, 2304, r, dtype=dtype, adapter_dtype=torch.float32, bias=True, transposed=True)
    _fwd_bwd_check(inp, dtype, 0.1, lora_formula, assert_close_rule, dtype_atol[dtype])


def test_dropout_mask_on_gpu(philox_keep):
    seed = _seed(2024)
    mask = kernels.dropout_keep_mask(seed, 1000, 4096, 0.1, DEVICE)
    assert torch.equal(mask.cpu(), torch.from_numpy(philox_keep(2024, 1000, 4096, 0.1)))
    n = mask.numel()
    assert abs(mask.float().mean().item() - 0.9) < 6 * math.sqrt(0.09 / n)


def test_deterministic(lora_inputs):
    inp = lora_inputs(2048, 1024, 3072, 16, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    runs = []
    for _ in range(2):
        seed = _seed(5)
        y, s = kernels.lora_linear_fwd(inp.x, inp.w, inp.b, inp.a, inp.bb, SCALING, 0.1, seed)
        grads = kernels.lora_linear_bwd(inp.dy, inp.x, inp.w, inp.a, inp.bb, s, seed, SCALING, 0.1,
                                        True, False, True, True, True)
        runs.append([y, s, *(g for g in grads if g is not None)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("M", [1, 512])
def test_cuda_graph_replay_reads_the_seed(M, lora_inputs):
    """Forward and backward capture in a CUDA graph (no host sync); a new seed written into the seed
    tensor before replay gives exactly what an eager call with that seed gives."""
    inp = lora_inputs(M, 1024, 2048, 16, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    seed = _seed(1)

    def step():
        y, s = kernels.lora_linear_fwd(inp.x, inp.w, inp.b, inp.a, inp.bb, SCALING, 0.1, seed)
        dx, _, db, da, dbB = kernels.lora_linear_bwd(inp.dy, inp.x, inp.w, inp.a, inp.bb, s, seed, SCALING, 0.1,
                                                     True, False, True, True, True)
        return y, s, dx, db, da, dbB

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    seed.fill_(777)
    graph.replay()
    torch.cuda.synchronize()
    expected = step()  # eager, seed tensor now holds 777
    for a, b in zip(captured, expected):
        assert torch.equal(a, b)
    seed.fill_(778)
    graph.replay()
    assert not torch.equal(captured[1], expected[1])


def test_torch_compile_of_a_function_calling_the_kernels(lora_inputs):
    inp = lora_inputs(256, 1024, 2048, 16, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    seed = _seed(3)

    def block(x):
        y, s = kernels.lora_linear_fwd(x, inp.w, inp.b, inp.a, inp.bb, SCALING, 0.1, seed)
        return torch.nn.functional.silu(y) * 2, s

    eager = block(inp.x)
    compiled = torch.compile(block)(inp.x)
    torch.testing.assert_close(compiled[0], eager[0], rtol=2e-2, atol=2e-2)
    assert torch.equal(compiled[1], eager[1])


def test_torch_compile_through_the_registered_op(monkeypatch, lora_inputs):
    """fastlora's op with FASTLORA_BACKEND=triton under torch.compile(fullgraph=True): the op is opaque
    to dynamo, so the kernels run inside the compiled graph, backward included."""
    from fastlora import lora_linear

    monkeypatch.setenv("FASTLORA_BACKEND", "triton")
    inp = lora_inputs(256, 1024, 2048, 16, dtype=torch.bfloat16, adapter_dtype=torch.float32)

    def run(fn):
        a = inp.a.detach().clone().requires_grad_(True)
        bb = inp.bb.detach().clone().requires_grad_(True)
        y = fn(inp.x, inp.w, inp.b, a, bb)
        y.backward(inp.dy)
        return y, a.grad, bb.grad

    def layer(x, w, b, a, bb):
        return lora_linear(x, w, b, a, bb, SCALING, 0.0, training=True)

    for got, want in zip(run(torch.compile(layer, fullgraph=True)), run(layer)):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
