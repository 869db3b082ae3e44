"""``fastlora::nf4_linear``: a linear layer with a frozen NF4 (bitsandbytes-format) weight, LoRA optional.

    y = x deq(W)^T + b + scaling * (dropout(x) A^T) B^T

The same contract as ``fastlora::lora_linear`` (dropout from a saved seed, regenerated in the backward;
S = dropout(x) A^T the only activation saved besides x), with the base weight read from its packed 4-bit
form: on CUDA by the NF4 kernels (``fastlora.kernels.nf4_linear``), elsewhere by dequantizing with the
reference (``fastlora.quant``) and running the LoRA reference. The 4-bit weight never gets a gradient.

Registered through ``torch.library`` (flat arguments: the NF4 state's tensors and sizes) with a fake
implementation and autograd; eager calls run the same functions through an ``autograd.Function``,
as ``lora_linear`` does, to skip the dispatcher's overhead.
"""

from __future__ import annotations

import functools

import torch

from fastlora import reference
from fastlora.ops.dispatch import resolve_backend, serving_kernels
from fastlora.quant.nf4 import NF4_CODE, NF4State, dequantize_nf4

__all__ = ["nf4_linear"]

_SEED_HIGH = 2**31 - 1


@functools.lru_cache(maxsize=None)
def _code_on(device: torch.device) -> torch.Tensor:
    return NF4_CODE.to(device)


def _kernels_for(x, packed, state, bias, lora_A, lora_B, dropout_p):
    return serving_kernels("nf4_linear", x.device, x.reshape(-1, x.shape[-1]), packed, state, bias, lora_A, lora_B,
                           dropout_p)


def _state(absmax, nested_absmax, nested_code, offset, shape, blocksize, nested_blocksize,
           with_code: bool = True) -> NF4State:
    """The NF4State the op's flat arguments describe. ``with_code=False`` leaves the codebook on the
    CPU: autograd's setup_context also runs while torch.compile traces with fake tensors, and it only
    needs the state's shapes and devices."""
    return NF4State(
        absmax=absmax, shape=torch.Size(shape), dtype=torch.float32, blocksize=blocksize,
        code=_code_on(absmax.device) if with_code else NF4_CODE, nested_absmax=nested_absmax,
        nested_code=nested_code, nested_blocksize=nested_blocksize, offset=offset,
    )


def _state_args(state: NF4State) -> tuple:
    return (state.absmax, state.nested_absmax, state.nested_code, float(state.offset), list(state.shape),
            state.blocksize, state.nested_blocksize)


def _forward(x, packed, state, bias, lora_A, lora_B, scaling, dropout_p):
    """``(y [..., N], S [M, r] (empty without LoRA), seed [])``."""
    x2 = x.reshape(-1, x.shape[-1])
    has_dropout = lora_A is not None and dropout_p > 0.0
    if has_dropout:
        seed = torch.randint(0, _SEED_HIGH, (), device=x.device, dtype=torch.int64)
    else:
        seed = torch.zeros((), device=x.device, dtype=torch.int64)
    kernels = _kernels_for(x, packed, state, bias, lora_A, lora_B, dropout_p)
    if kernels is not None:
        y, s = kernels.nf4_linear_fwd(x2, packed, state, bias, lora_A, lora_B, scaling, dropout_p, seed)
    else:
        weight = dequantize_nf4(packed, state, x.dtype)
        if lora_A is None:
            y, s = torch.nn.functional.linear(x2, weight, None if bias is None else bias.to(x.dtype)), None
        else:
            y, s = reference.lora_linear_fwd_ref(
                x2, weight, bias, lora_A, lora_B, scaling, dropout_p, int(seed) if has_dropout else 0
            )
    if s is None:
        s = x.new_empty(0, dtype=torch.promote_types(x.dtype, torch.float32))
    return y.reshape(*x.shape[:-1], state.shape[0]), s, seed


