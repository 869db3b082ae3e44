"""The dropout keep-mask, drawn in registers from Philox and never stored.

Element ``(m, k)`` of an ``[M, K]`` input is a function of ``(seed, m, k)`` only, so every kernel
(the forward shrink, the backward's dA and dx) regenerates the same mask whatever its tiling:

- Philox4x32-10 with key ``(seed, 0)`` (the seed is < 2**31) and counter ``(k // 8, m, 0, 0)``
  gives 128 random bits for the 8 elements ``k = 8 * (k // 8) + j`` of row ``m``;
- element ``j`` takes 16-bit lane ``j`` (word ``j // 2``, low half for even ``j``) and is kept when the
  lane is ``>= round(p * 2**16)``. Kept values are scaled by exactly ``1 / (1 - p)``.

So p is applied rounded to a multiple of 2**-16 (at most 7.6e-6 off), as in ``fastlora.reference``;
the masks themselves differ from the reference's (another generator), not their law.
Row and column indices are separate 32-bit counters, so inputs beyond 2**32 elements stay distinct.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["LANES", "dropout_threshold", "dropout_keep_mask"]

LANES = 2**16  # random lanes are 16 bits wide: 8 elements per Philox call


def dropout_threshold(p: float) -> int:
    """A lane (uniform in [0, 2**16)) keeps its element when it is at least this."""
    return int(round(p * LANES))


@triton.jit
def _keep_mask(seed, offs_m, k0, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Keep-mask (bool ``[BLOCK_M, BLOCK_K]``) of rows ``offs_m`` and columns ``k0 .. k0 + BLOCK_K``.

    ``k0`` must be a multiple of 8 (every caller's tile start is a multiple of its block size >= 16).
    """
    G: tl.constexpr = BLOCK_K // 8
    zero = tl.zeros((BLOCK_M, G), dtype=tl.uint32)
    c0 = zero + (k0 // 8 + tl.arange(0, G)).to(tl.uint32)[None, :]  # column group
    c1 = zero + offs_m.to(tl.uint32)[:, None]  # row
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
    l0, l1, l2, l3 = r0 & 0xFFFF, r0 >> 16, r1 & 0xFFFF, r1 >> 16
    l4, l5, l6, l7 = r2 & 0xFFFF, r2 >> 16, r3 & 0xFFFF, r3 >> 16
    # Interleave the 8 lanes of each group back into column order. Each join adds a new last axis,
    # which the reshape then varies fastest, so the outermost join picks bit 0 of the lane index:
    # lane j = 4a + 2b + c ends up at [.., a, b, c], i.e. at column 8g + j.
    lanes = tl.join(
        tl.join(tl.join(l0, l4), tl.join(l2, l6)),
        tl.join(tl.join(l1, l5), tl.join(l3, l7)),
    )
    lanes = tl.reshape(lanes, (BLOCK_M, BLOCK_K))
    return lanes.to(tl.int32) >= threshold


@triton.jit(do_not_specialize=["threshold"])
def _dropout_mask_kernel(
    seed_ptr, out_ptr,
    M, K,
    stride_om, stride_ok,
    threshold,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep_mask(tl.load(seed_ptr), offs_m, pid_k * BLOCK_K, threshold, BLOCK_M, BLOCK_K)
    ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_k[None, :] * stride_ok
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


def dropout_keep_mask(seed: torch.Tensor, M: int, K: int, p: float, device) -> torch.Tensor:
    """The bool ``[M, K]`` keep-mask the kernels apply for ``(seed, p)``: for tests and oracles.

    ``seed`` is the 0-dim int64 tensor the kernels read. Its tiles (32 x 32) differ on purpose from
    every LoRA kernel's, which the mask does not depend on.
    """
    device = torch.device(device)
    if p == 0.0:
        return torch.ones((M, K), dtype=torch.bool, device=device)
    out = torch.empty((M, K), dtype=torch.int8, device=device)
    if M == 0 or K == 0:
        return out.bool()
    seed = seed.to(device=device, dtype=torch.int64).reshape(())
    grid = (triton.cdiv(M, 32), triton.cdiv(K, 32))
    _dropout_mask_kernel[grid](seed, out, M, K, out.stride(0), out.stride(1), dropout_threshold(p),
                               BLOCK_M=32, BLOCK_K=32)
    return out.bool()

