"""Pure-PyTorch LoRA math: the specification, the CPU path and the test oracle.

Conventions (PEFT's): ``lora_A: [r, in]``, ``lora_B: [out, r]``, inverted dropout on x, training only,

    y = x W^T + b + scaling * (dropout(x) A^T) B^T

Everything here runs in the input's dtype (matmuls accumulate in fp32 internally); adapter weights
kept in fp32 are cast down to the input dtype, never the input up: the input is the large tensor.

Dropout masks are drawn block by block of ``MASK_ROWS`` rows, each block from a generator seeded with
``(seed, block index)``: the mask is a function of the seed and the shape, so the backward regenerates
it and nothing is saved for it. Each element takes one 16-bit lane of a 64-bit draw (on CPU 2.6x
cheaper than ``torch.rand``'s floats) and is kept when its lane is at or above a threshold: p is rounded
to a multiple of 2^-16 (at most 7.6e-6 off); kept values are scaled by exactly ``1 / (1 - p)``.
On CPU the mask is written into an x-sized temporary while one op needs it (the backward into dx's own
storage), which measures faster than block-sized pieces with small matmuls; the Triton kernels draw it
in registers instead.
"""

from __future__ import annotations

import math
import threading

import torch

__all__ = [
    "MASK_ROWS",
    "dropout_mask",
    "fill_keep",
    "lora_linear_ref",
    "lora_linear_fwd_ref",
    "lora_linear_bwd_ref",
]

MASK_ROWS = 128
_LANES = 2**16
_generators = threading.local()


def _generator(device: torch.device) -> torch.Generator:
    """One generator per (thread, device), reseeded per block: creating one per call costs more than seeding."""
    cache = _generators.__dict__.setdefault("by_device", {})
    gen = cache.get(device)
    if gen is None:
        gen = cache[device] = torch.Generator(device=device)
    return gen


def _block_key(seed: int, block: int) -> int:
    """A 32-bit generator seed for one block (torch's CPU generator keeps only 32 bits of a seed).

    For one seed, distinct blocks get distinct keys (an odd multiplier is a bijection mod 2^32), and
    murmur3's finalizer, also a bijection, scatters neighbouring keys.
    """
    h = (seed + block * 0x9E3779B9) & 0xFFFFFFFF
    h = ((h ^ (h >> 16)) * 0x85EBCA6B) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def fill_keep(out: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Write the keep-mask (1 = kept, 0 = dropped) for an ``[m, k]`` tensor into ``out`` (any dtype).

    Drawn block by block of ``MASK_ROWS`` rows, each block from its own ``(seed, block)`` key, so the
    random words in flight are bounded by one block whatever ``m`` is.
    """
    m, k = out.shape
    gen = _generator(out.device)
    threshold = int(round(p * _LANES)) - _LANES // 2  # the lanes are signed int16
    for block, start in enumerate(range(0, m, MASK_ROWS)):
        stop = min(start + MASK_ROWS, m)
        n = (stop - start) * k
        gen.manual_seed(_block_key(int(seed), block))
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, generator=gen, device=out.device)
        # Comparing straight into the output's dtype is about 3x cheaper than a bool mask converted later.
        torch.ge(words.view(torch.int16)[:n].view(stop - start, k), threshold, out=out[start:stop])
    return out


def dropout_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The whole keep-mask for ``shape`` (rows: every dim but the last), a function of ``(shape, p, seed)``."""
    shape = torch.Size(shape)
    k = shape[-1] if len(shape) else 1
    m = math.prod(shape[:-1])
    keep = torch.ones((m, k), dtype=torch.bool, device=device)
    if p > 0.0 and m * k > 0:
        fill_keep(keep, p, seed)
    return keep.view(shape)


def _keep_like(x2: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The keep-mask of ``x2`` in its dtype (1 = kept): an x-sized temporary."""
    return fill_keep(torch.empty_like(x2, memory_format=torch.contiguous_format), p, seed)


def _dropped(x2: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``mask * x`` without the ``1 / (1 - p)`` (callers fold it into a small operand): a temporary."""
    return _keep_like(x2, p, seed).mul_(x2)


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
    """Returns ``y: [M, N]`` and ``S = dropout(x) A^T: [M, r]``, saved for backward in at least fp32 (the
    kernels accumulate S in fp32 and keep it so; the op promises one dtype whatever the backend)."""
    dtype = x2.dtype
    a = lora_A.to(dtype)
    b = lora_B.to(dtype)
    if dropout_p == 0.0:
        s = x2 @ a.t()  # [M, K] @ [K, r] -> [M, r]
    else:
        # The dropped copy of x lives only until S is computed (PEFT's stays alive for the backward).
        s = (_dropped(x2, dropout_p, seed) @ a.t()).mul_(1.0 / (1.0 - dropout_p))
    if bias is not None:
        y = torch.addmm(bias.to(dtype), x2, weight.t())
    else:
        y = x2 @ weight.t()
    # One in-place update instead of PEFT's separate B-output, scale and add: fewer M x N temporaries.
    y.addmm_(s, b.t(), alpha=scaling)
    return y, s.to(torch.promote_types(dtype, torch.float32))


def lora_linear_bwd_ref(
    dy: torch.Tensor,  # [M, N]
    x2: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    lora_A: torch.Tensor,  # [r, K]
    lora_B: torch.Tensor,  # [N, r]
    s: torch.Tensor,  # [M, r], at least fp32
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
    The scale factors go onto the small [M, r] operands, never onto an [M, K] or [N, r] result.
    """
    dtype = x2.dtype
    dy = dy.to(dtype)
    a = lora_A.to(dtype)
    b = lora_B.to(dtype)
    dx = dw = db = da = dbB = None
    if needs_dx and dropout_p == 0.0:
        dx = dy @ weight.to(dtype)  # [M, N] @ [N, K] -> [M, K]
    if needs_da or needs_dx:
        gs = (dy @ b).mul_(scaling / (1.0 - dropout_p))  # G, scaled: [M, N] @ [N, r] -> [M, r]
    if dropout_p == 0.0:
        if needs_da:
            da = gs.t() @ x2  # [r, M] @ [M, K] -> [r, K]
        if needs_dx:
            dx.addmm_(gs, a)
    elif needs_dx:
        # The mask is regenerated into dx's own storage, which holds mask, then mask * x, then dx.
        buf = _keep_like(x2, dropout_p, seed)
        update = (gs @ a).mul_(buf)  # [M, r] @ [r, K] -> [M, K], masked
        if needs_da:
            da = gs.t() @ buf.mul_(x2)
        dx = torch.addmm(update, dy, weight.to(dtype), out=buf)
    elif needs_da:
        da = gs.t() @ _dropped(x2, dropout_p, seed)
    if da is not None:
        da = da.to(lora_A.dtype)
    if needs_dbB:
        dbB = (dy.t() @ (s * scaling).to(dtype)).to(lora_B.dtype)  # [N, M] @ [M, r] -> [N, r]
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
