"""NF4 kernels: quantize, dequantize, and a fused dequantize-matmul (plus LoRA expand) for small M.

Format (bitsandbytes'): a weight ``[N, K]`` flattened row-major, cut into blocks of ``BLOCKSIZE`` values
that run over the flat index (a block may span two rows when K % BLOCKSIZE != 0), one fp32 absmax per
block, two 4-bit NF4 indices per byte with the first element in the high nibble. With double
quantization the absmax is a uint8 index into a 256-level map, times an fp32 ``nested_absmax`` per
``NESTED_BLOCKSIZE`` blocks, plus an ``offset``. Every kernel addresses weights by flat index, so any K
works, including an odd element count.

- ``nf4_quantize``:  one program per quantization block: absmax, scale (multiply by the reciprocal; the
  short last block divides, as bitsandbytes does), nearest of the 16 levels (ties to the lower one, the
  15 midpoints compared in order), pack. Byte-identical with bitsandbytes.
- ``nf4_dequantize``: ``w = NF4[idx] * absmax`` in fp32, cast to the output dtype: bit-identical with
  bitsandbytes' dequantize (launched without fp fusion so ``code[q] * nested_absmax + offset`` rounds
  twice, as bitsandbytes' separate ops do).
- ``nf4_matmul``: ``y = x deq(W)^T (+ b) (+ scaling * S lora_B^T)`` for M up to ``FUSED_MAX_M``; the
  packed weight is read once, dequantized in registers to x's dtype (the same values ``nf4_dequantize``
  writes), and K is split across programs for enough parallelism at decode sizes.

Large M uses ``nf4_dequantize`` into a reused workspace and then the bf16 LoRA kernels (``nf4_linear.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _config

__all__ = ["FUSED_MAX_M", "nf4_quantize", "nf4_dequantize", "nf4_matmul"]

# Up to this many rows the fused kernel runs; above it dequantize-then-GEMM. A heuristic (no GPU
# measurement behind it yet): the fused kernel re-dequantizes each weight tile for every BLOCK_M rows.
FUSED_MAX_M = 16


def _matmul_config(M: int, N: int, K: int, device: torch.device, interpreter: bool) -> dict:
    """Tiles and K-split for the fused kernel: enough programs to cover the SMs at decode sizes."""
    if interpreter:
        block_n, block_k = 32, 64
        split = min(2, triton.cdiv(K, block_k))
        return dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=4, num_stages=1)
    # Each element of the weight tile gathers its level and its absmax: at 3 stages of [128, 64] that
    # took 221 KB of shared memory (over sm_80's 163 KB); [64, 64] x 2 stages fits every target.
    block_n, block_k = 64, 64
    tiles = triton.cdiv(N, block_n) * triton.cdiv(M, 16)
    split = 1
    if device.type == "cuda":
        split = max(1, min(triton.cdiv(K, block_k), triton.cdiv(2 * _config._sm_count(device), tiles), 16))
    return dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=4, num_stages=2)


# ---- kernels -------------------------------------------------------------------------------------
@triton.jit
def _block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, block, offset, mask,
                  NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr):
    """fp32 absmax of quantization block(s) ``block``, undoing double quantization when NESTED."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        level = tl.load(nested_code_ptr + q, mask=mask, other=0.0)
        scale = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        return level * scale + offset
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def _nf4_values(packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, flat, offset, mask,
                BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr):
    """fp32 weights at flat indices ``flat`` (any shape): level * absmax."""
    byte = tl.load(packed_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
    index = tl.where(flat % 2 == 0, byte >> 4, byte & 0xF)  # first element in the high nibble
    level = tl.load(code_ptr + index, mask=mask, other=0.0)
    absmax = _block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, flat // BLOCKSIZE, offset, mask,
                           NESTED_BLOCKSIZE, NESTED)
    return level * absmax


