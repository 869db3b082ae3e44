"""``fastlora.kernels.sgmv``: the multi-adapter shrink / expand against a float64 per-token oracle.

Runs on CPU tensors under the Triton interpreter (marker ``interpreter``), or compiled on CUDA. fp32 and
fp16 only here (bf16 ``tl.dot`` is broken in the interpreter; the GPU file covers bf16). Both layouts of
a batch are exercised: rows (decode, one program per token) and segments (tokens sorted by adapter,
blocks of 16 or 32). Tolerance: STYLE.md's rule, at most twice PyTorch's own error in the same dtype
(the reference, ``fastlora.reference_multi``) against the fp64 oracle, plus a small atol.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.interpreter

triton = pytest.importorskip("triton")
kernels = pytest.importorskip("fastlora.kernels")

from fastlora.kernels import _config  # noqa: E402
from fastlora.kernels.sgmv import _sgmv_expand_kernel  # noqa: E402
from fastlora.ops.multi_lora import adapter_batch  # noqa: E402
from fastlora.reference_multi import multi_lora_add_ref  # noqa: E402

RUNNABLE = _config.interpreted(_sgmv_expand_kernel) or torch.cuda.is_available()
runnable = pytest.mark.skipif(not RUNNABLE, reason="no GPU, and triton was imported without TRITON_INTERPRET=1")

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
LAYOUTS = [pytest.param(0, id="rows"), pytest.param(16, id="seg16"), pytest.param(32, id="seg32")]
# Ranks per slot: an empty slot (0), rank 1, odd ranks, a full 64 and 100 (two shrink chunks, R = 100).
RANKS = [4, 0, 12, 64, 1, 100, 8]


def _popularity(pattern: str, M: int, L: int, gen: torch.Generator) -> torch.Tensor:
    if pattern == "identical":
        return torch.full((M,), 3)
    if pattern == "distinct":
        return torch.arange(M) % L
    if pattern == "uniform":
        return torch.randint(-1, L, (M,), generator=gen)
    if pattern == "skewed":  # most tokens on one adapter, a few on others, some base
        slots = torch.full((M,), 5)
        pick = torch.rand(M, generator=gen)
        slots[pick < 0.2] = torch.randint(0, L, ((pick < 0.2).sum().item(),), generator=gen)
        slots[pick > 0.9] = -1
        return slots
    if pattern == "base":
        return torch.full((M,), -1)
    raise ValueError(pattern)


def _bank(M, K, N, ranks, dtype, device, pattern="uniform", seed=0, junk=float("nan")):
    """A bank whose entries past each slot's rank hold ``junk``: the kernels must never read them."""
    gen = torch.Generator().manual_seed(seed)
    L, R = len(ranks), max(ranks)
    a = torch.full((L, R, K), junk)
    b = torch.full((L, N, R), junk)
    for s, r in enumerate(ranks):
        a[s, :r] = torch.randn(r, K, generator=gen) / K**0.5
        b[s, :, :r] = torch.randn(N, r, generator=gen) / max(r, 1) ** 0.5
    x = torch.randn(M, K, generator=gen)
    y = torch.randn(M, N, generator=gen)
    slots = _popularity(pattern, M, L, gen)
    scalings = torch.rand(L, generator=gen) * 2 + 0.1
    to = dict(device=device)
    return (y.to(dtype=dtype, **to), x.to(dtype=dtype, **to), a.to(**to), b.to(**to),
            torch.tensor(ranks, dtype=torch.int32, **to), scalings.to(**to), slots.to(dtype=torch.int32, **to))


def _oracle(y, x, a, b, ranks, scalings, slots):
    """Float64, one token at a time: the formula itself."""
    out = y.double().clone()
    for t, s in enumerate(slots.tolist()):
        r = int(ranks[s]) if s >= 0 else 0
        if r:
            low = x[t].double() @ a[s, :r].double().t()
            out[t] += float(scalings[s]) * (low @ b[s, :, :r].double().t())
    return out


def _run(y, x, a, b, ranks, scalings, slots, block_m):
    meta = adapter_batch(slots, a.shape[0], block_m=block_m)
    out = y.clone()
    kernels.multi_lora_add(out, x, a, b, ranks, scalings, meta.token_slots, meta.sorted_tokens, meta.blocks,
                           meta.block_m)
    return out


def _clean(a, b, ranks):
    """The bank with zeros past each rank: what the reference (which slices to the rank anyway) is fed."""
    a, b = a.clone(), b.clone()
    for s, r in enumerate(ranks.tolist()):
        a[s, r:] = 0
        b[s, :, r:] = 0
    return a, b


def test_kernels_can_run_here():
    assert RUNNABLE, "no GPU, and triton was imported without TRITON_INTERPRET=1 (see tests/kernels/conftest.py)"


