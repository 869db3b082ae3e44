"""``y = x W^T + b + scaling * (dropout(x) A^T) B^T``: the forward and backward launchers behind
``fastlora.ops.lora_linear`` (PEFT's conventions: A [r, K], B [N, r], inverted dropout on x).

Forward, two launches whatever M is (decode included):
    1. ``lora_shrink``:  S = dropout(x) A^T                                  [M, r] fp32
    2. ``lora_gemm``:    y = x W^T + b + scaling * S B^T, one write of y

Backward, with G = dY B:
    1. ``lora_bwd_shrink``: G (scaled by scaling / (1 - p)), dB = scaling dY^T S, db = sum_M dY
    2. ``lora_gemm``:       dx = dY W + mask ⊙ (G A)       (skipped unless needs_dx)
    3. ``lora_grad_a``:     dA = G^T (mask ⊙ x)            (skipped unless needs_da)
    4. ``lora_gemm``:       dW = dY^T x                    (only when needs_dw)

The dropout mask is never stored: every kernel regenerates it from the seed tensor, which is read
in-kernel (no ``.item()``, no host sync: the op is CUDA-graph safe). Saved between forward and
backward: x and S only.
"""

from __future__ import annotations


import torch

from . import _config
from .lora_bwd import _lora_bwd_shrink_kernel, lora_bwd_shrink, lora_grad_a
from .lora_gemm import lora_gemm
from .lora_shrink import lora_shrink

__all__ = ["lora_linear_fwd", "lora_linear_bwd", "unsupported_reason"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _dtype_name(dtype: torch.dtype) -> str:
    return _NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _check_shapes(x2, weight, bias, lora_A, lora_B) -> None:
    """The kernels index through these shapes: a mismatch would read out of bounds, so it raises."""
    M, K = x2.shape
    N = weight.shape[0]
    r = lora_A.shape[0]
    if weight.shape[1] != K or lora_A.shape[1] != K or tuple(lora_B.shape) != (N, r) \
            or (bias is not None and tuple(bias.shape) != (N,)):
        raise ValueError(
            f"lora kernels: shapes do not fit: x {tuple(x2.shape)}, weight {tuple(weight.shape)}, "
            f"bias {None if bias is None else tuple(bias.shape)}, lora_A {tuple(lora_A.shape)}, "
            f"lora_B {tuple(lora_B.shape)}"
        )


def unsupported_reason(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    dropout_p: float,
) -> str | None:
    """None when the kernels serve this call, else a short reason for falling back to the reference."""
    tensors = [t for t in (x2, weight, bias, lora_A, lora_B) if t is not None]
    interpreter = _config.interpreted(_lora_bwd_shrink_kernel)
    device = x2.device
    reason = _config.device_reason(tensors, _lora_bwd_shrink_kernel)
    if reason is not None:
        return reason
    if x2.dim() != 2 or weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        return "inputs are not 2-D"
    try:
        _check_shapes(x2, weight, bias, lora_A, lora_B)
    except ValueError:
        return "shapes do not fit"
    if x2.dtype not in _FLOAT_DTYPES:
        return f"dtype {_dtype_name(x2.dtype)}"
    if weight.dtype != x2.dtype:
        return f"weight dtype {_dtype_name(weight.dtype)} differs from input dtype {_dtype_name(x2.dtype)}"
    for name, t in (("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is not None and t.dtype not in _FLOAT_DTYPES:
            return f"{name} dtype {_dtype_name(t.dtype)}"
    r = lora_A.shape[0]
    if r < 1:
        return "rank 0"
    if r > _config.MAX_RANK:
        return f"rank {r} > {_config.MAX_RANK}"
    if not 0.0 <= dropout_p < 1.0:
        return f"dropout_p {dropout_p} outside [0, 1)"
    if x2.dtype == torch.bfloat16:
        if interpreter:
            # Seen with triton 3.9: tl.dot on bf16 operands returns garbage in the interpreter.
            return "bfloat16 under the Triton interpreter"
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
            return "bfloat16 needs compute capability 8.0"
    return None


def lora_linear_fwd(
    x2: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K], possibly a transposed view of a [K, N] Conv1D weight
    bias: torch.Tensor | None,  # [N]
    lora_A: torch.Tensor,  # [r, K]
    lora_B: torch.Tensor,  # [N, r]
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor,  # [] int64 on x's device, < 2**31; ignored when dropout_p == 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``y [M, N]`` in x's dtype and ``S = dropout(x) A^T [M, r]`` in fp32 (for the backward)."""
    _check_shapes(x2, weight, bias, lora_A, lora_B)
    if dropout_p > 0.0 and seed is None:
        raise ValueError("lora_linear_fwd: dropout_p > 0 needs a seed tensor")
    M, N = x2.shape[0], weight.shape[0]
    s, partials = lora_shrink(x2, lora_A, dropout_p, seed)  # x: [M, K], A: [r, K] -> S: [M, r]
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    if N == 0 and partials is not s:  # no GEMM program to reduce the split-K partials into S
        s.copy_(partials.sum(0)[:, : s.shape[1]])
    lora_gemm(x2, weight.t(), y, bias=bias, low=s, up=lora_B.t(), lr_scale=scaling, low_partials=partials)
    return y, s


def lora_linear_bwd(
    dy2: torch.Tensor,  # [M, N]
    x2: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    lora_A: torch.Tensor,  # [r, K]
    lora_B: torch.Tensor,  # [N, r]
    s: torch.Tensor,  # [M, r] fp32, as the forward returned it
    seed: torch.Tensor,  # the forward's seed
    scaling: float,
    dropout_p: float,
    needs_dx: bool,
    needs_dw: bool,
    needs_db: bool,
    needs_da: bool,
    needs_dbB: bool,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(dx, dW, db, dA, dB)``, each None when its ``needs_*`` flag is False.

    With G = dY B:  dB = scaling dY^T S,  dA = scaling G^T dropout(x),
    dx = dY W + scaling * mask / (1 - p) * (G A),  dW = dY^T x,  db = sum_M dY.
    dtypes: dx and db x's, dW the weight's, dA lora_A's, dB lora_B's.
    """
    _check_shapes(x2, weight, None, lora_A, lora_B)
    M, K = x2.shape
    r = lora_A.shape[0]
    if tuple(dy2.shape) != (M, weight.shape[0]) or tuple(s.shape) != (M, r):
        raise ValueError(f"lora_linear_bwd: dY {tuple(dy2.shape)} or S {tuple(s.shape)} does not fit x {(M, K)}")
    if dropout_p > 0.0 and seed is None:
        raise ValueError("lora_linear_bwd: dropout_p > 0 needs the forward's seed tensor")
    if dy2.dtype != x2.dtype:
        dy2 = dy2.to(x2.dtype)
    g, dbB, db = lora_bwd_shrink(
        dy2, lora_B, s, scaling, dropout_p, needs_g=needs_dx or needs_da, needs_dbB=needs_dbB, needs_db=needs_db,
        db_dtype=x2.dtype,
    )
    dx = dw = da = None
    if needs_dx:
        dx = torch.empty((M, K), dtype=x2.dtype, device=x2.device)
        # [M, N] @ [N, K] + mask ⊙ ([M, R] @ [R, K])
        lora_gemm(dy2, weight, dx, low=g, up=lora_A, lr_scale=1.0, dropout_p=dropout_p, seed=seed)
    if needs_da:
        da = lora_grad_a(x2, g, r, lora_A.dtype, dropout_p, seed)
    if needs_dw:
        dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        lora_gemm(dy2.t(), x2, dw)  # [N, M] @ [M, K]
    return dx, dw, db, da, dbB