@triton.jit
def _nf4_quantize_kernel(
    w_ptr, midpoints_ptr, packed_ptr, absmax_ptr,
    n,
    BLOCKSIZE: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64)
    pair = tl.arange(0, BLOCKSIZE // 2)
    even = block * BLOCKSIZE + 2 * pair  # blocks are even-sized, so a byte's two values share a block
    odd = even + 1
    v_even = tl.load(w_ptr + even, mask=even < n, other=0.0).to(tl.float32)
    v_odd = tl.load(w_ptr + odd, mask=odd < n, other=0.0).to(tl.float32)
    absmax = tl.maximum(tl.max(tl.abs(v_even), axis=0), tl.max(tl.abs(v_odd), axis=0))
    tl.store(absmax_ptr + block, absmax)
    # Float literals stay out of the arithmetic: triton 3.6 types them fp64 (1e-38 promoted absmax).
    safe = tl.maximum(absmax, tl.full([], 1e-38, tl.float32))
    inverse = tl.math.div_rn(tl.full([], 1.0, tl.float32), safe)
    full = (block + 1) * BLOCKSIZE <= n
    s_even = tl.where(full, v_even * inverse, tl.math.div_rn(v_even, safe))
    s_odd = tl.where(full, v_odd * inverse, tl.math.div_rn(v_odd, safe))
    s_even = tl.minimum(tl.maximum(s_even, -1.0), 1.0)
    s_odd = tl.minimum(tl.maximum(s_odd, -1.0), 1.0)
    q_even = tl.zeros((BLOCKSIZE // 2,), dtype=tl.int32)
    q_odd = tl.zeros((BLOCKSIZE // 2,), dtype=tl.int32)
    for i in tl.static_range(15):  # index = number of midpoints strictly below the value
        mid = tl.load(midpoints_ptr + i)
        q_even += (s_even > mid).to(tl.int32)
        q_odd += (s_odd > mid).to(tl.int32)
    tl.store(packed_ptr + block * (BLOCKSIZE // 2) + pair, ((q_even << 4) | q_odd).to(tl.uint8), mask=even < n)


@triton.jit
def _nf4_dequantize_kernel(
    packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, out_ptr,
    n, offset,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCK: tl.constexpr,
):
    flat = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = flat < n
    w = _nf4_values(packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, flat, offset, mask,
                    BLOCKSIZE, NESTED_BLOCKSIZE, NESTED)
    tl.store(out_ptr + flat, w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _nf4_matmul_kernel(
    # pointers
    x_ptr, packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, bias_ptr, s_ptr, up_ptr, out_ptr,
    # sizes (each K-split covers k_per_split columns, a multiple of BLOCK_K)
    M, N, K, r, k_per_split,
    # strides
    stride_xm, stride_xk, stride_sm, stride_sr, stride_un, stride_ur, stride_os, stride_om, stride_on,
    # runtime scalars
    offset, scaling,
    # feature flags and tiles
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, R: tl.constexpr, RANK_CHUNK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m[:, None] < M
    col_ok = offs_n[None, :] < N
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
                    mask=row_ok & (offs_k[None, :] < K), other=0.0)  # [BM, BK]
        flat = offs_n[None, :].to(tl.int64) * K + offs_k[:, None]  # deq(W)^T tile: [BK, BN]
        w = _nf4_values(packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, flat, offset,
                        col_ok & (offs_k[:, None] < K), BLOCKSIZE, NESTED_BLOCKSIZE, NESTED)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)

    if pid_k == 0:  # the epilogue terms are added once, by the first K-split
        if HAS_LORA:
            for r0 in tl.static_range(0, R, RANK_CHUNK):
                offs_r = r0 + tl.arange(0, RANK_CHUNK)
                low = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                              mask=row_ok & (offs_r[None, :] < r), other=0.0)  # S: [BM, RC] fp32
                up = tl.load(up_ptr + offs_r[:, None] * stride_ur + offs_n[None, :] * stride_un,
                             mask=(offs_r[:, None] < r) & col_ok, other=0.0)  # lora_B^T: [RC, BN]
                # The scale goes on the small [BM, RC] operand, in fp32, before the cast to x's dtype.
                low = (low * scaling).to(x_ptr.dtype.element_ty)
                acc = tl.dot(low, up.to(low.dtype), acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]

    out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok & col_ok)


# ---- launchers -----------------------------------------------------------------------------------
def _nested_args(state) -> tuple:
    """(absmax, nested_absmax, nested_code, offset, NESTED_BLOCKSIZE, NESTED) for a kernel launch."""
    if state.nested_absmax is None:
        return state.absmax, state.absmax, state.absmax, 0.0, 256, False
    return state.absmax, state.nested_absmax, state.nested_code, float(state.offset), state.nested_blocksize, True


def nf4_quantize(weight: torch.Tensor, midpoints: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed uint8 [(n + 1) // 2, 1], absmax fp32 [blocks])`` for a float weight (any shape);
    ``midpoints``: the 15 fp32 decision boundaries between the sorted NF4 levels."""
    w = weight.contiguous().view(-1)
    n = w.numel()
    blocks = triton.cdiv(n, blocksize)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=w.device)
    absmax = torch.empty(blocks, dtype=torch.float32, device=w.device)
    _nf4_quantize_kernel[(blocks,)](w, midpoints, packed, absmax, n, BLOCKSIZE=blocksize, num_warps=1)
    return packed, absmax


def nf4_dequantize(packed: torch.Tensor, state, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The ``state.shape`` weight in ``dtype``; ``state`` needs ``shape, blocksize, code, absmax,
    nested_absmax, nested_code, nested_blocksize, offset`` (``fastlora.quant.NF4State``). ``out``, when
    given, is a contiguous buffer of at least that many elements that receives the result."""
    n = state.shape[0] * state.shape[1]
    if out is None:
        out = torch.empty(n, dtype=dtype, device=packed.device)
    out = out.view(-1)[:n]
    absmax, nested_absmax, nested_code, offset, nested_blocksize, nested = _nested_args(state)
    block = 1024
    _nf4_dequantize_kernel[(triton.cdiv(n, block),)](
        packed.view(torch.uint8), state.code, absmax, nested_absmax, nested_code, out, n, offset,
        BLOCKSIZE=state.blocksize, NESTED_BLOCKSIZE=nested_blocksize, NESTED=nested, BLOCK=block,
        num_warps=4, enable_fp_fusion=False,
    )
    return out.view(state.shape)


def nf4_matmul(
    x2: torch.Tensor,  # [M, K]
    packed: torch.Tensor,  # [(N K + 1) // 2, 1] uint8 (or a view of the same bytes)
    state,  # NF4State-like: shape (N, K), blocksize, code, absmax, nested parts
    bias: torch.Tensor | None = None,  # [N]
    s: torch.Tensor | None = None,  # [M, r] fp32: the LoRA shrink
    lora_B: torch.Tensor | None = None,  # [N, r]
    scaling: float = 1.0,
) -> torch.Tensor:
    """``x deq(W)^T (+ bias) (+ scaling * S lora_B^T)`` in x's dtype, reading the packed weight once."""
    M, K = x2.shape
    N = state.shape[0]
    if state.shape[1] != K:
        raise ValueError(f"nf4_matmul: x {tuple(x2.shape)} does not fit the weight {tuple(state.shape)}")
    has_lora = s is not None
    r = lora_B.shape[1] if has_lora else 1
    R = _config.rank_bucket(r)
    interpreter = _config.interpreted(_nf4_matmul_kernel)
    cfg = _matmul_config(M, N, K, x2.device, interpreter)
    k_per_split = triton.cdiv(triton.cdiv(K, cfg["BLOCK_K"]), cfg.pop("SPLIT_K")) * cfg["BLOCK_K"]
    split = triton.cdiv(K, k_per_split)  # no empty split
    out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    if M == 0 or N == 0:
        return out
    # With K split, each split writes an fp32 partial; their sum (a fixed order: deterministic) is y.
    target = out if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=x2.device)
    o_strides = (0, *out.stride()) if split == 1 else target.stride()
    absmax, nested_absmax, nested_code, offset, nested_blocksize, nested = _nested_args(state)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), split, triton.cdiv(M, cfg["BLOCK_M"]))
    _nf4_matmul_kernel[grid](
        x2, packed.view(torch.uint8), state.code, absmax, nested_absmax, nested_code,
        bias if bias is not None else out, s if has_lora else out, lora_B if has_lora else out, target,
        M, N, K, r, k_per_split,
        x2.stride(0), x2.stride(1), *(s.stride() if has_lora else (0, 0)),
        *(lora_B.stride() if has_lora else (0, 0)), *o_strides,
        offset, float(scaling),
        BLOCKSIZE=state.blocksize, NESTED_BLOCKSIZE=nested_blocksize, NESTED=nested,
        HAS_BIAS=bias is not None, HAS_LORA=has_lora, R=R, RANK_CHUNK=_config.rank_chunk(R),
        DOT_PRECISION=_config.dot_precision(x2.dtype), enable_fp_fusion=False, **cfg,
    )
    if split > 1:
        torch.sum(target, dim=0, out=out) if out.dtype == torch.float32 else out.copy_(target.sum(0))
    return out
