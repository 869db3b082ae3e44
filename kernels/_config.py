"""Launch configuration shared by the LoRA kernels: rank buckets, heuristic block sizes, dot precision.

No autotuning by default (DESIGN: nothing is benchmarked on the first call): the tables below are
heuristics. ``FASTLORA_AUTOTUNE=1`` (read once, when this module is imported) makes the fused GEMM,
the one kernel where the tile choice moves the needle, autotune over ``GEMM_AUTOTUNE_CONFIGS`` instead.

Under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors) every program runs as a sequence of
NumPy calls, so the interpreter configs use large tiles (few programs) but still small enough that odd
test shapes span several tiles, and they split K for small M so that the split path gets exercised.
"""

from __future__ import annotations

import os

import torch
import triton

__all__ = [
    "MAX_RANK",
    "AUTOTUNE",
    "interpreted",
    "device_reason",
    "rank_bucket",
    "rank_chunk",
    "dot_precision",
    "gemm_config",
    "shrink_config",
    "bwd_shrink_config",
    "grad_a_config",
    "GEMM_AUTOTUNE_CONFIGS",
]

# Ranks are bucketed to powers of two up to this; above it the [BLOCK, R] fp32 accumulators of the
# shrink kernels no longer fit in registers (256 x 64 fp32 already takes 64 registers a thread at 8 warps).
MAX_RANK = 256
# tl.dot needs every dimension >= 16.
MIN_RANK_BUCKET = 16
# The low-rank epilogues walk the rank in chunks of at most this many columns.
MAX_RANK_CHUNK = 64

AUTOTUNE = os.environ.get("FASTLORA_AUTOTUNE", "0") == "1"


def interpreted(kernel) -> bool:
    """Whether ``kernel`` was built for the Triton interpreter (TRITON_INTERPRET=1 when triton was imported)."""
    return type(kernel).__name__ == "InterpretedFunction"


def device_reason(tensors, kernel) -> str | None:
    """Why ``kernel`` cannot run on ``tensors`` (mixed devices; CPU tensors without the interpreter, or with
    it switched on too late), or None."""
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        return "tensors on different devices"
    if device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return f"non-CUDA tensor ({device.type}) without TRITON_INTERPRET=1"
        if not interpreted(kernel):
            return "TRITON_INTERPRET=1 was set after triton was imported (it must be set before)"
    return None


def rank_bucket(r: int) -> int:
    """The power-of-two rank the kernels are compiled for: 1..16 -> 16, 17..32 -> 32, ..., 129..256 -> 256."""
    return max(MIN_RANK_BUCKET, triton.next_power_of_2(r))


def rank_chunk(bucket: int) -> int:
    return min(bucket, MAX_RANK_CHUNK)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 inputs follow PyTorch's TF32 switch (off by default, like
    ``torch.matmul``); half-precision inputs ignore the setting."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest" \
            and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def gemm_config(M: int, N: int, K: int, dtype: torch.dtype, interpreter: bool) -> dict:
    """Tiles for ``C[M, N] = A[M, K] @ B[K, N]`` plus the low-rank epilogue."""
    if interpreter:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=1)
    wide = dtype == torch.float32  # fp32 tiles take twice the shared memory per stage
    if M <= 16:
        # Decode: the weight streams through once; narrow N tiles give enough programs to use the SMs.
        return dict(BLOCK_M=16, BLOCK_N=32 if N <= 8192 else 64, BLOCK_K=64 if wide else 128,
                    GROUP_M=1, num_warps=4, num_stages=4)
    if M <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64 if wide else 128, GROUP_M=4, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32 if wide else 64, GROUP_M=8, num_warps=8, num_stages=3)


GEMM_AUTOTUNE_CONFIGS = [
    triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 32, 4, 4),
        (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (16, 64, 128, 4, 4),
        (16, 32, 256, 4, 4), (32, 64, 128, 4, 4),
    ]
]


def shrink_config(M: int, K: int, R: int, device: torch.device, interpreter: bool) -> dict:
    """Tiles and K-split for ``S = dropout(x) A^T``: [M, K] x [K, R] -> [M, R].

    With few row blocks (decode, short prompts) one program per row block would leave most SMs idle
    while it walks all of K, so K is split and the partial sums land in an fp32 workspace that the
    fused GEMM sums when it loads S (no atomics: the sum order is fixed, the result deterministic).
    """
    if interpreter:
        block_m, block_k = min(64, max(16, triton.next_power_of_2(M))), 64
        n_k = triton.cdiv(K, block_k)
        split = min(4, n_k) if M <= 16 else 1
        return dict(BLOCK_M=block_m, BLOCK_K=block_k, SPLIT_K=max(split, 1), num_warps=4, num_stages=1)
    block_m = 16 if M <= 16 else 32 if M <= 1024 else 64
    block_k = 128 if R <= 64 else 64 if R <= 128 else 32
    n_m, n_k = triton.cdiv(M, block_m), triton.cdiv(K, block_k)
    split = 1
    if device.type == "cuda":
        sms = _sm_count(device)
        if n_m < sms:
            # Every GEMM program re-reads all SPLIT_K partial [BLOCK_M, R] tiles (from L2): fewer
            # splits for wide ranks.
            split = min(16 if R <= 64 else 8, n_k, triton.cdiv(2 * sms, n_m))
    return dict(BLOCK_M=block_m, BLOCK_K=block_k, SPLIT_K=max(split, 1),
                num_warps=8 if R >= 128 else 4, num_stages=3)


def bwd_shrink_config(M: int, N: int, R: int, interpreter: bool) -> dict:
    """Tiles for the backward's ``G = dY B`` (programs owning rows) and ``dB = dY^T S`` (owning columns).

    Programs = cdiv(M, OWN) + cdiv(N, OWN), each walking a whole strip of dY in WALK-wide steps: a
    narrow owned block for enough programs, a wide walked one for bytes in flight. The walked block
    shrinks with the rank so that the [WALK, R] fp32 adapter tile keeps 3 stages in 100 KiB.
    """
    if interpreter:
        return dict(BLOCK_OWN=32, BLOCK_WALK=64, num_warps=4, num_stages=1)
    walk = 128 if R <= 64 else 64 if R <= 128 else 32
    return dict(BLOCK_OWN=32, BLOCK_WALK=walk, num_warps=8 if R >= 128 else 4, num_stages=3)


def grad_a_config(M: int, K: int, R: int, interpreter: bool) -> dict:
    """Tiles for ``dA = G^T dropout(x)``: one program per K block walks all M rows."""
    if interpreter:
        return dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=1)
    block_k = 64 if triton.cdiv(K, 64) >= 128 else 32 if triton.cdiv(K, 32) >= 64 else 16
    if R >= 128:
        block_k = min(block_k, 32)
    block_m = 256 if R <= 32 else 128 if R <= 64 else 64  # the walked rows: bytes in flight
    return dict(BLOCK_M=block_m, BLOCK_K=block_k, num_warps=8 if R >= 128 else 4, num_stages=3)
