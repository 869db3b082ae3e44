"""``fastlora::lora_linear``: base linear plus low-rank update, one op for every device.

Registered through ``torch.library`` with a fake implementation and an autograd formula, so it works
under ``torch.compile`` and ``torch.library.opcheck``. The implementation is chosen per call by
``fastlora.ops.dispatch`` (the reference on CPU, the fused Triton kernels on CUDA).

Eager calls skip the registered op's dispatch, which costs about 75 us per forward + backward on a
2-core CPU (torch 2.13): more than the whole LoRA update at decode sizes. They run the same forward
and backward functions through an ``autograd.Function`` (``_LoraLinearFunction``), applied without
``Function.apply``'s Python wrapper when no functorch transform is active. (Native differentiable ops,
with no Python in the backward, keep more memory than PEFT in the backward: autograd's addmm backward
scales its [M, r] and [r, N] gradients into new tensors, 1.45x PEFT's peak at one row, 1024 -> 2816,
r 64.) Under ``torch.compile`` the registered op is what gets traced.

Dropout on the reference, reproducible with ``torch.manual_seed`` on every path:
- a few rows (at most ``reference.SMALL_MASK`` elements of x): the mask is drawn straight from torch's
  generator in x's dtype (``reference.small_keep``, what ``F.dropout`` draws: the same mask as PEFT's
  after the same seed) and kept for the backward, by the registered op (an output of its own) and the
  eager ``Function`` alike. A seed, a seeded generator and a byte mask cost more than the whole update
  there (one row, 1024 -> 1024, r 8, forward with grad on a 2-core EPYC: 1.03x PEFT's time with them,
  0.92x without);
- more rows: the mask is a function of a seed drawn from torch's generator. The registered op saves the
  seed and its backward draws the mask again, as the kernels do. The eager ``Function`` keeps the mask
  as one byte per element instead: on a CPU, drawing it again costs about what PEFT's backward spends
  scaling and adding [M, N] and [M, K] tensors that ours does not (2-core Xeon, 256 rows, 1024 -> 1024,
  r 8, the backward alone: 1.15x PEFT's time with the redraw, 1.01x with the bytes), and a byte per
  element is an eighth of what PEFT keeps (a dropped copy of x and its fp32 mask; the few-rows mask in
  x's dtype, half).
"""

from __future__ import annotations

import threading

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
    return serving_kernels("lora_linear", x.device, _rows(x), weight, bias, lora_A, lora_B, dropout_p)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., K] -> [M, K]``, a view for contiguous inputs (a 2-D input as it is: no reshape call)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _draw_seed(x: torch.Tensor) -> torch.Tensor:
    return torch.randint(0, _SEED_HIGH, (), device=x.device, dtype=torch.int64)


_seed_buffers = threading.local()


def _draw_seed_int(x: torch.Tensor) -> int:
    """The seed ``_draw_seed`` would draw (``randint`` is ``random_`` on a new tensor), as a Python int. On
    CPU it is drawn into a reused per-thread scalar: 1.5 us against 3.1 us for a new one and ``int()``."""
    if x.device.type != "cpu":
        return int(_draw_seed(x))
    buf = getattr(_seed_buffers, "seed", None)
    if buf is None:
        buf = _seed_buffers.seed = torch.empty((), dtype=torch.int64)
    return buf.random_(0, _SEED_HIGH).item()


def _small_mask(x2: torch.Tensor, dropout_p: float, kernels) -> torch.Tensor | None:
    """The mask a reference call of a few rows draws from torch's generator and keeps (see the module
    docstring); None where the mask comes from a seed."""
    if kernels is None and dropout_p > 0.0 and x2.numel() <= reference.SMALL_MASK:
        return reference.small_keep(x2, dropout_p)
    return None


