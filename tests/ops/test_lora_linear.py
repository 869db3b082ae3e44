"""``fastlora.ops.lora_linear`` (``torch.ops.fastlora.lora_linear``): registration, numerics against the
autograd oracle ``fastlora.reference.lora_linear_ref``, dropout, the memory contract and errors
(compile, autocast and backend switching: test_lora_linear_backends.py).

Tolerance rule (STYLE.md, flash-attention's): against an fp64 "gold" computed from the same values, the
op's max error may be at most twice the error of the oracle run by PyTorch in the op's dtype, plus a
small per-dtype atol. The dropout mask: for a few rows (at most ``SMALL_MASK`` elements) the op draws
it straight from torch's generator as ``F.dropout`` does; for more, it draws a seed with
``torch.randint(0, _SEED_HIGH, ())`` there and the mask from that. After ``torch.manual_seed(s)`` the
same draws tell the oracle which mask the op used (``_op_mask``).
"""

from __future__ import annotations

import math

import pytest
import torch

import fastlora
from fastlora.ops import lora_linear
from fastlora.ops.lora_linear import _SEED_HIGH
from fastlora.reference import SMALL_MASK, dropout_mask, lora_linear_ref
from lora_cases import _clone, _make

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _op_seed(seed: int) -> int:
    """The dropout seed the op will draw after ``torch.manual_seed(seed)`` on CPU (for more than SMALL_MASK
    elements of x)."""
    torch.manual_seed(seed)
    return int(torch.randint(0, _SEED_HIGH, (), dtype=torch.int64))


