"""The base GEMM with the LoRA expand fused into its epilogue, one output write:

    C[M, N] = A[M, K] @ B[K, N]  (+ bias[N])  + lr_scale * (keep ⊙) (L[M, r] @ U[r, N])

- forward:  A = x, B = W^T (strides, so a Conv1D weight's transposed view is never copied),
  L = S, U = lora_B^T, lr_scale = scaling, no mask;
- backward: A = dY, B = W, L = G (already scaled by scaling / (1 - p)), U = lora_A, keep = the
  dropout mask of x regenerated in the epilogue (``dx = dY W + scaling * mask/(1-p) * (G A)``);
- dW = dY^T x is the same kernel without the low-rank term.

When the shrink split K, ``L`` arrives as fp32 partials ``[SPLIT, M, R]``: every program sums them
in the same order (so all agree bit for bit) and the ``pid_n == 0`` column of programs writes the sum
to the ``[M, r]`` S output the forward returns.

Operands are read in their own dtype and cast per tile to A's dtype (adapter weights may be fp32;
x is never cast up); tl.dot accumulates in fp32.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _config
from .dropout import _keep_mask, dropout_threshold

__all__ = ["lora_gemm"]


@triton.jit(do_not_specialize=["threshold"])
def _lora_gemm_kernel(
    # pointers
    a_ptr, b_ptr, bias_ptr, l_ptr, lp_ptr, u_ptr, c_ptr, seed_ptr,
    # sizes
    M, N, K, r,
    # strides
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_lm, stride_lr, stride_lps, stride_lpm, stride_lpr, stride_ur, stride_un,
    stride_cm, stride_cn,
    # runtime scalars
    lr_scale, threshold,
    # feature flags and tiles
    R: tl.constexpr, RANK_CHUNK: tl.constexpr, SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M row blocks sweep the columns together so their B tiles stay in L2.
    pid = tl.program_id(0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows / columns past the edge wrap around inside the matrix: the main loop needs no M / N masks
    # and the store drops them.
    offs_am = (offs_m % M).to(tl.int64)
    offs_bn = (offs_n % N).to(tl.int64)
    a_ptrs = a_ptr + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak  # [BM, BK]
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn  # [BK, BN]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if HAS_LORA:
        row_ok = offs_m[:, None] < M
        lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in tl.static_range(0, R, RANK_CHUNK):
            offs_r = r0 + tl.arange(0, RANK_CHUNK)
            rank_ok = offs_r[None, :] < r
            l_ptrs = l_ptr + offs_m[:, None].to(tl.int64) * stride_lm + offs_r[None, :] * stride_lr
            if SPLIT == 1:
                low = tl.load(l_ptrs, mask=row_ok & rank_ok, other=0.0).to(tl.float32)  # [BM, RC]
            else:
                lp_ptrs = lp_ptr + offs_m[:, None].to(tl.int64) * stride_lpm + offs_r[None, :] * stride_lpr
                low = tl.zeros((BLOCK_M, RANK_CHUNK), dtype=tl.float32)
                for split in tl.static_range(SPLIT):
                    low += tl.load(lp_ptrs + split * stride_lps, mask=row_ok, other=0.0)
                if pid_n == 0:
                    tl.store(l_ptrs, low, mask=row_ok & rank_ok)
            u = tl.load(u_ptr + offs_r[:, None] * stride_ur + offs_bn[None, :] * stride_un,
                        mask=offs_r[:, None] < r, other=0.0)  # [RC, BN]
            # The scale goes on the small [BM, RC] operand, in fp32, before the cast to the dot dtype.
            low = (low * lr_scale).to(a_ptr.dtype.element_ty)
            if HAS_MASK:
                lora = tl.dot(low, u.to(low.dtype), lora, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(low, u.to(low.dtype), acc, input_precision=DOT_PRECISION)
        if HAS_MASK:
            keep = _keep_mask(tl.load(seed_ptr), offs_m, pid_n * BLOCK_N, threshold, BLOCK_M, BLOCK_N)
            acc += tl.where(keep, lora, 0.0)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc += bias[None, :]

    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@functools.lru_cache(maxsize=None)
def _autotuned_kernel():
    """``_lora_gemm_kernel`` autotuned over ``GEMM_AUTOTUNE_CONFIGS`` (FASTLORA_AUTOTUNE=1 only).

    Every config writes the same C (and S), so re-running a launch while tuning is harmless."""
    return triton.autotune(
        configs=_config.GEMM_AUTOTUNE_CONFIGS,
        key=["M", "N", "K", "R", "SPLIT", "HAS_BIAS", "HAS_LORA", "HAS_MASK"],
    )(_lora_gemm_kernel)


def lora_gemm(
    a: torch.Tensor,  # [M, K], any strides
    b: torch.Tensor,  # [K, N], any strides (a transposed view is fine)
    out: torch.Tensor,  # [M, N], written
    bias: torch.Tensor | None = None,  # [N]
    low: torch.Tensor | None = None,  # L: [M, r], fp32 (or written, when low_partials is given)
    up: torch.Tensor | None = None,  # U: [r, N]
    lr_scale: float = 1.0,
    low_partials: torch.Tensor | None = None,  # [SPLIT, M, R] fp32: L is their sum, written to ``low``
    dropout_p: float = 0.0,  # > 0: the low-rank term is masked with the keep-mask of an [M, N] input
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out = a @ b (+ bias) + lr_scale * (keep ⊙) (low @ up)``; returns ``out``."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return out
    has_lora = low is not None
    r = up.shape[0] if has_lora else 1
    R = _config.rank_bucket(r)
    split = low_partials.shape[0] if low_partials is not None and low_partials is not low else 1
    lp = low_partials if split > 1 else out
    has_mask = has_lora and dropout_p > 0.0
    l_strides = low.stride() if has_lora else (0, 0)
    u_strides = up.stride() if has_lora else (0, 0)
    args = (
        a, b, bias if bias is not None else out, low if has_lora else out, lp, up if has_lora else out, out,
        seed if has_mask else out,
        M, N, K, r,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        *l_strides, *(lp.stride() if split > 1 else (0, 0, 0)), *u_strides,
        out.stride(0), out.stride(1),
        float(lr_scale), dropout_threshold(dropout_p),
    )
    flags = dict(R=R, RANK_CHUNK=_config.rank_chunk(R), SPLIT=split, HAS_BIAS=bias is not None,
                 HAS_LORA=has_lora, HAS_MASK=has_mask, DOT_PRECISION=_config.dot_precision(a.dtype))
    interpreter = _config.interpreted(_lora_gemm_kernel)
    if _config.AUTOTUNE and not interpreter:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _autotuned_kernel()[grid](*args, **flags)
        return out
    cfg = _config.gemm_config(M, N, K, a.dtype, interpreter)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _lora_gemm_kernel[grid](*args, **flags, **cfg)
    return out
