"""``fastlora.reference``: the pure-PyTorch spec. Its split forward/backward (the CPU path of the op)
must agree with autograd through ``lora_linear_ref`` (the oracle), and the oracle with the math in
DESIGN.md written out in fp64.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastlora.reference import NARROW_ROWS, SMALL_MASK, TRANSPOSED_ROWS, TRANSPOSED_TILE, dropout_mask, lora_linear_bwd_ref, lora_linear_fwd_ref, lora_linear_ref

F64 = dict(rtol=1e-10, atol=1e-10)


def _inputs(m=20, k=12, n=10, r=3, dtype=torch.float64, transposed=False, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g, dtype=dtype)
    w = torch.randn(k, n, generator=g, dtype=dtype).t() if transposed else torch.randn(n, k, generator=g, dtype=dtype)
    b = torch.randn(n, generator=g, dtype=dtype) if bias else None
    a = torch.randn(r, k, generator=g, dtype=dtype)
    bb = torch.randn(n, r, generator=g, dtype=dtype)
    return x, w, b, a, bb


# ---- dropout mask -----------------------------------------------------------------------------------

# Both generators: torch's bernoulli_ up to SMALL_MASK elements, SFC64 above.
MASK_SHAPES = pytest.mark.parametrize("shape", [torch.Size([4, 1000]), torch.Size([64, 320])], ids=["small", "large"])


@MASK_SHAPES
def test_dropout_mask_is_a_function_of_the_seed(shape):
    assert (shape.numel() <= SMALL_MASK) == (shape[0] == 4)
    m1 = dropout_mask(shape, 0.3, 1234, torch.device("cpu"))
    torch.rand(100)  # the global generator is not involved
    m2 = dropout_mask(shape, 0.3, 1234, torch.device("cpu"))
    m3 = dropout_mask(shape, 0.3, 1235, torch.device("cpu"))
    assert m1.dtype == torch.bool and m1.shape == shape
    assert torch.equal(m1, m2)
    assert not torch.equal(m1, m3)


@pytest.mark.parametrize("n", [4000, 200_000], ids=["small", "large"])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_keeps_about_one_minus_p(p, n):
    kept = dropout_mask(torch.Size([n]), p, 7, torch.device("cpu")).float().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 5 * sigma


def test_dropout_mask_p0_keeps_everything():
    assert dropout_mask(torch.Size([1000]), 0.0, 3, torch.device("cpu")).all()


# ---- the oracle against the written-out math -----------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p0.25"])
def test_oracle_matches_the_formula(bias, p):
    x, w, b, a, bb = _inputs(bias=bias)
    x3 = x.reshape(4, 5, -1)
    y = lora_linear_ref(x3, w, b, a, bb, 0.7, p, training=True, seed=11)
    keep = dropout_mask(torch.Size([20, 12]), p, 11, torch.device("cpu")).to(x.dtype)
    xd = x * keep / (1 - p)
    expected = x @ w.t() + (0 if b is None else b) + 0.7 * (xd @ a.t()) @ bb.t()
    torch.testing.assert_close(y, expected.reshape(4, 5, -1), **F64)


def test_oracle_has_no_dropout_in_eval():
    x, w, b, a, bb = _inputs()
    torch.testing.assert_close(lora_linear_ref(x, w, b, a, bb, 2.0, 0.5, training=False, seed=1),
                               lora_linear_ref(x, w, b, a, bb, 2.0, 0.0), **F64)


# ---- split forward / backward against autograd of the oracle ---------------------------------------------

@pytest.mark.parametrize("transposed", [False, True], ids=["w_nk", "w_kn.t()"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
def test_fwd_bwd_ref_match_autograd(transposed, bias, p):
    x, w, b, a, bb = _inputs(m=33, k=17, n=9, r=5, transposed=transposed, bias=bias)
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (x, w, b, a, bb)]
    scaling, seed = 1.5, 99
    y_ref = lora_linear_ref(*leaves, scaling, p, training=True, seed=seed)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)

    y, s = lora_linear_fwd_ref(x, w, b, a, bb, scaling, p, seed)
    torch.testing.assert_close(y, y_ref.detach(), **F64)
    keep = dropout_mask(x.shape, p, seed, x.device).to(x.dtype)
    torch.testing.assert_close(s, (x * keep) @ a.t(), **F64)  # S without 1 / (1 - p): see lora_linear_fwd_ref

    grads = lora_linear_bwd_ref(dy, x, w, a, bb, s, scaling, p, seed, True, True, bias, True, True)
    for got, leaf in zip(grads, leaves):
        if leaf is None:
            assert got is None
        else:
            torch.testing.assert_close(got, leaf.grad, **F64)


@pytest.mark.parametrize("r", [1, 2, 8, 12], ids=lambda r: f"r{r}")
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
def test_bwd_ref_narrow_ranks_match_autograd(r, p):
    # From NARROW_ROWS rows, ranks 2 to 8 take the transposed products (see reference.NARROW_RANKS).
    x, w, b, a, bb = _inputs(m=NARROW_ROWS + 3, k=40, n=24, r=r)
    leaves = [t.clone().requires_grad_(True) for t in (x, a, bb)]
    y_ref = lora_linear_ref(leaves[0], w, b, leaves[1], leaves[2], 0.75, p, training=True, seed=7)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    _, s = lora_linear_fwd_ref(x, w, b, a, bb, 0.75, p, 7)
    dx, _, _, da, dbB = lora_linear_bwd_ref(dy, x, w, a, bb, s, 0.75, p, 7, True, False, False, True, True)
    for got, leaf in zip((dx, da, dbB), leaves):
        torch.testing.assert_close(got, leaf.grad, **F64)
        assert got.is_contiguous()  # laid out as the parameter it is the gradient of


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_bwd_ref_narrow_rank_fp32_adapters(dtype):
    x, w, b, a, bb = _inputs(m=NARROW_ROWS * 2, k=48, n=32, r=8, dtype=torch.float32)
    xl, wl = x.to(dtype), w.to(dtype)
    leaves = [t.clone().requires_grad_(True) for t in (a, bb)]
    y_ref = lora_linear_ref(xl.float(), wl.float(), None, *leaves, 2.0)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    _, s = lora_linear_fwd_ref(xl, wl, None, a, bb, 2.0, 0.0, 0)
    _, _, _, da, dbB = lora_linear_bwd_ref(dy.to(dtype), xl, wl, a, bb, s, 2.0, 0.0, 0, False, False, False, True, True)
    assert da.dtype == dbB.dtype == torch.float32
    for got, leaf in zip((da, dbB), leaves):  # fp16: G and the products round to 11 bits
        scale = leaf.grad.abs().max().item()
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got, leaf.grad, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("m", [TRANSPOSED_ROWS[0] - 1, TRANSPOSED_ROWS[0], TRANSPOSED_TILE * 3,
                               TRANSPOSED_ROWS[1], TRANSPOSED_ROWS[1] + TRANSPOSED_TILE], ids=lambda m: f"m{m}")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
def test_fwd_ref_fp32_row_counts_match(m, bias, p):
    # Whole 16-row tiles from 16 to 192 rows in fp32 take the swapped base product (reference.TRANSPOSED_ROWS);
    # every row count gives y = the fp64 oracle's, row-major.
    x, w, b, a, bb = _inputs(m=m, k=40, n=24, r=4, bias=bias)
    y, s = lora_linear_fwd_ref(x.float(), w.float(), None if b is None else b.float(), a.float(), bb.float(),
                               1.5, p, 11)
    y_ref = lora_linear_ref(x, w, b, a, bb, 1.5, p, training=True, seed=11)
    assert y.dtype == torch.float32 and y.is_contiguous() and y.shape == (m, 24)
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-5, atol=1e-5)
    keep = dropout_mask(x.shape, p, 11, x.device).to(x.dtype)
    torch.testing.assert_close(s, ((x * keep) @ a.t()).float(), rtol=1e-5, atol=1e-5)


def test_bwd_ref_computes_only_what_is_needed():
    x, w, b, a, bb = _inputs()
    y, s = lora_linear_fwd_ref(x, w, b, a, bb, 1.0, 0.0, 0)
    dy = torch.ones_like(y)
    assert lora_linear_bwd_ref(dy, x, w, a, bb, s, 1.0, 0.0, 0, False, False, False, False, False) == (None,) * 5
    dx, dw, db, da, dbB = lora_linear_bwd_ref(dy, x, w, a, bb, s, 1.0, 0.0, 0, False, False, False, True, True)
    assert dx is None and dw is None and db is None and da is not None and dbB is not None


def test_low_precision_input_casts_adapters_down_not_input_up():
    x, w, b, a, bb = _inputs(dtype=torch.float32)
    xb, wb, bbias = x.bfloat16(), w.bfloat16(), b.bfloat16()
    y, s = lora_linear_fwd_ref(xb, wb, bbias, a, bb, 1.0, 0.1, 5)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32  # S (M x r) is kept in fp32: small and exact
    grads = lora_linear_bwd_ref(torch.ones_like(y), xb, wb, a, bb, s, 1.0, 0.1, 5, True, True, True, True, True)
    dx, dw, db, da, dbB = grads
    assert dx.dtype == dw.dtype == db.dtype == torch.bfloat16
    assert da.dtype == dbB.dtype == torch.float32  # gradients come back in the adapters' own dtype
