"""Pure-PyTorch LoRA math: the specification, the CPU path and the test oracle.

Conventions (PEFT's): ``lora_A: [r, in]``, ``lora_B: [out, r]``, inverted dropout on x, training only,

    y = x W^T + b + scaling * (dropout(x) A^T) B^T

Everything here runs in the input's dtype (matmuls accumulate in fp32 internally); adapter weights
kept in fp32 are cast down to the input dtype, never the input up: the input is the large tensor.

Dropout masks (``fill_keep``) are a function of ``(seed, shape, p)`` on every device, so a backward can
draw one again from its seed. Up to ``SMALL_MASK`` elements (a few rows at decode sizes) such a mask is
torch's ``bernoulli_`` on a CPU generator seeded with the seed: one call, where the cost of a call is
what counts (that mask follows torch's CPU generator, which on Intel CPUs runs through MKL: it is the
same on every run of a machine, not across CPU vendors). The LoRA op draws its small masks without a
seed (``small_keep``: what ``F.dropout`` draws, and it keeps them for its backward: see
``fastlora.ops.lora_linear``). Larger masks come from a stream: numpy's SFC64
generator, its state set from the seed, draws 64-bit words block by block of ``MASK_ROWS`` rows, in
order. Each element takes one 16-bit lane of a word and is kept when its lane is at or above a
threshold: p is rounded to a multiple of 2^-16 (at most 7.6e-6 off). SFC64 passes BigCrush and
PractRand; on CPU it draws a word about 3x faster than torch's mt19937, and a 2048 x 1024 mask about 12x
faster than ``bernoulli_`` (2-core EPYC). Kept values are scaled by exactly ``1 / (1 - p)``. On CPU the
mask is written into an x-sized temporary in x's dtype while one op needs it, which measures faster
than block-sized pieces with small matmuls; the Triton kernels draw it in registers instead.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

__all__ = [
    "MASK_ROWS",
    "SMALL_MASK",
    "dropout_mask",
    "fill_keep",
    "small_keep",
    "lora_linear_ref",
    "lora_linear_fwd_ref",
    "lora_linear_bwd_ref",
]

MASK_ROWS = 128
# bernoulli_ costs about 9 us per 1024 elements, SFC64 about 35 us at any small size (right after a
# 1024 x 1024 matmul, 2-core EPYC): they cross near 4096 elements.
SMALL_MASK = 4096
_LANES = 2**16
_streams = threading.local()


_SKIP = 12  # outputs SFC64 discards after seeding


def _stream(seed: int) -> np.random.SFC64:
    """This thread's SFC64 generator, seeded as SFC64's reference code seeds it from one 64-bit value:
    the three state words set to the seed, the counter to 1, the first 12 outputs skipped (by the caller's
    first draw). Resetting one generator costs a fifth of making a new one."""
    gen = getattr(_streams, "gen", None)
    if gen is None:
        gen = _streams.gen = np.random.SFC64(0)
    word = int(seed) & (2**64 - 1)
    gen.state = {"bit_generator": "SFC64", "state": {"state": np.array([word, word, word, 1], dtype=np.uint64)},
                 "has_uint32": 0, "uinteger": 0}
    return gen


# Output dtypes whose CPU tensors numpy writes: for a few thousand elements its compare costs a fifth of
# torch's (no dispatch), for a block of 128 rows about the same. bfloat16 has no numpy dtype.
_NUMPY_OUT = {torch.bool: np.bool_, torch.uint8: np.bool_, torch.float32: np.float32, torch.float16: np.float16,
              torch.float64: np.float64}


def fill_keep(out: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Write the keep-mask (1 = kept, 0 = dropped) for an ``[m, k]`` tensor into ``out`` (any dtype).

    Up to ``SMALL_MASK`` elements: torch's ``bernoulli_`` on a generator seeded with ``seed``. Above: drawn
    block by block of ``MASK_ROWS`` rows from one SFC64 stream, so the random words in flight are bounded
    by one block whatever ``m`` is.
    """
    if out.numel() <= SMALL_MASK:
        return _fill_keep_small(out, p, seed)
    m, k = out.shape
    gen = _stream(seed)
    skip = _SKIP
    threshold = int(round(p * _LANES)) - _LANES // 2  # the lanes are signed int16
    host = None
    if out.device.type == "cpu" and out.dtype in _NUMPY_OUT:
        host = out.detach().numpy().view(_NUMPY_OUT[out.dtype])  # uint8 written as bool: 0 or 1, faster
    for start in range(0, m, MASK_ROWS):
        stop = min(start + MASK_ROWS, m)
        n = (stop - start) * k
        lanes = gen.random_raw(skip + (n + 3) // 4)[skip:].view(np.int16)[:n].reshape(stop - start, k)
        skip = 0
        if host is not None:
            np.greater_equal(lanes, threshold, out=host[start:stop], casting="unsafe")
        else:
            torch.ge(torch.from_numpy(lanes).to(out.device), threshold, out=out[start:stop])
    return out


def _fill_keep_small(out: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    gen = getattr(_streams, "torch_gen", None)
    if gen is None:
        gen = _streams.torch_gen = torch.Generator()
    gen.manual_seed(seed)
    if out.device.type == "cpu":
        return out.bernoulli_(1.0 - p, generator=gen)
    return out.copy_(torch.empty(out.shape, dtype=torch.uint8).bernoulli_(1.0 - p, generator=gen))


def small_keep(x2: torch.Tensor, p: float) -> torch.Tensor:
    """The keep-mask for ``x2`` (at most ``SMALL_MASK`` elements) in x's dtype, drawn from torch's generator on
    x's device as ``F.dropout`` draws its noise (``bernoulli_`` on a tensor like x): after the same
    ``torch.manual_seed``, the same mask as PEFT's dropout of the same input. No seed: one call, where a call
    costs more than the mask; whoever draws it keeps it for the backward."""
    return torch.bernoulli(x2, 1.0 - p)


def dropout_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The whole keep-mask for ``shape`` (rows: every dim but the last), a function of ``(shape, p, seed)``."""
    shape = torch.Size(shape)
    k = shape[-1] if len(shape) else 1
    m = math.prod(shape[:-1])
    keep = torch.ones((m, k), dtype=torch.bool, device=device)
    if p > 0.0 and m * k > 0:
        fill_keep(keep, p, seed)
    return keep.view(shape)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, itself when it already is: a ``.to`` that changes nothing is still a dispatch
    (about 2 us on a 2-core CPU, as much as the whole LoRA update of one row)."""
    return t if t.dtype == dtype else t.to(dtype)


def _s_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _mask(x2: torch.Tensor, p: float, seed: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The keep-mask (1 = kept) in x's dtype: an x-sized temporary, read from ``keep`` (bytes) when given,
    else drawn from ``seed`` straight into it. Bytes convert with ``copy_``: the cheapest way on a CPU
    (2048 x 1024 fp32 on a 2-core EPYC: 98 us, against 665 us from bool; a mixed-dtype multiply would
    allocate a converted copy of the mask)."""
    out = torch.empty_like(x2, memory_format=torch.contiguous_format)
    return fill_keep(out, p, seed) if keep is None else out.copy_(keep)


# Narrow ranks in the backward: from this many rows, for ranks 2 to 8, the products of dY ([M, N]) with an
# [M, r] or [N, r] operand that give r columns run 2-5x slower on a CPU than the same products computed
# transposed, with r rows (as autograd's mm backward computes dB for PEFT): 2-core EPYC, fp32, dB at
# 2048 x 1024 -> 2816, r 8: 15.9 ms against 3.3 ms; G = dY B: 5.1 against 2.7 ms. Rank 1 and ranks from
# 12 are not affected; below 64 rows the transposed form and the copy back into B's layout cost more than
# they save. dB's transposed form also wins in bf16, fp16 and fp64; G's only in fp32 and fp64
# (``_BLAS_DTYPES``).
NARROW_RANKS = (2, 8)
NARROW_ROWS = 64
_BLAS_DTYPES = (torch.float32, torch.float64)


def _narrow(m: int, r: int) -> bool:
    return m >= NARROW_ROWS and NARROW_RANKS[0] <= r <= NARROW_RANKS[1]


# Some row counts in the forward: the base matmul x W^T computed as (W x^T)^T, then copied into a row-major
# y. BLAS sees the same product with its two free dimensions swapped, and MKL's kernel for a short second
# dimension is the slow one: 2-core Zen 3 EPYC, fp32, 16 rows, 1024 -> 2816: 1.38 ms against 0.94 with
# the copy (a Zen 5 EPYC: 0.76-0.87 of the usual form at 16-64 rows on the three shapes below). The swapped form runs the rows in MKL's register tile of 16: whole tiles (16, 32, ..., 192 rows)
# measured 0.65-0.88 of the usual form on 1024 -> 1024, 1024 -> 2816 and 2816 -> 1024, while other
# counts swing from 0.5 to 1.5 (31 rows: 1.23-1.49). From 256 rows the copy, a transpose, eats the gain.
# Row-major fp32 weights only: that is what was measured (a Conv1D weight's transposed view is the other
# BLAS case).
TRANSPOSED_ROWS = (16, 192)
TRANSPOSED_TILE = 16


def _transposed(x2: torch.Tensor, weight: torch.Tensor) -> bool:
    m = x2.shape[0]
    return (TRANSPOSED_ROWS[0] <= m <= TRANSPOSED_ROWS[1] and m % TRANSPOSED_TILE == 0
            and x2.dtype == torch.float32 and weight.dtype == torch.float32 and weight.stride(1) == 1
            and x2.device.type == "cpu")


def lora_linear_fwd_ref(
    x2: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K], possibly a transposed view of a [K, N] Conv1D weight
    bias: torch.Tensor | None,  # [N]
    lora_A: torch.Tensor,  # [r, K]
    lora_B: torch.Tensor,  # [N, r]
    scaling: float,
    dropout_p: float,
    seed: int,
    keep: torch.Tensor | None = None,  # [M, K] the mask already drawn (bytes, bool or x's dtype), else from seed
    keep_is_scratch: bool = False,  # the caller does not read keep again: x is dropped into its storage
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``y: [M, N]`` and ``S = (mask * x) A^T: [M, r]``, saved for backward in at least fp32 (the
    kernels accumulate S in fp32 and keep it so; the op promises one dtype whatever the backend).

    S leaves out dropout's ``1 / (1 - p)``, which rides in the alpha of the matmuls that read S (here and
    in ``lora_linear_bwd_ref``) instead of costing a multiply of its own (the kernels keep S scaled; a
    backward always runs on the backend its forward ran on).

    With dropout the mask is ``keep`` when given (a mask in x's dtype is multiplied in as it is), else drawn
    from ``seed`` into a temporary.
    """
    dtype = x2.dtype
    # The base matmul first, as PEFT does: on a CPU a decode-sized matmul runs up to 1.7x slower right
    # after other work (drawing the mask, say) than right after the caller's own matmuls.
    transposed = _transposed(x2, weight)
    if transposed:  # y^T: [N, K] @ [K, M] -> [N, M]
        y = torch.mm(weight, x2.t()) if bias is None else torch.addmm(_as(bias, dtype)[:, None], weight, x2.t())
    else:
        w_t = weight.t()
        y = torch.mm(x2, w_t) if bias is None else torch.addmm(_as(bias, dtype), x2, w_t)
    a_t = _as(lora_A, dtype).t()
    if dropout_p == 0.0:
        s = torch.mm(x2, a_t)  # [M, K] @ [K, r] -> [M, r]
    else:
        # The dropped copy of x lives only until S is computed (PEFT's stays alive for the backward).
        if keep is not None and keep.dtype == dtype:  # a mask in x's dtype is used as it is
            dropped = keep.mul_(x2) if keep_is_scratch else x2 * keep
        else:
            dropped = _mask(x2, dropout_p, seed, keep).mul_(x2)  # without 1 / (1 - p): see the docstring
        s = torch.mm(dropped, a_t)
        del dropped
    # One in-place update instead of PEFT's separate B-output, scale and add: fewer M x N temporaries.
    alpha = scaling / (1.0 - dropout_p)
    if transposed:
        y = y.addmm_(_as(lora_B, dtype), s.t(), alpha=alpha).t().contiguous()
    else:
        y.addmm_(s, _as(lora_B, dtype).t(), alpha=alpha)
    return y, _as(s, _s_dtype(dtype))


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
    keep: torch.Tensor | None = None,  # [M, K], the forward's mask, else drawn again from seed
) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(dx, dW, db, dA, dB)``, each None when not needed.

    With ``G = dY B`` ([M, r]) and S saved without ``1 / (1 - p)`` (``lora_linear_fwd_ref``), c =
    scaling / (1 - p):  dB = c dY^T S,  dA = c G^T (mask * x),  dx = dY W + c mask * (G A),
    dW = dY^T x,  db = sum_M dY. The scale c rides in the matmuls' alpha (``addmm`` with beta = 0, whose
    first operand is then only a shape and is never read): a multiply by a Python float is a dispatch of
    its own, 3.7 us on a 2-core EPYC at one row. The two products that read dY for the adapter come
    first, back to back, while dY is in cache.
    """
    dtype = x2.dtype
    dy = _as(dy, dtype)
    c = scaling / (1.0 - dropout_p)
    dx = dw = db = da = dbB = None
    b = _as(lora_B, dtype)
    narrow = _narrow(dy.shape[0], b.shape[1])
    if needs_da or needs_dx:
        # [M, N] @ [N, r] -> [M, r]; at a narrow rank as (B^T dY^T)^T, a transposed view (in 16-bit dtypes
        # the two forms cost the same or the transposed one more)
        g = torch.mm(b.t(), dy.t()).t() if narrow and dtype in _BLAS_DTYPES else torch.mm(dy, b)
    if needs_dbB:
        # S in x's dtype with the scale as the matmul's alpha; an fp32 S of a 16-bit x is scaled before rounding
        s_c, alpha = (s, c) if s.dtype == dtype else ((s * c).to(dtype), 1.0)
        if narrow:  # (S^T dY)^T: [r, M] @ [M, N] -> [r, N], then laid out as B
            dbB = torch.addmm(b.t(), s_c.t(), dy, beta=0, alpha=alpha).t().contiguous()
        else:
            dbB = torch.addmm(b, dy.t(), s_c, beta=0, alpha=alpha)  # [N, M] @ [M, r] -> [N, r]
        dbB = _as(dbB, lora_B.dtype)
    if needs_da or needs_dx:
        a = _as(lora_A, dtype)
        if dropout_p == 0.0:
            if needs_da:
                da = torch.addmm(a, g.t(), x2, beta=0, alpha=c)  # [r, M] @ [M, K] -> [r, K]
            if needs_dx:
                # [M, r] @ [r, K] + [M, N] @ [N, K], accumulated in place
                dx = torch.addmm(x2, g, a, beta=0, alpha=c).addmm_(dy, _as(weight, dtype))
        elif keep is not None and keep.dtype == dtype:
            # A mask saved in x's dtype (a small one, see fastlora.ops.lora_linear): one multiply per use,
            # and one x-sized buffer: mask * x for dA, then the masked update dx accumulates in.
            buf = None
            if needs_da:
                buf = torch.mul(x2, keep)
                da = torch.addmm(a, g.t(), buf, beta=0, alpha=c)  # c G^T (mask * x)
            if needs_dx:
                update = torch.addmm(x2 if buf is None else buf, g, a, beta=0, alpha=c, out=buf).mul_(keep)
                dx = update.addmm_(dy, _as(weight, dtype))  # c mask * (G A) + dY W
        else:
            # A byte mask converts once to x's dtype, which is faster than two mixed-dtype multiplies
            # (2048 x 1024: 217 us against 273 + 583).
            mask = _mask(x2, dropout_p, seed, keep)
            if needs_dx:
                update = torch.addmm(x2, g, a, beta=0, alpha=c).mul_(mask)  # [M, K], masked
            if needs_da:
                da = torch.addmm(a, g.t(), mask.mul_(x2), beta=0, alpha=c)  # c G^T (mask * x)
            del mask
            if needs_dx:
                # dx accumulates into the masked update in place (an addmm into another tensor would first
                # copy the update there).
                dx = update.addmm_(dy, _as(weight, dtype))
        if da is not None:
            da = _as(da, lora_A.dtype)
    if needs_dw:
        dw = _as(torch.mm(dy.t(), x2), weight.dtype)
    if needs_db:
        db = _as(dy.sum(0), dtype)
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
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable reference built from plain PyTorch ops (autograd does the backward): the oracle. Its
    dropout mask: ``keep`` (shaped like x, or ``[M, in]``) when given, else ``dropout_mask`` of ``seed``."""
    dtype = x.dtype
    xd = x
    if training and dropout_p > 0.0:
        if keep is None:
            keep = dropout_mask(x.reshape(-1, x.shape[-1]).shape, dropout_p, seed, x.device)
        xd = x * keep.reshape(x.shape).to(dtype) / (1.0 - dropout_p)
    base = torch.nn.functional.linear(x, weight, None if bias is None else bias.to(dtype))
    return base + scaling * ((xd @ lora_A.to(dtype).t()) @ lora_B.to(dtype).t())