def _gradients(dy, x, packed, state, lora_A, lora_B, s, seed, scaling, dropout_p, needs, use_kernels):
    """``(dx, db, dA, dB)``, None where ``needs`` says a gradient is not wanted."""
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    needs_dx, needs_db, needs_da, needs_dbB = needs
    kernels = resolve_backend("nf4_linear", x.device) if use_kernels else None
    if kernels is not None:
        grads = kernels.nf4_linear_bwd(dy2, x2, packed, state, lora_A, lora_B, s, seed, scaling, dropout_p, *needs)
    elif lora_A is None:
        dy2 = dy2.to(x.dtype)
        dx = dy2 @ dequantize_nf4(packed, state, x.dtype) if needs_dx else None  # [M, N] @ [N, K]
        grads = (dx, dy2.sum(0) if needs_db else None, None, None)
    else:
        weight = dequantize_nf4(packed, state, x.dtype) if needs_dx else \
            torch.empty((), dtype=x.dtype, device=x.device).expand(*state.shape)  # only its shape is read
        dx, _, db, da, dbB = reference.lora_linear_bwd_ref(
            dy2, x2, weight, lora_A, lora_B, s, scaling, dropout_p, int(seed) if dropout_p > 0.0 else 0,
            needs_dx, False, needs_db, needs_da, needs_dbB,
        )
        grads = (dx, db, da, dbB)
    dx = grads[0].reshape(x.shape) if grads[0] is not None else None
    return (dx, *grads[1:])


# ---- the registered op (what torch.compile traces) -----------------------------------------------
@torch.library.custom_op("fastlora::nf4_linear", mutates_args=())
def _nf4_linear_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: float,
    shape: list[int],
    blocksize: int,
    nested_blocksize: int,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    state = _state(absmax, nested_absmax, nested_code, offset, shape, blocksize, nested_blocksize)
    y, s, seed = _forward(x, packed, state, bias, lora_A, lora_B, scaling, dropout_p)
    return y, s, seed


@_nf4_linear_op.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, offset, shape, blocksize, nested_blocksize, bias, lora_A,
      lora_B, scaling, dropout_p):
    m = x.numel() // x.shape[-1]
    s_shape = (m, lora_A.shape[0]) if lora_A is not None else (0,)
    return (x.new_empty((*x.shape[:-1], shape[0])),
            x.new_empty(s_shape, dtype=torch.promote_types(x.dtype, torch.float32)),
            x.new_empty((), dtype=torch.int64))


@torch.library.custom_op("fastlora::nf4_linear_backward", mutates_args=())
def _nf4_linear_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: float,
    shape: list[int],
    blocksize: int,
    nested_blocksize: int,
    lora_A: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    s: torch.Tensor,
    seed: torch.Tensor,
    scaling: float,
    dropout_p: float,
    needs: list[bool],
    use_kernels: bool,
) -> list[torch.Tensor]:
    """Gradients ``[dx, db, dA, dB]``; an empty tensor stands for one not asked for."""
    state = _state(absmax, nested_absmax, nested_code, offset, shape, blocksize, nested_blocksize)
    grads = _gradients(dy, x, packed, state, lora_A, lora_B, s, seed, scaling, dropout_p, needs, use_kernels)
    return [g if g is not None else x.new_empty(0) for g in grads]


@_nf4_linear_backward_op.register_fake
def _(dy, x, packed, absmax, nested_absmax, nested_code, offset, shape, blocksize, nested_blocksize, lora_A, lora_B,
      s, seed, scaling, dropout_p, needs, use_kernels):
    shapes = (x.shape, shape[:1], None if lora_A is None else lora_A.shape, None if lora_B is None else lora_B.shape)
    dtypes = (x.dtype, x.dtype, None if lora_A is None else lora_A.dtype, None if lora_B is None else lora_B.dtype)
    return [x.new_empty(sh, dtype=dt) if need else x.new_empty(0) for need, sh, dt in zip(needs, shapes, dtypes)]


def _op_setup_context(ctx, inputs, output):
    x, packed, absmax, nested_absmax, nested_code, offset, shape, blocksize, nested_blocksize, bias, lora_A, \
        lora_B, scaling, dropout_p = inputs
    _, s, seed = output
    state = _state(absmax, nested_absmax, nested_code, offset, shape, blocksize, nested_blocksize, with_code=False)
    _save(ctx, x, packed, state, bias, lora_A, lora_B, scaling, dropout_p, s, seed)
    ctx.grad_index = (0, 9, 10, 11)  # x, bias, lora_A, lora_B among the op's inputs


def _op_backward(ctx, dy, _ds, _dseed):
    def gradients(dy, x, packed, state, lora_A, lora_B, s, seed, scaling, dropout_p, needs, use_kernels):
        grads = _nf4_linear_backward_op(dy, x, packed, *_state_args(state), lora_A, lora_B, s, seed, scaling,
                                        dropout_p, needs, use_kernels)
        return [g if need else None for g, need in zip(grads, needs)]

    x_grad, db, da, dbB = _backward(ctx, dy, gradients)
    # inputs: x, packed, absmax, nested_absmax, nested_code, offset, shape, blocksize, nested_blocksize,
    # bias, lora_A, lora_B, scaling, dropout_p
    return x_grad, None, None, None, None, None, None, None, None, db, da, dbB, None, None


