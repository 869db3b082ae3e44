"""Multi-adapter LoRA over a mixed batch: every token t carries an adapter slot ``a_t`` (-1 = base only) and

    y[t] += scalings[a_t] * (x[t] A[a_t, :r_t]^T) B[a_t, :, :r_t]^T,     r_t = ranks[a_t]

with the adapters of one layer stacked in a bank, ``A: [L, R, K]``, ``B: [L, N, R]`` (slot s holds its
adapter in its first ``ranks[s]`` rows / columns; rank 0 = empty slot). ``y`` is the base layer's
output, updated in place: the base matmul is whatever the base layer is (dense, NF4, ...).

Two launches, as in punica / S-LoRA's SGMV and BGMV:
    1. shrink:  S[t, :r_t] = x[t] A[a_t, :r_t]^T                       [M, R] fp32, rows by token
    2. expand:  y[t] += scalings[a_t] * S[t, :r_t] B[a_t, :, :r_t]^T

over one of two layouts of the batch (built once per forward by ``fastlora.ops.multi_lora``, shared by
every layer; nothing here synchronises with the host):
- segments (prefill): ``sorted_tokens [M]`` lists the tokens grouped by slot, and ``blocks [3, NB]``
  gives each program its (slot, start, end) in that list, BLOCK_M tokens at most, all of one slot, so
  an adapter's weights are read once per block and the products go through ``tl.dot``. Blocks past the
  last segment have slot -1.
- rows (decode): one program per token row and ``token_slots [M]`` says which adapter; no sort.

Compute is clamped to each slot's own rank, a runtime value read in-kernel: the expand walks
``range(0, rank, RANK_CHUNK)`` and shrink programs whose rank chunk starts past the rank exit at once;
loads beyond the rank are masked. Tokens of slot -1 are never read or written (in segments they are
not in any block; in rows their programs exit). The accumulator shapes are bucketed to powers of two
(``_config.rank_bucket``), so adding an adapter of another rank never recompiles unless the bank's
widest rank moves to the next bucket.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from . import _config

__all__ = ["sgmv_shrink", "sgmv_expand", "multi_lora_add", "multi_lora_unsupported_reason"]


# ---- configs ----------------------------------------------------------------------------------------------------

# Shrink programs own at most this many rank columns ([BLOCK_M, 64] fp32 accumulator); wider banks split
# the rank over the grid, and a slot's programs past its own rank exit without reading anything.
SHRINK_RANK_CHUNK = 64
# The expand walks the rank in chunks of this many columns (tl.dot needs >= 16).
EXPAND_RANK_CHUNK = 32


def _shrink_chunk(R: int) -> int:
    return min(_config.rank_bucket(R), SHRINK_RANK_CHUNK)


def _expand_chunk(R: int) -> int:
    return min(_config.rank_bucket(R), EXPAND_RANK_CHUNK)


def shrink_config(rank_chunk: int, rows: bool, interpreter: bool) -> dict:
    if interpreter:
        return dict(BLOCK_K=64, num_warps=4, num_stages=1)
    if rows:  # [RC, BLOCK_K] adapter tile in registers, reduced over K every step
        return dict(BLOCK_K=128 if rank_chunk <= 32 else 64, num_warps=4, num_stages=3)
    return dict(BLOCK_K=128 if rank_chunk <= 32 else 64, num_warps=4, num_stages=3)


def expand_config(block_m: int, rows: bool, interpreter: bool) -> dict:
    if interpreter:
        return dict(BLOCK_N=64, num_warps=4, num_stages=1)
    if rows:
        return dict(BLOCK_N=128, num_warps=4, num_stages=2)
    # y tiles are read and written once each: wide N tiles for short segments, square for long ones.
    return dict(BLOCK_N=128 if block_m <= 32 else 64, num_warps=4, num_stages=2)


# ---- kernels: segments ------------------------------------------------------------------------------------------

@triton.jit
def _sgmv_shrink_kernel(
    # pointers
    x_ptr, a_ptr, s_ptr, tokens_ptr, blocks_ptr, ranks_ptr,
    # sizes
    K,
    # strides
    stride_xm, stride_xk, stride_al, stride_ar, stride_ak, stride_sm, stride_sr, stride_blocks,
    RANK_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_r = tl.program_id(1)
    slot = tl.load(blocks_ptr + pid_b)
    rank = tl.load(ranks_ptr + tl.maximum(slot, 0))
    r0 = pid_r * RANK_CHUNK
    if (slot >= 0) & (r0 < rank):
        start = tl.load(blocks_ptr + stride_blocks + pid_b)
        end = tl.load(blocks_ptr + 2 * stride_blocks + pid_b)
        offs = start + tl.arange(0, BLOCK_M)
        row_ok = offs < end
        tok = tl.load(tokens_ptr + offs, mask=row_ok, other=0).to(tl.int64)  # [BM] token rows of x, S
        offs_r = r0 + tl.arange(0, RANK_CHUNK)
        rank_ok = offs_r[None, :] < rank
        offs_k = tl.arange(0, BLOCK_K)
        x_rows = x_ptr + tok[:, None] * stride_xm
        a_cols = a_ptr + slot.to(tl.int64) * stride_al + offs_r[None, :] * stride_ar  # A^T tile: [1, RC]
        acc = tl.zeros((BLOCK_M, RANK_CHUNK), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            x = tl.load(x_rows + kk[None, :] * stride_xk, mask=row_ok[:, None] & (kk[None, :] < K), other=0.0)
            a = tl.load(a_cols + kk[:, None].to(tl.int64) * stride_ak, mask=(kk[:, None] < K) & rank_ok, other=0.0)
            acc = tl.dot(x, a.to(x.dtype), acc, input_precision=DOT_PRECISION)  # [BM, BK] @ [BK, RC]
        s_ptrs = s_ptr + tok[:, None] * stride_sm + offs_r[None, :] * stride_sr
        tl.store(s_ptrs, acc, mask=row_ok[:, None] & rank_ok)


@triton.jit
def _sgmv_expand_kernel(
    # pointers
    y_ptr, s_ptr, b_ptr, tokens_ptr, blocks_ptr, ranks_ptr, scalings_ptr,
    # sizes
    N,
    # strides
    stride_ym, stride_yn, stride_sm, stride_sr, stride_bl, stride_bn, stride_br, stride_blocks,
    RANK_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(blocks_ptr + pid_b)
    rank = tl.load(ranks_ptr + tl.maximum(slot, 0))
    if (slot >= 0) & (rank > 0):
        start = tl.load(blocks_ptr + stride_blocks + pid_b)
        end = tl.load(blocks_ptr + 2 * stride_blocks + pid_b)
        scale = tl.load(scalings_ptr + slot)
        offs = start + tl.arange(0, BLOCK_M)
        row_ok = offs < end
        tok = tl.load(tokens_ptr + offs, mask=row_ok, other=0).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = offs_n[None, :] < N
        b_base = b_ptr + slot.to(tl.int64) * stride_bl + offs_n[None, :].to(tl.int64) * stride_bn  # B^T: [1, BN]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rank, RANK_CHUNK):
            offs_r = r0 + tl.arange(0, RANK_CHUNK)
            low = tl.load(s_ptr + tok[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                          mask=row_ok[:, None] & (offs_r[None, :] < rank), other=0.0)  # [BM, RC] fp32
            up = tl.load(b_base + offs_r[:, None] * stride_br, mask=(offs_r[:, None] < rank) & col_ok, other=0.0)
            # The scale goes on the small [BM, RC] operand, in fp32, before the cast to y's dtype.
            low = (low * scale).to(y_ptr.dtype.element_ty)
            acc = tl.dot(low, up.to(low.dtype), acc, input_precision=DOT_PRECISION)  # [BM, RC] @ [RC, BN]
        y_ptrs = y_ptr + tok[:, None] * stride_ym + offs_n[None, :] * stride_yn
        mask = row_ok[:, None] & col_ok
        y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)


# ---- kernels: rows ----------------------------------------------------------------------------------------------

@triton.jit
def _bgmv_shrink_kernel(
    # pointers
    x_ptr, a_ptr, s_ptr, slots_ptr, ranks_ptr,
    # sizes
    K,
    # strides
    stride_xm, stride_xk, stride_al, stride_ar, stride_ak, stride_sm, stride_sr,
    RANK_CHUNK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    slot = tl.load(slots_ptr + pid_m)
    rank = tl.load(ranks_ptr + tl.maximum(slot, 0))
    r0 = pid_r * RANK_CHUNK
    if (slot >= 0) & (r0 < rank):
        offs_r = r0 + tl.arange(0, RANK_CHUNK)
        rank_ok = offs_r < rank
        offs_k = tl.arange(0, BLOCK_K)
        x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
        a_rows = a_ptr + slot.to(tl.int64) * stride_al + offs_r[:, None] * stride_ar  # [RC, 1]
        acc = tl.zeros((RANK_CHUNK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            x = tl.load(x_row + kk * stride_xk, mask=kk < K, other=0.0).to(tl.float32)  # [BK]
            a = tl.load(a_rows + kk[None, :].to(tl.int64) * stride_ak, mask=rank_ok[:, None] & (kk[None, :] < K),
                        other=0.0).to(tl.float32)  # [RC, BK]
            acc += tl.sum(a * x[None, :], axis=1)
        tl.store(s_ptr + pid_m.to(tl.int64) * stride_sm + offs_r * stride_sr, acc, mask=rank_ok)


@triton.jit
def _bgmv_expand_kernel(
    # pointers
    y_ptr, s_ptr, b_ptr, slots_ptr, ranks_ptr, scalings_ptr,
    # sizes
    N,
    # strides
    stride_ym, stride_yn, stride_sm, stride_sr, stride_bl, stride_bn, stride_br,
    RANK_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(slots_ptr + pid_m)
    rank = tl.load(ranks_ptr + tl.maximum(slot, 0))
    if (slot >= 0) & (rank > 0):
        scale = tl.load(scalings_ptr + slot)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        s_row = s_ptr + pid_m.to(tl.int64) * stride_sm
        b_rows = b_ptr + slot.to(tl.int64) * stride_bl + offs_n[:, None].to(tl.int64) * stride_bn  # [BN, 1]
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for r0 in range(0, rank, RANK_CHUNK):
            offs_r = r0 + tl.arange(0, RANK_CHUNK)
            r_ok = offs_r < rank
            low = tl.load(s_row + offs_r * stride_sr, mask=r_ok, other=0.0)  # [RC] fp32
            up = tl.load(b_rows + offs_r[None, :] * stride_br, mask=col_ok[:, None] & r_ok[None, :],
                         other=0.0).to(tl.float32)  # [BN, RC]
            acc += tl.sum(up * low[None, :], axis=1)
        y_ptrs = y_ptr + pid_m.to(tl.int64) * stride_ym + offs_n * stride_yn
        y = tl.load(y_ptrs, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + acc * scale).to(y_ptr.dtype.element_ty), mask=col_ok)


# ---- launchers --------------------------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_batch(M: int, L: int, ranks, scalings, token_slots, sorted_tokens, blocks, block_m) -> list[str]:
    problems = []
    if tuple(ranks.shape) != (L,) or (scalings is not None and tuple(scalings.shape) != (L,)):
        problems.append(f"ranks {tuple(ranks.shape)} / scalings must be [{L}]")
    if tuple(token_slots.shape) != (M,):
        problems.append(f"token_slots {tuple(token_slots.shape)} is not [{M}]")
    if block_m:
        if tuple(sorted_tokens.shape) != (M,) or blocks.dim() != 2 or blocks.shape[0] != 3:
            problems.append(f"sorted_tokens {tuple(sorted_tokens.shape)} / blocks {tuple(blocks.shape)} do not fit")
        if block_m < 16 or block_m & (block_m - 1):
            problems.append(f"block_m {block_m} is not a power of two >= 16")
    return problems


def _raise(problems: list[str]) -> None:
    if problems:
        raise ValueError("multi-adapter kernels: " + "; ".join(problems))


def sgmv_shrink(
    x: torch.Tensor,  # [M, K]
    lora_A: torch.Tensor,  # [L, R, K]
    ranks: torch.Tensor,  # [L] int32
    token_slots: torch.Tensor,  # [M] int32, -1 = base
    sorted_tokens: torch.Tensor,  # [M] int32 (segments) or empty (rows)
    blocks: torch.Tensor,  # [3, NB] int32 (segments) or empty (rows)
    block_m: int,  # 0: rows; else the tokens per block the segment table was built for
) -> torch.Tensor:
    """``S [M, R]`` fp32 with ``S[t, :r_t] = x[t] A[a_t, :r_t]^T``; other entries are left unwritten."""
    M, K = x.shape
    L, R, _ = lora_A.shape
    problems = [] if lora_A.shape[2] == K else [f"lora_A {tuple(lora_A.shape)} does not fit x {(M, K)}"]
    _raise(problems + _check_batch(M, L, ranks, None, token_slots, sorted_tokens, blocks, block_m))
    s = torch.empty((M, R), dtype=torch.float32, device=x.device)
    if M == 0 or L == 0 or R == 0 or K == 0:
        return s.zero_() if K == 0 else s
    chunk = _shrink_chunk(R)
    interpreter = _config.interpreted(_sgmv_shrink_kernel)
    cfg = shrink_config(chunk, rows=not block_m, interpreter=interpreter)
    strides = (x.stride(0), x.stride(1), *lora_A.stride(), s.stride(0), s.stride(1))
    if block_m:
        grid = (blocks.shape[1], triton.cdiv(R, chunk))
        _sgmv_shrink_kernel[grid](
            x, lora_A, s, sorted_tokens, blocks, ranks, K, *strides, blocks.stride(0),
            RANK_CHUNK=chunk, BLOCK_M=block_m, DOT_PRECISION=_config.dot_precision(x.dtype), **cfg,
        )
    else:
        grid = (M, triton.cdiv(R, chunk))
        _bgmv_shrink_kernel[grid](x, lora_A, s, token_slots, ranks, K, *strides, RANK_CHUNK=chunk, **cfg)
    return s


def sgmv_expand(
    y: torch.Tensor,  # [M, N], updated in place
    s: torch.Tensor,  # [M, R] fp32, as sgmv_shrink returned it
    lora_B: torch.Tensor,  # [L, N, R]
    ranks: torch.Tensor,  # [L] int32
    scalings: torch.Tensor,  # [L] fp32
    token_slots: torch.Tensor,
    sorted_tokens: torch.Tensor,
    blocks: torch.Tensor,
    block_m: int,
) -> torch.Tensor:
    """``y[t] += scalings[a_t] * S[t, :r_t] B[a_t, :, :r_t]^T`` for every token with a slot; returns ``y``."""
    M, N = y.shape
    L, _, R = lora_B.shape
    problems = [] if lora_B.shape[1] == N and tuple(s.shape) == (M, R) else [
        f"y {tuple(y.shape)}, S {tuple(s.shape)} and lora_B {tuple(lora_B.shape)} do not fit"]
    _raise(problems + _check_batch(M, L, ranks, scalings, token_slots, sorted_tokens, blocks, block_m))
    if M == 0 or N == 0 or L == 0 or R == 0:
        return y
    chunk = _expand_chunk(R)
    interpreter = _config.interpreted(_sgmv_expand_kernel)
    cfg = expand_config(block_m, rows=not block_m, interpreter=interpreter)
    strides = (y.stride(0), y.stride(1), s.stride(0), s.stride(1), *lora_B.stride())
    grid_n = triton.cdiv(N, cfg["BLOCK_N"])
    if block_m:
        _sgmv_expand_kernel[(blocks.shape[1], grid_n)](
            y, s, lora_B, sorted_tokens, blocks, ranks, scalings, N, *strides, blocks.stride(0),
            RANK_CHUNK=chunk, BLOCK_M=block_m, DOT_PRECISION=_config.dot_precision(y.dtype), **cfg,
        )
    else:
        _bgmv_expand_kernel[(M, grid_n)](y, s, lora_B, token_slots, ranks, scalings, N, *strides,
                                         RANK_CHUNK=chunk, **cfg)
    return y


def multi_lora_add(
    y: torch.Tensor,  # [M, N], the base output, updated in place
    x: torch.Tensor,  # [M, K]
    lora_A: torch.Tensor,  # [L, R, K]
    lora_B: torch.Tensor,  # [L, N, R]
    ranks: torch.Tensor,  # [L] int32
    scalings: torch.Tensor,  # [L] fp32
    token_slots: torch.Tensor,  # [M] int32, -1 = base
    sorted_tokens: torch.Tensor,  # [M] int32, or empty in rows mode
    blocks: torch.Tensor,  # [3, NB] int32, or empty in rows mode
    block_m: int,  # 0 = rows mode
) -> torch.Tensor:
    """``y[t] += scalings[a_t] * (x[t] A[a_t, :r_t]^T) B[a_t, :, :r_t]^T``: shrink then expand; returns ``y``."""
    if lora_B.shape[2] != lora_A.shape[1] or lora_B.shape[0] != lora_A.shape[0]:
        _raise([f"lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} are not one bank"])
    s = sgmv_shrink(x, lora_A, ranks, token_slots, sorted_tokens, blocks, block_m)
    return sgmv_expand(y, s, lora_B, ranks, scalings, token_slots, sorted_tokens, blocks, block_m)


def multi_lora_unsupported_reason(y, x, lora_A, lora_B, ranks, scalings, token_slots) -> str | None:
    """None when the kernels serve this call, else a short reason for falling back to the reference."""
    device = x.device
    interpreter = _config.interpreted(_sgmv_expand_kernel)
    reason = _config.device_reason((x, y, lora_A, lora_B, ranks, scalings, token_slots), _sgmv_expand_kernel)
    if reason is not None:
        return reason
    if x.dim() != 2 or y.dim() != 2 or lora_A.dim() != 3 or lora_B.dim() != 3:
        return "inputs are not 2-D / banks are not 3-D"
    for name, t in (("x", x), ("y", y), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype not in _FLOAT_DTYPES:
            return f"{name} dtype {str(t.dtype).replace('torch.', '')}"
    if ranks.dtype not in _INDEX_DTYPES or token_slots.dtype not in _INDEX_DTYPES:
        return "ranks / token_slots are not integer tensors"
    if scalings.dtype != torch.float32:
        return "scalings are not float32"
    if torch.bfloat16 in (x.dtype, y.dtype):
        if interpreter:
            # Seen with triton 3.9: tl.dot on bf16 operands returns garbage in the interpreter.
            return "bfloat16 under the Triton interpreter"
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
            return "bfloat16 needs compute capability 8.0"
    return None
