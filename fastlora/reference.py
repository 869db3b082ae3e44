"""Pure-PyTorch LoRA math: the specification, the CPU path and the test oracle.

Conventions (PEFT's): ``lora_A: [r, in]``, ``lora_B: [out, r]``, inverted dropout on x, training only,

    y = x W^T + b + scaling * (dropout(x) A^T) B^T

Everything here runs in the input's dtype (matmuls accumulate in fp32 internally); adapter weights
kept in fp32 are cast down to the input dtype, never the input up: the input is the large tensor.
"""

from __future__ import annotations

import torch

__all__ = [
    "dropout_mask",
    "lora_linear_ref",
    "lora_linear_fwd_ref",
    "lora_linear_bwd_ref",
]


def dropout_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """Keep-mask (True = kept) drawn from a generator keyed by ``seed``: the same seed gives the same mask.

    The mask is never stored between forward and backward; the backward regenerates it from the seed.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.rand(shape, generator=gen, device=device) >= p


def _dropout(x2: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    if p == 0.0:
        return x2
    keep = dropout_mask(x2.shape, p, seed, x2.device)
    return x2 * keep * (1.0 / (1.0 - p))


def lora_linear_fwd_ref(
    x2: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K], possibly a transposed view of a [K, N] Conv1D weight
    bias: torch.Tensor | None,  # [N]
    lora_A: torch.Tensor,  # [r, K]
    lora_B: torch.Tensor,  # [N, r]
    scaling: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``y: [M, N]`` and ``S = dropout(x) A^T: [M, r]`` (saved for backward)."""
    dtype = x2.dtype
    a = lora_A.to(dtype)
    b = lora_B.to(dtype)
    s = _dropout(x2, dropout_p, seed) @ a.t()  # [M, K] @ [K, r] -> [M, r]
    if bias is not None:
        y = torch.addmm(bias.to(dtype), x2, weight.t())
    else:
        y = x2 @ weight.t()
    # One in-place update instead of PEFT's separate B-output, scale and add: fewer M x N temporaries.
    y.addmm_(s, b.t(), alpha=scaling)
    return y, s


def lora_linear_bwd_ref(
    dy: torch.Tensor,  # [M, N]
    x2: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    lora_A: torch.Tensor,  # [r, K]
    lora_B: torch.Tensor,  # [N, r]
    s: torch.Tensor,  # [M, r]
    scaling: float,
    dropout_p: float,
    seed: int,
    needs_dx: bool,
    needs_dw: bool,
    needs_db: bool,
    needs_da: bool,
    needs_dbB: bool,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(dx, dW, db, dA, dB)``, each None when not needed.

    With ``G = dY B`` ([M, r]):  dB = scaling dY^T S,  dA = scaling G^T dropout(x),
    dx = dY W + scaling * mask / (1 - p) * (G A),  dW = dY^T x,  db = sum_M dY.
    """
    dtype = x2.dtype
    dy = dy.to(dtype)
    a = lora_A.to(dtype)
    b = lora_B.to(dtype)
    dx = dw = db = da = dbB = None
    g = dy @ b if (needs_dx or needs_da) else None  # [M, N] @ [N, r] -> [M, r]
    if needs_dbB:
        dbB = (dy.t() @ s).mul_(scaling).to(lora_B.dtype)  # [N, M] @ [M, r] -> [N, r]
    keep = dropout_mask(x2.shape, dropout_p, seed, x2.device) if dropout_p > 0.0 and (needs_da or needs_dx) else None
    if needs_da:
        xd = x2 if keep is None else x2 * keep * (1.0 / (1.0 - dropout_p))
        da = (g.t() @ xd).mul_(scaling).to(lora_A.dtype)  # [r, M] @ [M, K] -> [r, K]
    if needs_dx:
        dx = dy @ weight.to(dtype)  # [M, N] @ [N, K] -> [M, K]
        if keep is None:
            dx.addmm_(g, a, alpha=scaling)
        else:
            dx.add_((g @ a).mul_(keep).mul_(scaling / (1.0 - dropout_p)))
    if needs_dw:
        dw = (dy.t() @ x2).to(weight.dtype)
    if needs_db:
        db = dy.sum(0).to(dtype)
    return dx, dw, db, da, dbB


def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = False,
    seed: int = 0,
) -> torch.Tensor:
    """Differentiable reference built from plain PyTorch ops (autograd does the backward): the oracle."""
    dtype = x.dtype
    xd = x
    if training and dropout_p > 0.0:
        keep = dropout_mask(x.reshape(-1, x.shape[-1]).shape, dropout_p, seed, x.device).reshape(x.shape)
        xd = x * keep / (1.0 - dropout_p)
    base = torch.nn.functional.linear(x, weight, None if bias is None else bias.to(dtype))
    return base + scaling * ((xd @ lora_A.to(dtype).t()) @ lora_B.to(dtype).t())