def _op_mask(seed: int, x: torch.Tensor, p: float) -> torch.Tensor:
    """The keep-mask ``[M, K]`` the op draws for x after ``torch.manual_seed(seed)`` on CPU."""
    shape = (x.numel() // x.shape[-1], x.shape[-1])
    if x.numel() <= SMALL_MASK:
        torch.manual_seed(seed)
        return torch.empty(shape, dtype=x.dtype).bernoulli_(1.0 - p)  # as F.dropout draws its noise
    return dropout_mask(torch.Size(shape), p, _op_seed(seed), x.device)


def _weight(w_leaf, transposed):
    return w_leaf.t() if transposed else w_leaf


def _run(fn, leaves, transposed, dy, **kw):
    """Output and gradients of every leaf that requires grad (None for the others)."""
    x, w_leaf, b, a, bb = leaves
    y = fn(x, _weight(w_leaf, transposed), b, a, bb, **kw)
    y.backward(dy)
    grads = [t.grad if (t is not None and t.requires_grad) else None for t in leaves]
    return y.detach(), grads


def _max_err(got, gold):
    return (got.double() - gold).abs().max().item()


def _check_against_oracle(leaves, transposed, dtype, scaling=0.75, p=0.0, training=False, seed=0):
    """Op vs fp64 gold, with twice PyTorch's own error (oracle in ``dtype``) plus atol as the bound."""
    y_shape = (*leaves[0].shape[:-1], (leaves[1].shape[0] if not transposed else leaves[1].shape[1]))
    dy = torch.randn(y_shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    keep = _op_mask(seed, leaves[0], p) if p > 0.0 else None

    torch.manual_seed(seed)  # the op draws its dropout mask (or the mask's seed) from here
    y, grads = _run(lora_linear, _clone(leaves), transposed, dy,
                    scaling=scaling, dropout_p=p, training=training)
    oracle = dict(scaling=scaling, dropout_p=p, training=training, keep=keep)
    y_gold, g_gold = _run(lora_linear_ref, _clone(leaves, torch.float64), transposed, dy.double(), **oracle)
    y_torch, g_torch = _run(lora_linear_ref, _clone(leaves), transposed, dy, **oracle)

    assert y.dtype == dtype and y.shape == y_shape
    atol = ATOL[dtype]
    bound = 2 * _max_err(y_torch, y_gold) + atol
    assert _max_err(y, y_gold) <= bound, f"output error {_max_err(y, y_gold):.3g} > {bound:.3g}"
    names = ["x", "weight", "bias", "lora_A", "lora_B"]
    for name, leaf, g, gg, gt in zip(names, leaves, grads, g_gold, g_torch):
        if leaf is None or not leaf.requires_grad:
            assert g is None, name
            continue
        assert g is not None, f"no gradient for {name}"
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, name
        bound = 2 * _max_err(gt, gg) + atol * max(1.0, gg.abs().max().item())
        assert _max_err(g, gg) <= bound, f"d{name} error {_max_err(g, gg):.3g} > {bound:.3g}"


# ---- registration ---------------------------------------------------------------------------------------

def test_registered_with_torch_library():
    assert hasattr(torch.ops.fastlora, "lora_linear")
    assert fastlora.lora_linear is lora_linear
    x, w, b, a, bb = _make()
    y, s, seed, mask = torch.ops.fastlora.lora_linear(x, w, b, a, bb, 0.5, 0.0)
    assert y.shape == (16, 24) and s.shape == (16, 4) and seed.dtype == torch.int64 and mask.numel() == 0
    # with dropout: a few rows' mask is an output (the backward reads it), more rows' a seed
    _, _, seed, mask = torch.ops.fastlora.lora_linear(x, w, b, a, bb, 0.5, 0.3)
    assert mask.shape == (16, 32) and mask.dtype == x.dtype and set(mask.unique().tolist()) == {0.0, 1.0}
    big = torch.randn(200, 32)
    _, _, seed, mask = torch.ops.fastlora.lora_linear(big, w, b, a, bb, 0.5, 0.3)
    assert big.numel() > SMALL_MASK and mask.numel() == 0 and seed.dim() == 0


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("lead", [(6,), (2, 3), (2, 150)], ids=["2d", "3d", "3d-seeded-mask"])
def test_opcheck_forward(bias, p, lead):
    # opcheck seeds torch's generator identically before each run it compares, and the op draws its
    # dropout mask (or the mask's seed) from that generator, so dropout > 0 is checked too
    # (test_aot_dispatch_dynamic included).
    x, w, b, a, bb = _make(lead=lead, k=16, n=12, r=4, bias=bias)
    torch.library.opcheck(torch.ops.fastlora.lora_linear.default, (x, w, b, a, bb, 0.5, p))


@pytest.mark.parametrize("needs", [[True, False, True, True, True], [False, True, False, True, False]],
                         ids=["dx-db-dA-dB", "dW-dA"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("m", [16, 300], ids=["kept-mask", "seeded-mask"])
def test_opcheck_backward(needs, p, m):
    x, w, b, a, bb = (t.detach() for t in _make(lead=(m,), k=16, n=12, r=4))
    y, s, seed, mask = torch.ops.fastlora.lora_linear(x, w, b, a, bb, 0.5, p)
    assert (mask.numel() > 0) == (p > 0.0 and m == 16)
    dy = torch.randn_like(y)
    seed_or_mask = mask if mask.numel() else seed
    torch.library.opcheck(torch.ops.fastlora.lora_linear_backward.default,
                          (dy, x, w, a, bb, s, seed_or_mask, 0.5, p, needs, False))


# ---- numerics against the oracle --------------------------------------------------------------------------

SHAPES = [
    pytest.param((16,), 32, 24, 4, id="M16-K32-N24-r4"),
    pytest.param((133,), 200, 77, 12, id="M133-K200-N77-r12"),
    pytest.param((3, 45), 200, 77, 12, id="B3xT45-K200-N77-r12"),
    pytest.param((2, 5), 40, 8, 1, id="B2xT5-K40-N8-r1"),
    pytest.param((1, 3), 24, 10, 2, id="B1xT3-K24-N10-r2"),
]
DTYPES = [
    pytest.param(torch.float32, None, id="fp32"),
    pytest.param(torch.float16, None, id="fp16"),
    pytest.param(torch.float16, torch.float32, id="fp16-A32"),
    pytest.param(torch.bfloat16, None, id="bf16"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16-A32"),
]


@pytest.mark.parametrize("p", [0.0, 0.2], ids=["nodrop", "drop0.2"])
@pytest.mark.parametrize("transposed", [False, True], ids=["w", "w_kn.t()"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype, adapter_dtype", DTYPES)
@pytest.mark.parametrize("lead, k, n, r", SHAPES)
def test_matches_oracle(lead, k, n, r, dtype, adapter_dtype, bias, transposed, p):
    leaves = _make(lead, k, n, r, dtype, adapter_dtype, bias, transposed)
    _check_against_oracle(leaves, transposed, dtype, p=p, training=True, seed=3)


@pytest.mark.parametrize("transposed", [False, True], ids=["w", "w_kn.t()"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("p", [0.0, 0.2], ids=["nodrop", "drop0.2"])
def test_weight_gradient_when_the_weight_requires_grad(transposed, dtype, p):
    leaves = _make((2, 17), 48, 20, 6, dtype, None, True, transposed, weight_grad=True)
    _check_against_oracle(leaves, transposed, dtype, p=p, training=True, seed=5)


def test_frozen_inputs_get_no_gradient():
    x, w, b, a, bb = _make()
    x.requires_grad_(False)
    b.requires_grad_(False)
    y = lora_linear(x, w, b, a, bb, 0.5)
    y.sum().backward()
    assert x.grad is None and b.grad is None and w.grad is None
    assert a.grad is not None and bb.grad is not None


@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-3), (torch.bfloat16, 0.1)], ids=["fp32", "bf16"])
def test_oracle_check_detects_a_wrong_scaling(dtype, rel):
    # The tolerance rule is tight enough to notice a slightly wrong scaling of the low-rank path.
    leaves = [t.detach() for t in _make((133,), 200, 77, 12, dtype, torch.float32)]
    y = lora_linear(*leaves, 0.75 * (1 + rel))
    gold = lora_linear_ref(*(t.double() for t in leaves), 0.75)
    torch_err = _max_err(lora_linear_ref(*leaves, 0.75), gold)
    assert _max_err(y, gold) > 2 * torch_err + ATOL[dtype]


# ---- precision contract: the input is never copied to fp32 ---------------------------------------------

_MATMULS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::matmul", "aten::bmm", "aten::baddbmm", "aten::linear"}


def _fp32_copies_of(numel: int, fn) -> list[str]:
    """Aten ops run by ``fn`` (forward and backward) that convert a low-precision tensor of >= ``numel``
    elements to fp32, or multiply such an fp32 tensor: what "the input is copied to fp32" looks like.

    (The reference path's dropout draws an fp32 uniform tensor of x's size to build its mask; that is
    random numbers, not a copy of x, and the kernels never materialize it, so it is not counted.)
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    found = []
    for event in prof.events():
        big = [(shape, dtype) for shape, dtype in zip(event.input_shapes, event.input_dtypes)
               if shape and math.prod(shape) >= numel]
        concrete = event.concrete_inputs or []
        # torch.float32 is ScalarType 6 in the dtype argument of aten::to / aten::_to_copy
        if event.name in ("aten::to", "aten::_to_copy") and len(concrete) > 1 and concrete[1] == 6 \
                and any(dtype != "float" for _, dtype in big):
            found.append(f"{event.name} converts {big} to float")
        if event.name == "aten::copy_" and len(big) >= 2 and big[0][1] == "float" and big[1][1] != "float":
            found.append(f"aten::copy_ {big[1]} into float")
        if event.name in _MATMULS and any(dtype == "float" for _, dtype in big):
            found.append(f"{event.name} multiplies float {big}")
    return found


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["nodrop", "drop0.1"])
def test_bf16_input_is_never_upcast_with_fp32_adapters(p):
    x, w, b, a, bb = _make((96,), 64, 48, 8, torch.bfloat16, torch.float32)  # x: 6144 elements, A: 512, B: 384

    def step():
        lora_linear(x, w, b, a, bb, 0.5, p, training=True).float().sum().backward()

    assert _fp32_copies_of(x.numel(), lambda: lora_linear(x, w, b, a, bb, 0.5, p, training=True)) == []
    # the whole step, minus the final .float() of y ([96, 48] = 4608 < 6144 elements)
    assert _fp32_copies_of(x.numel(), step) == []
    assert a.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


def test_fp32_copy_detector_sees_an_upcast():
    # The check above can fail: the same detector flags the naive "x.float() @ A^T" PEFT-style path.
    x, w, b, a, bb = _make((96,), 64, 48, 8, torch.bfloat16, torch.float32)
    found = _fp32_copies_of(x.numel(), lambda: (x.float() @ a.t()).sum().backward())
    assert found


# ---- dropout -------------------------------------------------------------------------------------------------

def _identity_probe(m=4096, k=16, p=0.3, training=True):
    """x = 1, W = 0, A = B = I, scaling 1: the output is exactly the op's dropout mask / (1 - p)."""
    x = torch.ones(m, k, requires_grad=True)
    w = torch.zeros(k, k)
    eye_a = torch.eye(k).requires_grad_(True)
    eye_b = torch.eye(k).requires_grad_(True)
    y = lora_linear(x, w, None, eye_a, eye_b, 1.0, p, training=training)
    return x, y


def test_dropout_output_is_the_inverted_mask():
    p = 0.3
    _, y = _identity_probe(p=p)
    values = sorted(y.detach().unique().tolist())
    assert values == [0.0, pytest.approx(1 / (1 - p))]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keeps_about_one_minus_p(p):
    torch.manual_seed(0)
    _, y = _identity_probe(p=p)
    n = y.numel()
    kept = (y != 0).float().mean().item()
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)


def test_dropout_only_in_training_mode():
    x, w, b, a, bb = _make()
    eval_y = lora_linear(x, w, b, a, bb, 0.5, 0.5, training=False)
    no_drop = lora_linear(x, w, b, a, bb, 0.5, 0.0, training=False)
    torch.manual_seed(0)
    train_y = lora_linear(x, w, b, a, bb, 0.5, 0.5, training=True)
    assert torch.equal(eval_y, no_drop)
    assert not torch.allclose(train_y, no_drop)


def test_p0_in_training_equals_the_no_dropout_path():
    x, w, b, a, bb = _make(lead=(3, 11), k=20, n=9, r=3)
    torch.testing.assert_close(lora_linear(x, w, b, a, bb, 0.5, 0.0, training=True),
                               lora_linear(x, w, b, a, bb, 0.5, 0.0, training=False), rtol=0, atol=0)


def test_manual_seed_reproduces_and_seeds_differ():
    torch.manual_seed(123)
    _, y1 = _identity_probe()
    torch.manual_seed(123)
    _, y2 = _identity_probe()
    torch.manual_seed(124)
    _, y3 = _identity_probe()
    _, y4 = _identity_probe()  # the generator moved on: the next call draws a new mask too
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)
    assert not torch.equal(y3, y4)


@pytest.mark.parametrize("lead", [(2, 5), (4, 100)], ids=["kept-mask", "seeded-mask"])
def test_no_grad_dropout_matches_the_grad_path_and_leaves_x_alone(lead):
    # Without grad the small mask is scratch (x is dropped into it): same values, x untouched.
    x, w, b, a, bb = _make(lead=lead, k=24, n=16, r=4)
    assert (x.numel() <= SMALL_MASK) == (lead == (2, 5))
    x_before = x.detach().clone()
    torch.manual_seed(9)
    y_grad = lora_linear(x, w, b, a, bb, 0.5, 0.4, training=True)
    torch.manual_seed(9)
    with torch.no_grad():
        y_nograd = lora_linear(x, w, b, a, bb, 0.5, 0.4, training=True)
    torch.testing.assert_close(y_nograd, y_grad.detach(), rtol=0, atol=0)
    assert torch.equal(x.detach(), x_before)
    assert not torch.allclose(y_nograd, lora_linear(x.detach(), w, b, a, bb, 0.5, 0.0))


def test_backward_uses_the_forward_mask():
    # With W = 0: dx = mask/(1-p) * (dY B A) -- zero exactly where the forward dropped x.
    p = 0.4
    torch.manual_seed(7)
    x, y = _identity_probe(m=512, p=p)
    torch.rand(1000)  # moving the global generator between forward and backward changes nothing
    y.backward(torch.ones_like(y))
    keep = y.detach() != 0
    torch.testing.assert_close(x.grad, keep.float() / (1 - p), rtol=0, atol=1e-6)


def test_backward_mask_matches_oracle_with_the_same_seed():
    x, w, b, a, bb = _make(lead=(64,), k=40, n=24, r=6)
    dy = torch.randn(64, 24)
    keep = _op_mask(42, x, 0.5)
    torch.manual_seed(42)
    y = lora_linear(x, w, b, a, bb, 2.0, 0.5, training=True)
    y.backward(dy)
    got = [t.grad.clone() for t in (x, a, bb)]
    for t in (x, a, bb, b):
        t.grad = None
    y_ref = lora_linear_ref(x, w, b, a, bb, 2.0, 0.5, training=True, keep=keep)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref)
    for g, t in zip(got, (x, a, bb)):
        torch.testing.assert_close(g, t.grad)
    # and a different seed would not have matched: the comparison is sensitive to the mask
    other = lora_linear_ref(x, w, b, a, bb, 2.0, 0.5, training=True, keep=_op_mask(43, x, 0.5))
    assert not torch.allclose(y, other)


# ---- memory contract: what is saved for backward -------------------------------------------------------------

def _saved_tensors(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def _beyond_x(saved, x):
    """The saved tensors that are neither x nor a view of it."""
    return [t for t in saved if t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()]


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["nodrop", "drop0.3"])
def test_eager_reference_saves_x_and_at_most_a_byte_mask(p):
    x, w, b, a, bb = _make(lead=(4, 64), k=48, n=40, r=8)  # x: 12288 elements (over SMALL_MASK), W: 1920, S: 2048
    assert x.numel() > SMALL_MASK
    y, saved = _saved_tensors(lambda: lora_linear(x, w, b, a, bb, 0.5, p, training=True))
    big = [t for t in _beyond_x(saved, x) if t.numel() >= x.numel()]
    # Without dropout nothing x-sized but x; with it, the mask as one byte per element of x (a quarter of
    # fp32 x; PEFT keeps a dropped copy of x and an fp32 mask).
    assert [(t.dtype, t.numel()) for t in big] == ([] if p == 0.0 else [(torch.uint8, x.numel())])
    small = [t for t in _beyond_x(saved, x) if t.numel() < x.numel()]
    assert sum(t.numel() for t in small) <= w.numel() + a.numel() + bb.numel() + 256 * 8 + 1
    y.sum().backward()  # and what was saved suffices


@pytest.mark.parametrize("registered", [False, True], ids=["eager", "registered"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["nodrop", "drop0.3"])
def test_a_few_rows_save_one_mask_in_the_input_dtype(p, registered):
    # Decode sizes (at most SMALL_MASK elements): the mask in x's dtype, where multiplying by it is a large
    # part of the call; one x-sized tensor beside x, where PEFT keeps two (a dropped copy of x, its mask).
    x, w, b, a, bb = _make(lead=(1, 4), k=48, n=40, r=8)
    if registered:
        y, saved = _saved_tensors(lambda: torch.ops.fastlora.lora_linear(x, w, b, a, bb, 0.5, p)[0])
    else:
        y, saved = _saved_tensors(lambda: lora_linear(x, w, b, a, bb, 0.5, p, training=True))
    x_sized = [t for t in _beyond_x(saved, x) if t.numel() == x.numel()]  # the weights are larger here
    assert [t.dtype for t in x_sized] == ([] if p == 0.0 else [x.dtype])
    y.sum().backward()


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["nodrop", "drop0.3"])
def test_registered_op_saves_nothing_x_sized_but_x(p):
    # What torch.compile traces keeps the seed of a mask over SMALL_MASK elements and draws the mask again
    # in its backward.
    x, w, b, a, bb = _make(lead=(4, 32), k=48, n=40, r=8)
    assert x.numel() > SMALL_MASK
    (y, _, _, _), saved = _saved_tensors(lambda: torch.ops.fastlora.lora_linear(x, w, b, a, bb, 0.5, p))
    assert not [t.shape for t in _beyond_x(saved, x) if t.numel() >= x.numel()]
    assert sum(t.numel() for t in _beyond_x(saved, x)) <= w.numel() + a.numel() + bb.numel() + 128 * 8 + 1
    y.sum().backward()


def test_saved_tensor_probe_sees_a_materialized_mask():
    # The check above can fail: the autograd oracle with dropout saves x-sized tensors besides x.
    x, w, b, a, bb = _make(lead=(4, 32), k=48, n=40, r=8)
    _, saved = _saved_tensors(lambda: lora_linear_ref(x, w, b, a, bb, 0.5, 0.3, training=True, seed=1))
    assert any(t.numel() >= x.numel() and t.data_ptr() != x.data_ptr() for t in saved)


# ---- errors ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "which, shape, match",
    [
        ("x", (16, 31), "shapes do not fit"),
        ("weight", (24, 31), "shapes do not fit"),
        ("lora_A", (4, 31), "shapes do not fit"),
        ("lora_B", (23, 4), "shapes do not fit"),
        ("lora_B", (24, 5), "rank mismatch"),
    ],
)
def test_bad_shapes_raise(which, shape, match):
    args = dict(zip(("x", "weight", "bias", "lora_A", "lora_B"), _make()))
    args[which] = torch.randn(shape)
    with pytest.raises(ValueError, match=match):
        lora_linear(args["x"], args["weight"], args["bias"], args["lora_A"], args["lora_B"], 0.5)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
@pytest.mark.parametrize("training", [True, False])
def test_dropout_outside_unit_interval_raises(p, training):
    x, w, b, a, bb = _make()
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        lora_linear(x, w, b, a, bb, 0.5, p, training=training)


# ---- eager paths against the registered op --------------------------------------------------------------------

@pytest.mark.parametrize("lead", [(1, 3), (3, 60), (3, 200)], ids=["3rows", "180rows", "600rows"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["nodrop", "drop"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_eager_paths_match_registered_op(p, bias, lead):
    """Eager calls (an autograd.Function, which keeps the dropout mask) compute what the registered op
    computes, gradients included, with the same dropout mask for the same torch seed: small masks
    (drawn from torch's generator, kept by both; 180 rows: 3600 elements) and large ones (SFC64, which
    the registered op draws again in its backward; 600 rows: 12000 elements, five blocks of rows)."""
    x, w, b, a, bb = _make(lead=lead, k=20, n=12, r=4)
    b = b if bias else None
    eager, registered = _clone((x, w, b, a, bb)), _clone((x, w, b, a, bb))
    torch.manual_seed(5)
    y_eager = lora_linear(*eager, 0.7, p, training=True)
    torch.manual_seed(5)
    y_op = torch.ops.fastlora.lora_linear(*registered, 0.7, p)[0]
    torch.testing.assert_close(y_eager, y_op)
    dy = torch.randn_like(y_op)
    y_eager.backward(dy)
    y_op.backward(dy)
    for got, want in zip(eager, registered):
        if want is not None and want.requires_grad:
            torch.testing.assert_close(got.grad, want.grad)
