"""``fastlora::lora_linear``: base linear plus low-rank update, one op for every device.

Registered through ``torch.library`` with a fake implementation and an autograd formula, so it works
under ``torch.compile`` and ``torch.library.opcheck``. The implementation is chosen per call by
``fastlora.ops.dispatch`` (the reference on CPU, the fused Triton kernels on CUDA).

Eager calls skip the registered op's dispatch, which costs about 75 us per forward + backward on a
2-core CPU (torch 2.13): more than the whole LoRA update at decode sizes. They run the same forward
and backward functions through an ``autograd.Function`` (``_LoraLinearFunction``). (Native
differentiable ops, with no Python in the backward, measured up to 5% faster for one to four rows, but
their autograd keeps an extra [M, r] gradient alive: 32 bytes more than PEFT at one row, where the
Function keeps 4 KB less.) Under ``torch.compile`` the registered op is what gets traced.

Dropout on the reference: the mask is a function of a seed drawn from torch's generator (so
``torch.manual_seed`` reproduces a run). The registered op saves the seed and its backward draws the
mask again, as the kernels do. The eager ``Function`` keeps the mask as one byte per element instead:
on a CPU, drawing it again costs about what PEFT's backward spends scaling and adding [M, N] and
[M, K] tensors that ours does not (measured on a 2-core Xeon, 256 rows, 1024 -> 1024, r 8, the
backward alone: 1.15x PEFT's time with the redraw, 1.01x with the bytes), and a byte per element is an
eighth of what PEFT keeps (a dropped copy of x and its fp32 mask).
"""

from __future__ import annotations

import torch

from fastlora import reference
from fastlora.ops.dispatch import resolve_backend, serving_kernels

__all__ = ["lora_linear"]

# Dropout seeds are drawn from torch's generator on the input's device so that torch.manual_seed
# reproduces a run; int32 range keeps them valid as Triton kernel arguments.
_SEED_HIGH = 2**31 - 1


def _kernels_for(x, weight, bias, lora_A, lora_B, dropout_p):
    if resolve_backend("lora_linear", x.device) is None:  # the reference: no need to ask the kernels
        return None
    return serving_kernels("lora_linear", x.device, x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, dropout_p)


def _draw_seed(x: torch.Tensor) -> torch.Tensor:
    return torch.randint(0, _SEED_HIGH, (), device=x.device, dtype=torch.int64)