@runnable
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [pytest.param((37, 72, 40), id="M37-K72-N40"),
                                   pytest.param((5, 130, 24), id="M5-K130-N24")])
def test_multi_lora_add_matches_oracle(shape, dtype, layout, kernel_device, dtype_atol, assert_close_rule):
    M, K, N = shape
    inputs = _bank(M, K, N, RANKS, dtype, kernel_device)
    y, x, a, b, ranks, scalings, slots = inputs
    out = _run(*inputs, block_m=layout)
    assert out.dtype == dtype and torch.isfinite(out).all(), "read past a slot's rank (the junk is NaN)"
    gold = _oracle(*inputs)
    base = multi_lora_add_ref(y.clone(), x, *_clean(a, b, ranks), ranks, scalings, slots)
    assert_close_rule(out, gold, base, dtype_atol[dtype], "y")
    untouched = slots < 0
    assert torch.equal(out[untouched], y[untouched]), "base-only tokens must come back bit for bit"


@runnable
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pattern", ["identical", "distinct", "uniform", "skewed", "base"])
def test_popularity_patterns(pattern, layout, kernel_device, assert_close_rule, dtype_atol):
    inputs = _bank(33, 48, 40, RANKS, torch.float32, kernel_device, pattern=pattern, seed=1)
    y, x, a, b, ranks, scalings, slots = inputs
    out = _run(*inputs, block_m=layout)
    base = multi_lora_add_ref(y.clone(), x, *_clean(a, b, ranks), ranks, scalings, slots)
    assert_close_rule(out, _oracle(*inputs), base, dtype_atol[torch.float32], pattern)


@runnable
@pytest.mark.parametrize("layout", LAYOUTS)
def test_shrink_writes_each_token_at_its_own_rank(layout, kernel_device):
    y, x, a, b, ranks, scalings, slots = _bank(21, 72, 16, RANKS, torch.float32, kernel_device, seed=2)
    meta = adapter_batch(slots, a.shape[0], block_m=layout)
    s = kernels.sgmv_shrink(x, a, ranks, meta.token_slots, meta.sorted_tokens, meta.blocks, meta.block_m)
    assert s.shape == (21, max(RANKS)) and s.dtype == torch.float32
    for t, slot in enumerate(slots.tolist()):
        r = RANKS[slot] if slot >= 0 else 0
        if r:
            torch.testing.assert_close(s[t, :r].double(), x[t].double() @ a[slot, :r].double().t(),
                                       rtol=1e-5, atol=1e-5)


@runnable
def test_empty_batch_and_empty_bank(kernel_device):
    y, x, a, b, ranks, scalings, slots = _bank(0, 32, 16, [4, 8], torch.float32, kernel_device)
    assert _run(y, x, a, b, ranks, scalings, slots, 16).shape == (0, 16)
    y, x, a, b, ranks, scalings, slots = _bank(6, 32, 16, [0, 0], torch.float32, kernel_device, pattern="distinct")
    torch.testing.assert_close(_run(y, x, a, b, ranks, scalings, slots, 0), y, rtol=0, atol=0)


@runnable
def test_launchers_reject_shapes_that_do_not_fit(kernel_device):
    y, x, a, b, ranks, scalings, slots = _bank(6, 32, 16, [4, 8], torch.float32, kernel_device)
    meta = adapter_batch(slots, 2, block_m=16)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.multi_lora_add(y[:, :8], x, a, b, ranks, scalings, meta.token_slots, meta.sorted_tokens,
                               meta.blocks, 16)
    with pytest.raises(ValueError, match="token_slots"):
        kernels.multi_lora_add(y, x, a, b, ranks, scalings, meta.token_slots[:3], meta.sorted_tokens,
                               meta.blocks, 16)
    with pytest.raises(ValueError, match="block_m 24"):
        kernels.multi_lora_add(y, x, a, b, ranks, scalings, meta.token_slots, meta.sorted_tokens, meta.blocks, 24)


def test_unsupported_reasons(kernel_device):
    y, x, a, b, ranks, scalings, slots = _bank(4, 16, 16, [4], torch.float32, kernel_device)
    reason = kernels.multi_lora_unsupported_reason
    assert reason(y, x, a, b, ranks, scalings, slots) is None or not RUNNABLE
    assert reason(y, x, a, b, ranks, scalings.double(), slots) == "scalings are not float32"
    assert reason(y, x.int(), a, b, ranks, scalings, slots) == "x dtype int32"
    if _config.interpreted(_sgmv_expand_kernel):
        assert reason(y.bfloat16(), x.bfloat16(), a, b, ranks, scalings, slots) == "bfloat16 under the Triton interpreter"