def _run_forward(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, kernels, keep=None):
    """``(y [M, N], S)`` on ``kernels`` (None: the reference) with the dropout seed ``seed`` (a tensor for
    the kernels, an int for the reference) or, on the reference, the mask ``keep`` already drawn."""
    if kernels is None:
        return reference.lora_linear_fwd_ref(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, keep)
    return kernels.lora_linear_fwd(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


def _run_backward(dy2, x2, weight, lora_A, lora_B, s, seed_or_mask, scaling, dropout_p, needs, kernels):
    """``(dx, dW, db, dA, dB)`` of ``[M, ...]`` tensors, None where ``needs`` says a gradient is not wanted.
    ``seed_or_mask``: the mask the forward kept ([M, K]), or the seed to draw it again from (a 0-d tensor,
    None without dropout)."""
    if kernels is not None:
        return kernels.lora_linear_bwd(dy2, x2, weight, lora_A, lora_B, s, seed_or_mask, scaling, dropout_p, *needs)
    keep = seed_or_mask if seed_or_mask is not None and seed_or_mask.dim() else None
    seed = int(seed_or_mask) if dropout_p > 0.0 and keep is None else 0
    return reference.lora_linear_bwd_ref(dy2, x2, weight, lora_A, lora_B, s, scaling, dropout_p, seed, *needs, keep)


def _unflatten(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[M, N] -> [..., N]`` with the leading dims of ``like``."""
    return y if like.dim() == 2 else y.view(*like.shape[:-1], y.shape[-1])


# ---- the registered op (what torch.compile traces) -----------------------------------------------
def _forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(y [..., N], S [M, r] in at least fp32, seed [], mask)``, the last three what the backward
    needs: the mask [M, K] in x's dtype where the reference drew a few rows' mask from torch's generator
    (the seed then unused), else empty (the backward draws it again from the seed)."""
    kernels = _kernels_for(x, weight, bias, lora_A, lora_B, dropout_p)
    x2 = _rows(x)
    mask = _small_mask(x2, dropout_p, kernels)
    if mask is None and dropout_p > 0.0:
        seed = _draw_seed(x)
    else:
        seed = torch.zeros((), device=x.device, dtype=torch.int64)
    y, s = _run_forward(x2, weight, bias, lora_A, lora_B, scaling, dropout_p,
                        seed if kernels is not None else int(seed) if dropout_p > 0.0 else 0, kernels, mask)
    return _unflatten(y, x), s, seed, x.new_empty(0) if mask is None else mask


_lora_linear_op = torch.library.custom_op("fastlora::lora_linear", _forward, mutates_args=())


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p):
    k = x.shape[-1]
    m = x.numel() // k
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    s = x.new_empty((m, lora_A.shape[0]), dtype=torch.promote_types(x.dtype, torch.float32))
    small = dropout_p > 0.0 and m * k <= reference.SMALL_MASK and _kernels_for(x, weight, bias, lora_A, lora_B,
                                                                                  dropout_p) is None
    return y, s, x.new_empty((), dtype=torch.int64), x.new_empty((m, k) if small else (0,))


@torch.library.custom_op("fastlora::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    s: torch.Tensor,
    seed_or_mask: torch.Tensor,
    scaling: float,
    dropout_p: float,
    needs: list[bool],
    use_kernels: bool,
) -> list[torch.Tensor]:
    """Gradients ``[dx, dW, db, dA, dB]``; an empty tensor stands for a gradient not asked for.
    ``seed_or_mask``: the forward's mask when it kept one, else its seed."""
    kernels = resolve_backend("lora_linear", x.device) if use_kernels else None
    grads = _run_backward(_rows(dy), _rows(x), weight, lora_A, lora_B, s, seed_or_mask, scaling, dropout_p, needs,
                          kernels)
    dx = grads[0].view(x.shape) if grads[0] is not None else None
    return [g if g is not None else x.new_empty(0) for g in (dx, *grads[1:])]


@_lora_linear_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, s, seed_or_mask, scaling, dropout_p, needs, use_kernels):
    shapes = (x.shape, weight.shape, weight.shape[:1], lora_A.shape, lora_B.shape)
    dtypes = (x.dtype, weight.dtype, x.dtype, lora_A.dtype, lora_B.dtype)
    return [x.new_empty(shape, dtype=dt) if need else x.new_empty(0) for need, shape, dt in zip(needs, shapes, dtypes)]


def _save(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, s, seed_or_mask, kernels) -> None:
    """Saved: x (alive anyway as the layer input), S [M, r], and the dropout mask where the forward kept
    one, else its seed."""
    ctx.save_for_backward(x, weight, lora_A, lora_B, s, seed_or_mask)
    ctx.scaling, ctx.dropout_p, ctx.kernels = scaling, dropout_p, kernels
    ctx.bias_dtype = None if bias is None else bias.dtype


def _needs(ctx) -> list[bool] | None:
    """Which of ``(dx, dW, db, dA, dB)`` the backward must compute; None when none."""
    nx, nw, nb, na, nbB = ctx.needs_input_grad[:5]
    nb = nb and ctx.bias_dtype is not None
    return [nx, nw, nb, na, nbB] if nx or nw or nb or na or nbB else None


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p = inputs
    kernels = _kernels_for(x, weight, bias, lora_A, lora_B, dropout_p)
    _, s, seed, mask = output
    _save(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, s, mask if mask.numel() else seed, kernels)


def _op_backward(ctx, dy, _ds, _dseed, _dmask):
    """Through the registered backward op, so that torch.compile traces it (the formulas: the Function's)."""
    needs = _needs(ctx)
    if needs is None:
        return None, None, None, None, None, None, None
    x, weight, lora_A, lora_B, s, seed_or_mask = ctx.saved_tensors
    grads = _lora_linear_backward_op(dy, x, weight, lora_A, lora_B, s, seed_or_mask, ctx.scaling, ctx.dropout_p,
                                     needs, ctx.kernels is not None)
    dx, dw, db, da, dbB = (g if need else None for g, need in zip(grads, needs))
    return dx, dw, None if db is None else db.to(ctx.bias_dtype), da, dbB, None, None


_lora_linear_op.register_autograd(_op_backward, setup_context=_setup_context)