_nf4_linear_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# ---- shared by the registered op and the eager Function --------------------------------------------
def _save(ctx, x, packed, state, bias, lora_A, lora_B, scaling, dropout_p, s, seed) -> None:
    # Saved: x (alive anyway as the layer input), S [M, r] and the seed; the 4-bit weight and its state
    # are the layer's own (frozen) tensors. Never a dropout mask, never a dequantized weight.
    ctx.save_for_backward(x, lora_A, lora_B, s, seed)
    ctx.packed, ctx.state = packed, state
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.has_lora = lora_A is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.use_kernels = _kernels_for(x, packed, state, bias, lora_A, lora_B, dropout_p) is not None


def _backward(ctx, dy, gradients):
    """W frozen and 4-bit; with S = dropout(x) A^T saved by the forward and G = dY B:

        dB = scaling * dY^T S                                [N, r]
        dA = scaling * G^T dropout(x)                        [r, K]   (mask regenerated from the seed)
        dx = dY deq(W) + scaling * mask/(1-p) * (G A)        [M, K]   (W dequantized again, not saved)
        db = sum_M dY                                        (only when the bias requires grad)
    """
    x, lora_A, lora_B, s, seed = ctx.saved_tensors
    needs = [ctx.needs_input_grad[i] for i in ctx.grad_index]
    needs[2] = needs[2] and ctx.has_lora
    needs[3] = needs[3] and ctx.has_lora
    if not any(needs):
        return None, None, None, None
    dx, db, da, dbB = gradients(dy, x, ctx.packed, ctx.state, lora_A, lora_B, s, seed, ctx.scaling, ctx.dropout_p,
                                needs, ctx.use_kernels)
    if db is not None:
        db = db.to(ctx.bias_dtype)
    return dx, db, da, dbB


class _NF4LinearFunction(torch.autograd.Function):
    """The registered op's forward, saved tensors and backward, for eager calls."""

    @staticmethod
    def forward(ctx, x, packed, state, bias, lora_A, lora_B, scaling, dropout_p):
        y, s, seed = _forward(x, packed, state, bias, lora_A, lora_B, scaling, dropout_p)
        _save(ctx, x, packed, state, bias, lora_A, lora_B, scaling, dropout_p, s, seed)
        ctx.grad_index = (0, 3, 4, 5)  # x, bias, lora_A, lora_B among forward's inputs
        return y

    @staticmethod
    def backward(ctx, dy):
        dx, db, da, dbB = _backward(ctx, dy, _gradients)
        return dx, None, None, db, da, dbB, None, None


def nf4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    state: NF4State,
    bias: torch.Tensor | None = None,
    lora_A: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """``y = x deq(W)^T + b (+ scaling * (dropout(x) A^T) B^T)`` in x's dtype, with W the NF4 weight
    ``(packed, state)`` of shape ``state.shape = [out, in]``, x: [..., in], A: [r, in], B: [out, r].
    The weight is dequantized to x's dtype (bitsandbytes' values); dropout applies in training only.
    """
    if (lora_A is None) != (lora_B is None):
        raise ValueError("nf4_linear: lora_A and lora_B come together")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    n, k = state.shape
    if x.shape[-1] != k or (lora_A is not None and (lora_A.shape[1] != k or lora_B.shape[0] != n
                                                    or lora_A.shape[0] != lora_B.shape[1])):
        raise ValueError(
            f"nf4_linear: shapes do not fit: x {tuple(x.shape)}, weight {(n, k)}, "
            f"lora_A {None if lora_A is None else tuple(lora_A.shape)}, "
            f"lora_B {None if lora_B is None else tuple(lora_B.shape)}"
        )
    if not x.dtype.is_floating_point:
        raise TypeError(f"nf4_linear: the input must be floating point, got {x.dtype}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        x = x.to(torch.get_autocast_dtype(device_type))
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)  # differentiable: a trainable bias gets its gradient in its own dtype
    p = float(dropout_p) if training and lora_A is not None else 0.0
    if torch.compiler.is_compiling():
        return _nf4_linear_op(x, packed, *_state_args(state), bias, lora_A, lora_B, float(scaling), p)[0]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias, lora_A, lora_B)):
        return _NF4LinearFunction.apply(x, packed, state, bias, lora_A, lora_B, float(scaling), p)
    return _forward(x, packed, state, bias, lora_A, lora_B, float(scaling), p)[0]
