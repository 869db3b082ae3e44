"""The LoRA backward's low-rank halves (dx and dW run through ``lora_gemm``):

    G  = scaling / (1 - p) * dY B        [M, R] in x's dtype, zero-padded to the rank bucket (for dA, dx)
    dB = scaling * dY^T S                [N, r]
    db = sum_M dY                        [N]
    dA = G^T (mask ⊙ x)                  [r, K]   (mask regenerated from the seed)

``_lora_bwd_shrink_kernel`` does G, dB and db in one launch over dY: its first programs each own a
row block and walk N (G), the rest each own a column block and walk M (dB and db). Each result is
reduced inside one program, so no atomics and a deterministic sum order; dY is streamed twice, the
second time mostly out of L2 since both halves run concurrently. The owned block is narrow (many
programs) and the walked one wide (many bytes in flight per program: these loops are memory-bound).

G is stored in x's dtype: its consumers (dx's epilogue, dA) feed it to tl.dot in that dtype anyway,
so this is the same rounding at half the traffic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _config
from .dropout import _keep_mask, dropout_threshold

__all__ = ["lora_bwd_shrink", "lora_grad_a"]


@triton.jit
def _lora_bwd_shrink_kernel(
    # pointers
    dy_ptr, b_ptr, s_ptr, g_ptr, dbb_ptr, db_ptr,
    # sizes
    M, N, r,
    # strides
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr, stride_gm, stride_gr,
    stride_dbbn, stride_dbbr,
    # runtime scalars
    g_scale, dbb_scale,
    R: tl.constexpr, BLOCK_OWN: tl.constexpr, BLOCK_WALK: tl.constexpr,
    HAS_G: tl.constexpr, HAS_DBB: tl.constexpr, HAS_DB: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_r = tl.arange(0, R)
    rank_ok = offs_r < r
    if HAS_G:
        num_pid_m = (M + BLOCK_OWN - 1) // BLOCK_OWN
    else:
        num_pid_m = 0
    if pid < num_pid_m:
        # G rows: [BM, N] @ [N, R], dY streamed along N.
        offs_m = pid * BLOCK_OWN + tl.arange(0, BLOCK_OWN)
        row_ok = offs_m[:, None] < M
        dy_rows = dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym
        acc = tl.zeros((BLOCK_OWN, R), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_WALK):
            offs_n = n0 + tl.arange(0, BLOCK_WALK)
            dy = tl.load(dy_rows + offs_n[None, :] * stride_dyn, mask=row_ok & (offs_n[None, :] < N), other=0.0)
            b = tl.load(b_ptr + offs_n[:, None].to(tl.int64) * stride_bn + offs_r[None, :] * stride_br,
                        mask=(offs_n[:, None] < N) & rank_ok[None, :], other=0.0)
            acc = tl.dot(dy, b.to(dy.dtype), acc, input_precision=DOT_PRECISION)  # [BM, BN] @ [BN, R]
        g_ptrs = g_ptr + offs_m[:, None].to(tl.int64) * stride_gm + offs_r[None, :] * stride_gr
        tl.store(g_ptrs, (acc * g_scale).to(g_ptr.dtype.element_ty), mask=row_ok)  # padding columns are zeros
    else:
        # dB and db columns: [N, M] @ [M, R] and a column sum, dY streamed along M.
        offs_n = (pid - num_pid_m) * BLOCK_OWN + tl.arange(0, BLOCK_OWN)
        col_ok = offs_n[None, :] < N
        dy_cols = dy_ptr + offs_n[None, :].to(tl.int64) * stride_dyn
        acc = tl.zeros((BLOCK_OWN, R), dtype=tl.float32)
        col_sum = tl.zeros((BLOCK_OWN,), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_WALK):
            offs_m = m0 + tl.arange(0, BLOCK_WALK)
            row_ok = offs_m[:, None] < M
            dy = tl.load(dy_cols + offs_m[:, None].to(tl.int64) * stride_dym, mask=row_ok & col_ok, other=0.0)
            if HAS_DBB:
                s = tl.load(s_ptr + offs_m[:, None].to(tl.int64) * stride_sm + offs_r[None, :] * stride_sr,
                            mask=row_ok & rank_ok[None, :], other=0.0)
                acc = tl.dot(tl.trans(dy), s.to(dy.dtype), acc, input_precision=DOT_PRECISION)  # [BN, BM] @ [BM, R]
            if HAS_DB:
                col_sum += tl.sum(dy.to(tl.float32), axis=0)
        if HAS_DBB:
            dbb_ptrs = dbb_ptr + offs_n[:, None].to(tl.int64) * stride_dbbn + offs_r[None, :] * stride_dbbr
            tl.store(dbb_ptrs, (acc * dbb_scale).to(dbb_ptr.dtype.element_ty),
                     mask=(offs_n[:, None] < N) & rank_ok[None, :])
        if HAS_DB:
            tl.store(db_ptr + offs_n, col_sum.to(db_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit(do_not_specialize=["threshold"])
def _lora_grad_a_kernel(
    # pointers
    x_ptr, g_ptr, da_ptr, seed_ptr,
    # sizes
    M, K, r,
    # strides
    stride_xm, stride_xk, stride_gm, stride_gr, stride_dar, stride_dak,
    # runtime scalars
    threshold,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_k = tl.program_id(0)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R)
    col_ok = offs_k[None, :] < K
    x_cols = x_ptr + offs_k[None, :].to(tl.int64) * stride_xk
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((R, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m[:, None] < M
        x = tl.load(x_cols + offs_m[:, None].to(tl.int64) * stride_xm, mask=row_ok & col_ok, other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_keep_mask(seed, offs_m, pid_k * BLOCK_K, threshold, BLOCK_M, BLOCK_K), x, tl.zeros_like(x))
        g = tl.load(g_ptr + offs_m[:, None].to(tl.int64) * stride_gm + offs_r[None, :] * stride_gr,
                    mask=row_ok, other=0.0)
        acc = tl.dot(tl.trans(g), x, acc, input_precision=DOT_PRECISION)  # [R, BM] @ [BM, BK]
    da_ptrs = da_ptr + offs_r[:, None].to(tl.int64) * stride_dar + offs_k[None, :] * stride_dak
    tl.store(da_ptrs, acc.to(da_ptr.dtype.element_ty), mask=(offs_r[:, None] < r) & col_ok)


def lora_bwd_shrink(
    dy2: torch.Tensor,  # [M, N]
    lora_B: torch.Tensor,  # [N, r]
    s: torch.Tensor,  # [M, r] fp32, from the forward
    scaling: float,
    dropout_p: float,
    needs_g: bool,
    needs_dbB: bool,
    needs_db: bool,
    db_dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Returns ``(G [M, R] in dY's dtype scaled by scaling / (1 - p), dB [N, r] in lora_B's dtype,
    db [N])``, each None when not asked for."""
    M, N = dy2.shape
    r = lora_B.shape[1]
    R = _config.rank_bucket(r)
    dev = dy2.device
    g = torch.empty((M, R), dtype=dy2.dtype, device=dev) if needs_g else None
    dbB = torch.empty((N, r), dtype=lora_B.dtype, device=dev) if needs_dbB else None
    db = torch.empty((N,), dtype=db_dtype, device=dev) if needs_db else None
    if M == 0:  # empty sums
        if dbB is not None:
            dbB.zero_()
        if db is not None:
            db.zero_()
    interpreter = _config.interpreted(_lora_bwd_shrink_kernel)
    cfg = _config.bwd_shrink_config(M, N, R, interpreter)
    n_rows = triton.cdiv(M, cfg["BLOCK_OWN"]) if needs_g else 0
    n_cols = triton.cdiv(N, cfg["BLOCK_OWN"]) if (needs_dbB or needs_db) and M > 0 else 0
    if n_rows + n_cols == 0:
        return g, dbB, db
    placeholder = dy2
    _lora_bwd_shrink_kernel[(n_rows + n_cols,)](
        dy2, lora_B, s, g if needs_g else placeholder, dbB if needs_dbB else placeholder,
        db if needs_db else placeholder,
        M, N, r,
        dy2.stride(0), dy2.stride(1), lora_B.stride(0), lora_B.stride(1), s.stride(0), s.stride(1),
        *(g.stride() if needs_g else (0, 0)), *(dbB.stride() if needs_dbB else (0, 0)),
        scaling / (1.0 - dropout_p), float(scaling),
        R=R, HAS_G=needs_g, HAS_DBB=needs_dbB, HAS_DB=needs_db,
        DOT_PRECISION=_config.dot_precision(dy2.dtype), **cfg,
    )
    return g, dbB, db


def lora_grad_a(
    x2: torch.Tensor,  # [M, K]
    g: torch.Tensor,  # [M, R] in x's dtype, scaled (from lora_bwd_shrink)
    r: int,
    dtype: torch.dtype,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> torch.Tensor:
    """``dA = G^T dropout-mask(x)``: [r, K] in ``dtype``."""
    M, K = x2.shape
    R = g.shape[1]
    da = torch.empty((r, K), dtype=dtype, device=x2.device)
    if K == 0:
        return da
    has_dropout = dropout_p > 0.0
    interpreter = _config.interpreted(_lora_grad_a_kernel)
    cfg = _config.grad_a_config(M, K, R, interpreter)
    _lora_grad_a_kernel[(triton.cdiv(K, cfg["BLOCK_K"]),)](
        x2, g, da, seed if has_dropout else x2,
        M, K, r,
        x2.stride(0), x2.stride(1), g.stride(0), g.stride(1), da.stride(0), da.stride(1),
        dropout_threshold(dropout_p),
        R=R, HAS_DROPOUT=has_dropout, DOT_PRECISION=_config.dot_precision(x2.dtype), **cfg,
    )
    return da
