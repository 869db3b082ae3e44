"""Forward and backward launchers for a linear layer whose frozen weight is NF4 (QLoRA), LoRA optional.

Forward, ``y = x deq(W)^T + b + scaling * (dropout(x) A^T) B^T``:
    M <= FUSED_MAX_M:  ``lora_shrink`` then ``nf4_matmul`` (the packed weight read once, the LoRA
                       expand and bias in its epilogue): two launches (one without LoRA).
    larger M:          ``nf4_dequantize`` into a reused workspace, then the bf16 path's fused kernels
                       (``lora_linear_fwd``; ``F.linear`` without LoRA).
Backward (W frozen, so no dW), with the weight dequantized into the same workspace:
    ``lora_linear_bwd`` with needs_dw=False: dx = dY deq(W) + scaling * mask/(1-p) * (G A), dA, dB, db;
    without LoRA dx = dY deq(W), db = sum_M dY. The dropout mask is regenerated from the seed, never stored.

The workspace is one buffer per (device, dtype), grown to the largest weight seen: a model's layers run
one after another on one stream, so they share it, and the dequantized weight never outlives the call.
"""

from __future__ import annotations

import torch

from .lora_linear import lora_linear_bwd, lora_linear_fwd, unsupported_reason
from .lora_shrink import lora_shrink
from .nf4 import FUSED_MAX_M, nf4_dequantize, nf4_matmul

__all__ = ["nf4_linear_fwd", "nf4_linear_bwd", "nf4_unsupported_reason", "nf4_workspace_clear"]

_WORKSPACES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (device, dtype)
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < numel:
        _WORKSPACES.pop(key, None)  # free the smaller one before allocating
        buf = _WORKSPACES[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf


def nf4_workspace_clear() -> None:
    """Release the dequantization workspaces (e.g. before measuring peak memory from a clean slate)."""
    _WORKSPACES.clear()


def _dequantized(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    n = state.shape[0] * state.shape[1]
    return nf4_dequantize(packed, state, dtype, out=_workspace(n, dtype, packed.device))


def nf4_unsupported_reason(x2, packed, state, bias, lora_A, lora_B, dropout_p) -> str | None:
    """None when the kernels serve this call, else a short reason (the checks of the bf16 path, on a
    stand-in weight of x's dtype, plus the NF4 state's own)."""
    if packed.device != x2.device or any(t.device != x2.device for t in state.tensors()):
        return "quantization state on another device than the input"
    if state.shape[1] != x2.shape[-1]:
        return "shapes do not fit"
    weight = torch.empty((), device=x2.device, dtype=x2.dtype).expand(*state.shape)  # shape and dtype only
    if lora_A is None:
        return unsupported_reason(x2, weight, bias, x2.new_empty(1, x2.shape[1]), x2.new_empty(state.shape[0], 1), 0.0)
    return unsupported_reason(x2, weight, bias, lora_A, lora_B, dropout_p)


def nf4_linear_fwd(
    x2: torch.Tensor,  # [M, K]
    packed: torch.Tensor,  # the packed NF4 weight
    state,  # NF4State: shape (N, K), blocksize, code, absmax, nested parts
    bias: torch.Tensor | None,  # [N]
    lora_A: torch.Tensor | None,  # [r, K]
    lora_B: torch.Tensor | None,  # [N, r]
    scaling: float,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(y [M, N] in x's dtype, S [M, r] fp32 or None without LoRA)``."""
    M = x2.shape[0]
    if lora_A is None:
        if M <= FUSED_MAX_M:
            return nf4_matmul(x2, packed, state, bias), None
        return torch.nn.functional.linear(x2, _dequantized(packed, state, x2.dtype), bias), None
    if M <= FUSED_MAX_M:
        s, partials = lora_shrink(x2, lora_A, dropout_p, seed)  # x: [M, K], A: [r, K] -> S: [M, r]
        if partials is not s:
            s.copy_(partials.sum(0)[:, : s.shape[1]])
        return nf4_matmul(x2, packed, state, bias, s, lora_B, scaling), s
    return lora_linear_fwd(x2, _dequantized(packed, state, x2.dtype), bias, lora_A, lora_B, scaling, dropout_p, seed)


def nf4_linear_bwd(
    dy2: torch.Tensor,  # [M, N]
    x2: torch.Tensor,  # [M, K]
    packed: torch.Tensor,
    state,
    lora_A: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    s: torch.Tensor | None,  # [M, r] fp32, as the forward returned it
    seed: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    needs_dx: bool,
    needs_db: bool,
    needs_da: bool,
    needs_dbB: bool,
) -> tuple[torch.Tensor | None, ...]:
    """``(dx, db, dA, dB)``, each None when not needed (the 4-bit weight is frozen: no dW)."""
    dy2 = dy2.to(x2.dtype)
    if lora_A is None:
        dx = dy2 @ _dequantized(packed, state, x2.dtype) if needs_dx else None  # [M, N] @ [N, K]
        db = dy2.sum(0) if needs_db else None
        return dx, db, None, None
    weight = _dequantized(packed, state, x2.dtype) if needs_dx else \
        torch.empty((), device=x2.device, dtype=x2.dtype).expand(*state.shape)  # only its shape is read
    dx, _, db, da, dbB = lora_linear_bwd(
        dy2, x2, weight, lora_A, lora_B, s, seed, scaling, dropout_p, needs_dx, False, needs_db, needs_da, needs_dbB
    )
    return dx, db, da, dbB