# ---- eager calls ------------------------------------------------------------------------------------
class _LoraLinearFunction(torch.autograd.Function):
    """The registered op's forward and backward for eager calls (see the module docstring); ``kernels``:
    the module serving the call, None for the reference. Thin on purpose: at one row the whole LoRA
    update costs about as much as a few Python calls."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, kernels):
        x2 = _rows(x)
        if kernels is None:
            # The dropout mask, which the backward reads: for a few rows in x's dtype (there the multiplies
            # by it are a large part of the call, and mixed-dtype ones convert as they go), else as bytes.
            mask = _small_mask(x2, dropout_p, None)
            if mask is None and dropout_p > 0.0:
                mask = torch.empty(x2.shape, dtype=torch.uint8, device=x.device)
                reference.fill_keep(mask, dropout_p, _draw_seed_int(x))
            y, s = reference.lora_linear_fwd_ref(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, 0, mask)
        else:
            mask = _draw_seed(x) if dropout_p > 0.0 else torch.zeros((), device=x.device, dtype=torch.int64)
            y, s = kernels.lora_linear_fwd(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, mask)
        _save(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, s, mask, kernels)
        return _unflatten(y, x)

    @staticmethod
    def backward(ctx, dy):
        """With the frozen-or-not weight W, S = dropout(x) A^T saved by the forward and G = dY B:

            dB = scaling * dY^T S                       [N, r]
            dA = scaling * G^T dropout(x)               [r, K]   (the mask kept, or drawn again)
            dx = dY W + scaling * mask/(1-p) * (G A)    [M, K]
            dW = dY^T x,  db = sum_M dY                 (only when they require grad)

        (The reference keeps S without dropout's 1/(1-p) and puts it into the scale: see
        ``reference.lora_linear_fwd_ref``.)
        """
        needs = _needs(ctx)
        if needs is None:
            return None, None, None, None, None, None, None, None
        x, weight, lora_A, lora_B, s, seed_or_mask = ctx.saved_tensors
        dx, dw, db, da, dbB = _run_backward(_rows(dy), _rows(x), weight, lora_A, lora_B, s, seed_or_mask,
                                            ctx.scaling, ctx.dropout_p, needs, ctx.kernels)
        if dx is not None and x.dim() != 2:
            dx = dx.view(x.shape)
        return dx, dw, None if db is None else db.to(ctx.bias_dtype), da, dbB, None, None, None


# Function.apply's Python wrapper (functorch bookkeeping) costs about 1.5 us per call; without functorch
# transforms active it only forwards to the C++ apply, called here directly (Function.apply itself where a
# torch version lacks either).
_c_apply = getattr(getattr(torch._C, "_FunctionBase", None), "__dict__", {}).get("apply")
_c_apply = None if _c_apply is None else _c_apply.__get__(None, _LoraLinearFunction)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)


def _apply(*args):
    if _c_apply is None or _functorch_active is None or _functorch_active():
        return _LoraLinearFunction.apply(*args)
    return _c_apply(*args)


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
    w_shape, a_shape, b_shape = weight.shape, lora_A.shape, lora_B.shape
    if x.shape[-1] != w_shape[1] or a_shape[1] != w_shape[1] or b_shape[0] != w_shape[0] or a_shape[0] != b_shape[1]:
        _raise_shapes(x, weight, lora_A, lora_B)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    scaling = float(scaling)
    p = float(dropout_p) if training else 0.0
    if torch.compiler.is_compiling():
        return _lora_linear_op(x, weight, bias, lora_A, lora_B, scaling, p)[0]
    kernels = _kernels_for(x, weight, bias, lora_A, lora_B, p)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or lora_A.requires_grad
                                    or lora_B.requires_grad or (bias is not None and bias.requires_grad)):
        return _apply(x, weight, bias, lora_A, lora_B, scaling, p, kernels)
    x2 = _rows(x)
    if kernels is not None:
        seed = _draw_seed(x) if p > 0.0 else torch.zeros((), device=x.device, dtype=torch.int64)
        return _unflatten(kernels.lora_linear_fwd(x2, weight, bias, lora_A, lora_B, scaling, p, seed)[0], x)
    keep = _small_mask(x2, p, None)  # no backward reads it: x is dropped into it (one x-sized buffer fewer)
    seed = _draw_seed_int(x) if p > 0.0 and keep is None else 0
    y, _ = reference.lora_linear_fwd_ref(x2, weight, bias, lora_A, lora_B, scaling, p, seed, keep, keep_is_scratch=True)
    return _unflatten(y, x)


def _raise_shapes(x, weight, lora_A, lora_B):
    if lora_A.shape[0] != lora_B.shape[1] and x.shape[-1] == weight.shape[1] == lora_A.shape[1] \
            and lora_B.shape[0] == weight.shape[0]:
        raise ValueError(f"lora_linear: rank mismatch, lora_A {tuple(lora_A.shape)} vs lora_B {tuple(lora_B.shape)}")
    raise ValueError(
        f"lora_linear: shapes do not fit: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
        f"lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}"
    )
