"""LoRA shrink: ``S = dropout(x) A^T``, x: [M, K], A: [r, K] -> S: [M, r] in fp32.

The dropout mask is drawn in registers per x tile (``dropout._keep_mask``); x is read once and never
copied or cast up (the A tile is cast to x's dtype), and the accumulation is fp32. With few row
blocks K is split across programs and each writes its partial sum to an fp32 workspace
``[SPLIT_K, M, R]``; the fused GEMM (``lora_gemm``) adds the partials up when it loads S and writes
the final S, so the decode path stays at two launches per layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _config
from .dropout import _keep_mask, dropout_threshold

__all__ = ["lora_shrink"]


@triton.jit(do_not_specialize=["threshold"])
def _lora_shrink_kernel(
    # pointers
    x_ptr, a_ptr, s_ptr, seed_ptr,
    # sizes: A has r rows; r_store columns of S are written (R, zero-padded, in a split-K workspace)
    M, K, r, r_store, k_per_split,
    # strides
    stride_xm, stride_xk, stride_ar, stride_ak, stride_ss, stride_sm, stride_sr,
    # runtime scalars
    threshold, inv_keep,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R)
    offs_k = tl.arange(0, BLOCK_K)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)

    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # [BM, 1]
    a_cols = a_ptr + offs_r[None, :] * stride_ar  # A^T tile: [1, R]
    row_ok = offs_m[:, None] < M
    rank_ok = offs_r[None, :] < r
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(x_rows + kk[None, :] * stride_xk, mask=row_ok & (kk[None, :] < k_end), other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_keep_mask(seed, offs_m, k0, threshold, BLOCK_M, BLOCK_K), x, tl.zeros_like(x))
        a = tl.load(a_cols + kk[:, None].to(tl.int64) * stride_ak, mask=(kk[:, None] < k_end) & rank_ok, other=0.0)
        acc = tl.dot(x, a.to(x.dtype), acc, input_precision=DOT_PRECISION)  # [BM, BK] @ [BK, R]
    if HAS_DROPOUT:
        acc = acc * inv_keep  # 1 / (1 - p) once on [BM, R] rather than on every x element
    s_ptrs = s_ptr + pid_k * stride_ss + offs_m[:, None].to(tl.int64) * stride_sm + offs_r[None, :] * stride_sr
    tl.store(s_ptrs, acc, mask=row_ok & (offs_r[None, :] < r_store))


def lora_shrink(
    x2: torch.Tensor,  # [M, K]
    lora_A: torch.Tensor,  # [r, K]
    dropout_p: float,
    seed: torch.Tensor | None,  # [] int64, read in-kernel
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(s, partials)``: ``s`` the fp32 ``[M, r]`` output and ``partials`` the tensor the
    kernel wrote, ``s`` itself or a ``[SPLIT_K, M, R]`` fp32 workspace whose sum over the first dim is S
    (then ``s`` is left for ``lora_gemm`` to fill)."""
    M, K = x2.shape
    r = lora_A.shape[0]
    R = _config.rank_bucket(r)
    interpreter = _config.interpreted(_lora_shrink_kernel)
    cfg = _config.shrink_config(M, K, R, x2.device, interpreter)
    split = cfg.pop("SPLIT_K")
    block_m, block_k = cfg["BLOCK_M"], cfg["BLOCK_K"]
    # Split boundaries on BLOCK_K multiples so every tile starts where the mask's 8-column groups do.
    k_per_split = max(1, triton.cdiv(triton.cdiv(K, split), block_k)) * block_k
    split = max(1, triton.cdiv(K, k_per_split))
    s = torch.empty((M, r), dtype=torch.float32, device=x2.device)
    if split == 1:
        partials, r_store, strides = s, r, (0, s.stride(0), s.stride(1))
    else:
        partials = torch.empty((split, M, R), dtype=torch.float32, device=x2.device)
        r_store, strides = R, partials.stride()
    if M == 0:
        return s, partials
    has_dropout = dropout_p > 0.0
    grid = (triton.cdiv(M, block_m), split)
    _lora_shrink_kernel[grid](
        x2, lora_A, partials, seed if has_dropout else x2,
        M, K, r, r_store, k_per_split,
        x2.stride(0), x2.stride(1), lora_A.stride(0), lora_A.stride(1), *strides,
        dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
        R=R, HAS_DROPOUT=has_dropout, DOT_PRECISION=_config.dot_precision(x2.dtype), **cfg,
    )
    return s, partials
