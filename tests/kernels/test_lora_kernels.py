"""``fastlora.kernels``: the fused LoRA forward and backward against plain-PyTorch oracles.

Runs on CPU tensors under the Triton interpreter (marker ``interpreter``; see conftest.py for how
``TRITON_INTERPRET`` gets set), or compiled on CUDA when a GPU is present. Only fp32 and fp16 here:
in the interpreter ``tl.dot`` on bf16 returns garbage (triton 3.9); bf16 is covered by the GPU tests.

Tolerance rule (STYLE.md, flash-attention's): against an fp64 gold computed from the same values, the
kernel's max error may be at most twice the error of the same formula run by PyTorch in the kernel's
dtype, plus a small per-dtype atol. Dropout oracles use ``dropout_keep_mask``, so a gradient that
matches proves the kernel applied exactly that mask, the forward's, regenerated from the seed.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.interpreter

triton = pytest.importorskip("triton")
kernels = pytest.importorskip("fastlora.kernels")

from fastlora.kernels import _config, lora_linear as kernel_launchers  # noqa: E402
from fastlora.kernels.lora_gemm import _lora_gemm_kernel  # noqa: E402

INTERPRETED = _config.interpreted(_lora_gemm_kernel)
RUNNABLE = INTERPRETED or torch.cuda.is_available()
NOT_RUNNABLE = (
    "no GPU, and triton was imported before TRITON_INTERPRET=1 was set (an earlier test module imported "
    "it, e.g. through peft): set TRITON_INTERPRET=1 in tests/conftest.py or the environment"
)
runnable = pytest.mark.skipif(not RUNNABLE, reason=NOT_RUNNABLE)

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
# (M, K, N, r): odd sizes, decode rows, rank 1, a full bucket, and a rank over 64 (chunked epilogue).
SHAPES = [
    pytest.param((133, 200, 77, 12), id="M133-K200-N77-r12"),
    pytest.param((1, 200, 77, 12), id="M1-K200-N77-r12"),
    pytest.param((5, 72, 48, 1), id="M5-K72-N48-r1"),
    pytest.param((40, 96, 80, 64), id="M40-K96-N80-r64"),
    pytest.param((24, 72, 40, 100), id="M24-K72-N40-r100"),
]
SCALING = 0.7


def test_kernels_can_run_here():
    """Fails loudly (the other tests skip) when neither a GPU nor the interpreter is available."""
    assert RUNNABLE, NOT_RUNNABLE


def _seed(value, device):
    return torch.tensor(value, dtype=torch.int64, device=device)


def _keep(seed, M, K, p, device):
    return kernels.dropout_keep_mask(seed, M, K, p, device) if p > 0.0 else None


def _leaves(inp, dtype=None):
    """Fresh leaves requiring grad (a float64 copy when ``dtype`` is given)."""
    out = []
    for t in (inp.x, inp.w, inp.b, inp.a, inp.bb):
        if t is None:
            out.append(None)
            continue
        t = t.detach().clone() if dtype is None else t.detach().to(dtype)
        out.append(t.requires_grad_(True))
    return out


def _formula_grads(formula, leaves, dy, keep, p):
    y = formula(*leaves, SCALING, keep, p)
    y.backward(dy.to(y.dtype))
    return y.detach(), [None if t is None else t.grad for t in leaves]


# ---- forward ----------------------------------------------------------------------------------------------------

@runnable
@pytest.mark.parametrize("bias, p", [pytest.param(True, 0.0, id="bias"), pytest.param(False, 0.25, id="nobias-p0.25")])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_oracle(shape, dtype, bias, p, lora_inputs, lora_formula, assert_close_rule, dtype_atol,
                                kernel_device):
    M, K, N, r = shape
    inp = lora_inputs(M, K, N, r, dtype=dtype, adapter_dtype=torch.float32, bias=bias)
    seed = _seed(1234, kernel_device)
    y, s = kernels.lora_linear_fwd(inp.x, inp.w, inp.b, inp.a, inp.bb, SCALING, p, seed)
    assert y.shape == (M, N) and y.dtype == dtype
    assert s.shape == (M, r) and s.dtype == torch.float32 and s.is_contiguous()

    keep = _keep(seed, M, K, p, kernel_device)
    gold = lora_formula(*(None if t is None else t.double() for t in (inp.x, inp.w, inp.b, inp.a, inp.bb)),
                        SCALING, keep, p)
    base = lora_formula(inp.x, inp.w, inp.b, inp.a, inp.bb, SCALING, keep, p)
    assert_close_rule(y, gold, base, dtype_atol[dtype], "y")

    xd = inp.x if keep is None else inp.x * keep / (1.0 - p)
    s_gold = xd.double() @ inp.a.double().t()
    s_base = xd @ inp.a.to(dtype).t()
    assert_close_rule(s, s_gold, s_base, dtype_atol[dtype], "S")


# ---- backward ---------------------------------------------------------------------------------------------------

def _check_backward(inp, dtype, p, seed, lora_formula, assert_close_rule, atol, device, **needs):
    M, K = inp.x.shape
    y, s = kernels.lora_linear_fwd(inp.x, inp.w, inp.b, inp.a, inp.bb, SCALING, p, seed)
    flags = dict(needs_dx=True, needs_dw=True, needs_db=inp.b is not None, needs_da=True, needs_dbB=True)
    flags.update(needs)
    grads = kernels.lora_linear_bwd(inp.dy, inp.x, inp.w, inp.a, inp.bb, s, seed, SCALING, p, **flags)

    keep = _keep(seed, M, K, p, device)
    _, gold = _formula_grads(lora_formula, _leaves(inp, torch.float64), inp.dy.double(), keep, p)
    _, base = _formula_grads(lora_formula, _leaves(inp), inp.dy, keep, p)
    leaves = (inp.x, inp.w, inp.b, inp.a, inp.bb)
    names = ("dx", "dW", "db", "dA", "dB")
    for name, flag, g, g_gold, g_base, leaf in zip(names, flags.values(), grads, gold, base, leaves):
        if not flag:
            assert g is None, name
            continue
        assert g.shape == leaf.shape and g.dtype == leaf.dtype, name
        assert_close_rule(g, g_gold, g_base, atol, name)
    return grads


@runnable
@pytest.mark.parametrize("p", [pytest.param(0.0, id="p0"), pytest.param(0.25, id="p0.25")])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_oracle(shape, dtype, p, lora_inputs, lora_formula, assert_close_rule, dtype_atol,
                                 kernel_device):
    inp = lora_inputs(*shape, dtype=dtype, adapter_dtype=torch.float32, bias=True)
    _check_backward(inp, dtype, p, _seed(99, kernel_device), lora_formula, assert_close_rule, dtype_atol[dtype],
                    kernel_device)


@runnable
@pytest.mark.parametrize("dtype", DTYPES)
def test_transposed_weight_view(dtype, lora_inputs, lora_formula, assert_close_rule, dtype_atol, kernel_device):
    """GPT-2 Conv1D: W stored [K, N] and passed as its .t() view; the kernels read it through strides."""
    inp = lora_inputs(133, 200, 77, 12, dtype=dtype, adapter_dtype=torch.float32, transposed=True)
    assert not inp.w.is_contiguous()
    grads = _check_backward(inp, dtype, 0.25, _seed(5, kernel_device), lora_formula, assert_close_rule,
                            dtype_atol[dtype], kernel_device)
    assert grads[1].shape == (77, 200)


@runnable
def test_adapters_in_the_input_dtype(lora_inputs, lora_formula, assert_close_rule, dtype_atol, kernel_device):
    """fp16 adapters with fp16 input (no fp32 master copy): outputs and gradients keep their dtypes."""
    inp = lora_inputs(37, 72, 40, 8, dtype=torch.float16, adapter_dtype=torch.float16)
    grads = _check_backward(inp, torch.float16, 0.1, _seed(3, kernel_device), lora_formula, assert_close_rule,
                            dtype_atol[torch.float16], kernel_device)
    assert grads[3].dtype == grads[4].dtype == torch.float16


@runnable
def test_non_contiguous_input(lora_inputs, lora_formula, assert_close_rule, dtype_atol, kernel_device):
    inp = lora_inputs(33, 64, 40, 4)
    wide = torch.randn(33, 2 * 64, device=kernel_device)
    wide[:, ::2] = inp.x
    inp.x = wide[:, ::2]  # stride (128, 2)
    _check_backward(inp, torch.float32, 0.25, _seed(8, kernel_device), lora_formula, assert_close_rule,
                    dtype_atol[torch.float32], kernel_device)


@runnable
def test_broadcast_output_gradient(lora_inputs, lora_formula, assert_close_rule, dtype_atol, kernel_device):
    """``y.sum().backward()`` hands the op an expanded dY (strides 0, 0): read through its strides."""
    inp = lora_inputs(33, 64, 40, 4)
    inp.dy = torch.ones((), device=kernel_device).expand(33, 40)
    _check_backward(inp, torch.float32, 0.25, _seed(8, kernel_device), lora_formula, assert_close_rule,
                    dtype_atol[torch.float32], kernel_device)


@runnable
@pytest.mark.parametrize("skip", ["needs_dx", "needs_dw", "needs_db", "needs_da", "needs_dbB"])
def test_gradients_not_needed_are_none(skip, lora_inputs, lora_formula, assert_close_rule, dtype_atol,
                                       kernel_device):
    inp = lora_inputs(20, 48, 32, 4)
    _check_backward(inp, torch.float32, 0.25, _seed(11, kernel_device), lora_formula, assert_close_rule,
                    dtype_atol[torch.float32], kernel_device, **{skip: False})


@runnable
def test_frozen_base_backward_launches_no_gemm(monkeypatch, lora_inputs, kernel_device):
    """needs_dx=False and needs_dw=False (first adapted layer, frozen W): no base-sized GEMM is launched."""
    inp = lora_inputs(20, 48, 32, 4)
    seed = _seed(2, kernel_device)
    y, s = kernels.lora_linear_fwd(inp.x, inp.w, inp.b, inp.a, inp.bb, SCALING, 0.25, seed)
    calls = []
    real = kernel_launchers.lora_gemm
    monkeypatch.setattr(kernel_launchers, "lora_gemm", lambda *a, **k: calls.append(1) or real(*a, **k))
    dx, dw, db, da, dbB = kernels.lora_linear_bwd(inp.dy, inp.x, inp.w, inp.a, inp.bb, s, seed, SCALING, 0.25,
                                                  False, False, True, True, True)
    assert dx is None and dw is None and calls == []
    assert da is not None and dbB is not None and db is not None
    kernels.lora_linear_bwd(inp.dy, inp.x, inp.w, inp.a, inp.bb, s, seed, SCALING, 0.25, True, False, False, True, True)
    assert calls == [1]


@runnable
def test_empty_batch(lora_inputs, kernel_device):
    inp = lora_inputs(0, 48, 32, 4)
    seed = _seed(2, kernel_device)
    y, s = kernels.lora_linear_fwd(inp.x, inp.w, inp.b, inp.a, inp.bb, SCALING, 0.25, seed)
    assert y.shape == (0, 32) and s.shape == (0, 4)
    dx, dw, db, da, dbB = kernels.lora_linear_bwd(inp.dy, inp.x, inp.w, inp.a, inp.bb, s, seed, SCALING, 0.25,
                                                  True, True, True, True, True)
    assert dx.shape == (0, 48)
    for g in (dw, db, da, dbB):
        assert torch.count_nonzero(g) == 0


# ---- dropout ----------------------------------------------------------------------------------------------------

@runnable
@pytest.mark.parametrize("seed, p", [(987654321, 0.3), (0, 0.5), (2**31 - 1, 0.05)])
def test_mask_follows_the_documented_philox_keying(seed, p, kernel_device, philox_keep):
    M, K = 37, 70
    mask = kernels.dropout_keep_mask(_seed(seed, kernel_device), M, K, p, kernel_device)
    assert mask.dtype == torch.bool and mask.shape == (M, K)
    expected = torch.from_numpy(philox_keep(seed, M, K, p))
    assert torch.equal(mask.cpu(), expected), f"{(mask.cpu() != expected).sum().item()} elements differ"


@runnable
def test_mask_depends_on_the_seed_only(kernel_device):
    a = kernels.dropout_keep_mask(_seed(7, kernel_device), 64, 96, 0.3, kernel_device)
    assert torch.equal(a, kernels.dropout_keep_mask(_seed(7, kernel_device), 64, 96, 0.3, kernel_device))
    # A mask's rows and columns do not depend on the shape around them.
    assert torch.equal(a[:40, :50], kernels.dropout_keep_mask(_seed(7, kernel_device), 40, 50, 0.3, kernel_device))
    b = kernels.dropout_keep_mask(_seed(8, kernel_device), 64, 96, 0.3, kernel_device)
    differ = (a != b).float().mean().item()
    expected, n = 2 * 0.3 * 0.7, a.numel()  # two independent masks disagree with probability 2p(1-p)
    assert abs(differ - expected) < 6 * math.sqrt(expected * (1 - expected) / n)


@runnable
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_fraction(p, kernel_device):
    M, K = 128, 512
    mask = kernels.dropout_keep_mask(_seed(4321, kernel_device), M, K, p, kernel_device).float()
    n = mask.numel()
    assert abs(mask.mean().item() - (1 - p)) < 6 * math.sqrt(p * (1 - p) / n)
    # Each of the 8 lanes of a Philox draw, and rows, carry the same law.
    per_lane = mask.view(M, K // 8, 8).mean((0, 1))
    assert (per_lane - (1 - p)).abs().max().item() < 6 * math.sqrt(p * (1 - p) / (n / 8))


@runnable
def test_same_seed_same_result_other_seed_other_result(lora_inputs, kernel_device):
    inp = lora_inputs(40, 64, 32, 8)
    run = lambda seed: kernels.lora_linear_fwd(inp.x, inp.w, inp.b, inp.a, inp.bb, SCALING, 0.3, seed)  # noqa: E731
    y1, s1 = run(_seed(10, kernel_device))
    y2, s2 = run(_seed(10, kernel_device))
    y3, s3 = run(_seed(11, kernel_device))
    assert torch.equal(y1, y2) and torch.equal(s1, s2)
    assert not torch.allclose(s1, s3)


@runnable
def test_seed_is_read_from_device_memory(lora_inputs, kernel_device):
    """The kernels load the seed tensor when they run (CUDA-graph safe): writing it in place changes the mask."""
    inp = lora_inputs(1, 64, 32, 8)  # M=1: the split-K shrink path
    seed = _seed(10, kernel_device)
    _, s1 = kernels.lora_linear_fwd(inp.x, inp.w, inp.b, inp.a, inp.bb, SCALING, 0.5, seed)
    seed.fill_(12)
    _, s2 = kernels.lora_linear_fwd(inp.x, inp.w, inp.b, inp.a, inp.bb, SCALING, 0.5, seed)
    _, s3 = kernels.lora_linear_fwd(inp.x, inp.w, inp.b, inp.a, inp.bb, SCALING, 0.5, _seed(12, kernel_device))
    assert not torch.equal(s1, s2)
    assert torch.equal(s2, s3)


@runnable
def test_p0_ignores_the_seed_and_matches_no_dropout(lora_inputs, kernel_device):
    inp = lora_inputs(40, 64, 32, 8)
    outs = []
    for seed in (1, 2):
        seed = _seed(seed, kernel_device)
        y, s = kernels.lora_linear_fwd(inp.x, inp.w, inp.b, inp.a, inp.bb, SCALING, 0.0, seed)
        grads = kernels.lora_linear_bwd(inp.dy, inp.x, inp.w, inp.a, inp.bb, s, seed, SCALING, 0.0,
                                        True, True, True, True, True)
        outs.append((y, s, *grads))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    # A dropout this small keeps every element (p rounds to 0 lanes), and matches p=0 exactly.
    y_tiny, s_tiny = kernels.lora_linear_fwd(inp.x, inp.w, inp.b, inp.a, inp.bb, SCALING, 1e-7, _seed(3, kernel_device))
    torch.testing.assert_close(s_tiny, outs[0][1], rtol=1e-6, atol=1e-6)


# ---- fallback reasons -------------------------------------------------------------------------------------------

def _reason(inp, **over):
    args = dict(x2=inp.x, weight=inp.w, bias=inp.b, lora_A=inp.a, lora_B=inp.bb, dropout_p=0.1)
    args.update(over)
    return kernels.unsupported_reason(**args)


@runnable
def test_unsupported_reasons(lora_inputs, kernel_device):
    inp = lora_inputs(4, 32, 16, 4)
    assert _reason(inp) is None
    assert _reason(inp, x2=inp.x.half(), weight=inp.w.half()) is None
    big = torch.zeros(300, 32, device=kernel_device)
    assert _reason(inp, lora_A=big, lora_B=torch.zeros(16, 300, device=kernel_device)) == "rank 300 > 256"
    assert _reason(inp, x2=inp.x.double(), weight=inp.w.double()) == "dtype float64"
    assert "weight dtype float16" in _reason(inp, weight=inp.w.half())
    assert "dropout_p" in _reason(inp, dropout_p=1.0)
    assert _reason(inp, lora_B=inp.bb[:, :3]) == "shapes do not fit"
    if INTERPRETED:
        assert "bfloat16" in _reason(inp, x2=inp.x.bfloat16(), weight=inp.w.bfloat16())


@runnable
def test_launchers_reject_shapes_that_do_not_fit(lora_inputs, kernel_device):
    """A mismatch would make the kernels read out of bounds: the launchers raise before launching."""
    inp = lora_inputs(4, 32, 16, 4)
    seed = _seed(1, kernel_device)
    with pytest.raises(ValueError, match="shapes do not fit"):
        kernels.lora_linear_fwd(inp.x, inp.w, inp.b, inp.a[:, :31], inp.bb, SCALING, 0.0, seed)
    y, s = kernels.lora_linear_fwd(inp.x, inp.w, inp.b, inp.a, inp.bb, SCALING, 0.0, seed)
    with pytest.raises(ValueError, match="does not fit"):
        kernels.lora_linear_bwd(inp.dy[:3], inp.x, inp.w, inp.a, inp.bb, s, seed, SCALING, 0.0,
                                True, False, False, True, True)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(4, 8)
    reason = kernels.unsupported_reason(x, torch.randn(6, 8), None, torch.randn(2, 8), torch.randn(6, 2), 0.0)
    assert reason is not None and "TRITON_INTERPRET=1" in reason


# ---- through the registered op ----------------------------------------------------------------------------------

@runnable
@pytest.mark.skipif(not INTERPRETED, reason="the op's triton backend on CPU tensors needs the interpreter")
def test_registered_op_runs_the_kernels(monkeypatch, lora_inputs):
    """``FASTLORA_BACKEND=triton`` on CPU tensors (interpreter): the op's output and gradients come from
    these kernels and match the reference."""
    from fastlora import lora_linear
    from fastlora.reference import lora_linear_ref

    monkeypatch.setenv("FASTLORA_BACKEND", "triton")
    calls = []
    real = kernels.lora_linear_fwd
    monkeypatch.setattr(kernels, "lora_linear_fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    inp = lora_inputs(9, 48, 24, 4)
    leaves = _leaves(inp)
    y = lora_linear(*leaves, SCALING)
    y.backward(inp.dy)
    ref_leaves = _leaves(inp)
    y_ref = lora_linear_ref(*ref_leaves, SCALING)
    y_ref.backward(inp.dy)
    assert calls, "the op did not call fastlora.kernels.lora_linear_fwd"
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name, g, g_ref in zip(("dx", "dW", "db", "dA", "dB"), (t.grad for t in leaves), (t.grad for t in ref_leaves)):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5, msg=name)