def _forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(y [..., N], S [M, r] in at least fp32, seed [])``; S and the seed are what the backward needs."""
    seed = _draw_seed(x) if dropout_p > 0.0 else torch.zeros((), device=x.device, dtype=torch.int64)
    kernels = _kernels_for(x, weight, bias, lora_A, lora_B, dropout_p)
    y, s = _run_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, kernels)
    return y, s, seed


def _run_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, kernels, keep=None):
    """``(y [..., N], S)`` on ``kernels`` (None: the reference, which also fills ``keep`` when given)."""
    x2 = x.reshape(-1, x.shape[-1])  # [..., K] -> [M, K], a view for contiguous inputs
    if kernels is None:
        y, s = reference.lora_linear_fwd_ref(
            x2, weight, bias, lora_A, lora_B, scaling, dropout_p, int(seed) if dropout_p > 0.0 else 0, keep
        )
    else:
        y, s = kernels.lora_linear_fwd(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    return (y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])), s


def _gradients(
    dy, x, weight, lora_A, lora_B, s, seed, scaling, dropout_p, needs, use_kernels, keep=None
) -> tuple[torch.Tensor | None, ...]:
    """``(dx, dW, db, dA, dB)``, None where ``needs`` says a gradient is not wanted; ``use_kernels`` is the
    forward's choice of backend; ``keep``: the forward's dropout mask as bytes (reference only), else the
    mask is drawn again from ``seed``."""
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    kernels = resolve_backend("lora_linear", x.device) if use_kernels else None
    if kernels is None:
        seed = int(seed) if dropout_p > 0.0 and keep is None else 0
        grads = reference.lora_linear_bwd_ref(dy2, x2, weight, lora_A, lora_B, s, scaling, dropout_p, seed, *needs, keep)
    else:
        grads = kernels.lora_linear_bwd(dy2, x2, weight, lora_A, lora_B, s, seed, scaling, dropout_p, *needs)
    dx = grads[0].view(x.shape) if grads[0] is not None and x.dim() != 2 else grads[0]
    return (dx, *grads[1:])


_lora_linear_op = torch.library.custom_op("fastlora::lora_linear", _forward, mutates_args=())


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
    m = x.numel() // x.shape[-1]
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    s = x.new_empty((m, lora_A.shape[0]), dtype=torch.promote_types(x.dtype, torch.float32))
    return y, s, x.new_empty((), dtype=torch.int64)


@torch.library.custom_op("fastlora::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    s: torch.Tensor,
    seed: torch.Tensor,
    scaling: float,
    dropout_p: float,
    needs: list[bool],
    use_kernels: bool,
) -> list[torch.Tensor]:
    """Gradients ``[dx, dW, db, dA, dB]``; an empty tensor stands for a gradient not asked for."""
    grads = _gradients(dy, x, weight, lora_A, lora_B, s, seed, scaling, dropout_p, needs, use_kernels)
    return [g if g is not None else x.new_empty(0) for g in grads]


@_lora_linear_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, s, seed, scaling, dropout_p, needs, use_kernels):
    shapes = (x.shape, weight.shape, weight.shape[:1], lora_A.shape, lora_B.shape)
    dtypes = (x.dtype, weight.dtype, x.dtype, lora_A.dtype, lora_B.dtype)
    return [x.new_empty(shape, dtype=dt) if need else x.new_empty(0) for need, shape, dt in zip(needs, shapes, dtypes)]


def _save(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, s, seed, use_kernels, keep=None) -> None:
    """Saved: x (alive anyway as the layer input), S [M, r], and the seed or (eager reference) the mask bytes."""
    ctx.save_for_backward(x, weight, lora_A, lora_B, s, seed if keep is None else keep)
    ctx.scaling = scaling
    ctx.dropout_p = dropout_p
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.use_kernels = use_kernels
    ctx.saved_keep = keep is not None


def _backward(ctx, dy, gradients) -> tuple[torch.Tensor | None, ...]:
    """With the frozen-or-not weight W, S = dropout(x) A^T saved by the forward and G = dY B:

        dB = scaling * dY^T S                       [N, r]
        dA = scaling * G^T dropout(x)               [r, K]   (mask drawn again from the seed, or saved)
        dx = dY W + scaling * mask/(1-p) * (G A)    [M, K]
        dW = dY^T x,  db = sum_M dY                 (only when they require grad)
    """
    x, weight, lora_A, lora_B, s, seed_or_keep = ctx.saved_tensors
    nx, nw, nb, na, nbB = ctx.needs_input_grad[:5]
    needs = [nx, nw, nb and ctx.has_bias, na, nbB]
    if not any(needs):
        return None, None, None, None, None, None, None
    args = (dy, x, weight, lora_A, lora_B, s, seed_or_keep, ctx.scaling, ctx.dropout_p, needs, ctx.use_kernels)
    grads = gradients(*args, seed_or_keep) if ctx.saved_keep else gradients(*args)
    dx, dw, db, da, dbB = (g if need else None for g, need in zip(grads, needs))
    if db is not None:
        db = db.to(ctx.bias_dtype)
    return dx, dw, db, da, dbB, None, None


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, _, dropout_p = inputs
    use_kernels = _kernels_for(x, weight, bias, lora_A, lora_B, dropout_p) is not None
    _save(ctx, *inputs, *output[1:], use_kernels)


# What torch.compile traces: the backward goes through its own registered op.
_lora_linear_op.register_autograd(
    lambda ctx, dy, _ds, _dseed: _backward(ctx, dy, _lora_linear_backward_op), setup_context=_setup_context
)


class _LoraLinearFunction(torch.autograd.Function):
    """The registered op's forward and backward for eager calls (see the module docstring); ``kernels``:
    the module serving the call, None for the reference."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, kernels):
        seed = keep = None
        if dropout_p > 0.0:
            seed = _draw_seed(x)
            if kernels is None:
                keep = torch.empty((x.numel() // x.shape[-1], x.shape[-1]), dtype=torch.uint8, device=x.device)
        y, s = _run_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, kernels, keep)
        if seed is None:
            seed = torch.zeros((), device=x.device, dtype=torch.int64) if kernels is not None else s.new_empty(0)
        _save(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, s, seed, kernels is not None, keep)
        return y

    @staticmethod
    def backward(ctx, dy):
        return *_backward(ctx, dy, _gradients), None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """``y = x W^T + b + scaling * (dropout(x) A^T) B^T`` with x: [..., in], W: [out, in] (a transposed
    view is fine), A: [r, in], B: [out, r]. Dropout applies in training mode only.

    Under autocast the input, weight and bias take the autocast dtype as ``F.linear`` would; adapter
    weights keep theirs (the op casts them, never the input).
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if x.shape[-1] != weight.shape[1] or lora_A.shape[1] != weight.shape[1] or lora_B.shape[0] != weight.shape[0]:
        raise ValueError(
            f"lora_linear: shapes do not fit: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
            f"lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}"
        )
    if lora_A.shape[0] != lora_B.shape[1]:
        raise ValueError(f"lora_linear: rank mismatch, lora_A {tuple(lora_A.shape)} vs lora_B {tuple(lora_B.shape)}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    args = (x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p) if training else 0.0)
    if torch.compiler.is_compiling():
        return _lora_linear_op(*args)[0]
    kernels = _kernels_for(*args[:5], args[6])
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:5]):
        return _LoraLinearFunction.apply(*args, kernels)
    seed = _draw_seed(x) if args[6] > 0.0 else None
    return _run_forward(*args, seed, kernels)[0]
