"""``fastlora.ops.multi_lora``: the batch metadata, the reference (``fastlora.reference_multi``) against a
per-token float64 oracle, the registered op (opcheck, torch.compile) and backend dispatch.
"""

from __future__ import annotations

import pytest
import torch

from fastlora.ops import adapter_batch, multi_lora_add_
from fastlora.ops.multi_lora import ROWS_MAX_TOKENS, _multi_lora_op
from fastlora.reference_multi import multi_lora_add_ref, sgmv_expand_ref, sgmv_shrink_ref, token_groups


def _inputs(M=29, K=24, N=20, ranks=(4, 0, 8, 16, 3), dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    L, R = len(ranks), max(ranks)
    a = torch.zeros(L, R, K)
    b = torch.zeros(L, N, R)
    for s, r in enumerate(ranks):
        a[s, :r] = torch.randn(r, K, generator=gen)
        b[s, :, :r] = torch.randn(N, r, generator=gen)
    x = torch.randn(M, K, generator=gen).to(dtype)
    y = torch.randn(M, N, generator=gen).to(dtype)
    slots = torch.randint(-1, L, (M,), generator=gen, dtype=torch.int32)
    return y, x, a, b, torch.tensor(ranks, dtype=torch.int32), torch.rand(L, generator=gen) + 0.5, slots


def _oracle(y, x, a, b, ranks, scalings, slots):
    out = y.double().clone()
    for t, s in enumerate(slots.tolist()):
        r = int(ranks[s]) if s >= 0 else 0
        if r:
            out[t] += float(scalings[s]) * ((x[t].double() @ a[s, :r].double().t()) @ b[s, :, :r].double().t())
    return out


# ---- metadata ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block_m", [16, 32])
@pytest.mark.parametrize("M, L", [(37, 5), (100, 3), (7, 40), (50, 0), (0, 4)])
def test_segments_cover_every_adapter_token_once_and_no_base_token(M, L, block_m):
    gen = torch.Generator().manual_seed(M + L)
    slots = torch.randint(-1, max(L, 1), (M,), generator=gen) if L else torch.full((M,), -1)
    meta = adapter_batch(slots, L, block_m=block_m)
    assert meta.block_m == block_m and meta.sorted_tokens.dtype == meta.blocks.dtype == torch.int32
    assert meta.blocks.shape[1] == -(-M // block_m) + min(L, M)  # the host-side bound, no sync
    seen = []
    for slot, start, end in meta.blocks.t().tolist():
        if slot < 0:
            continue
        stop = min(start + block_m, end)
        assert start < stop, "an empty block"
        rows = meta.sorted_tokens[start:stop].tolist()
        assert all(slots[t] == slot for t in rows), "a block mixes adapters"
        seen += rows
    assert sorted(seen) == sorted(t for t in range(M) if slots[t] >= 0)


def test_rows_mode_for_decode_sizes_and_segments_above():
    assert adapter_batch(torch.zeros(ROWS_MAX_TOKENS, dtype=torch.int32), 2).block_m == 0
    assert adapter_batch(torch.zeros(ROWS_MAX_TOKENS + 1, dtype=torch.int32), 2).block_m == 16
    assert adapter_batch(torch.zeros(4096, dtype=torch.int32), 2).block_m == 64
    with pytest.raises(ValueError, match="power of two"):
        adapter_batch(torch.zeros(4, dtype=torch.int32), 2, block_m=24)


# ---- reference --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_reference_matches_the_formula(dtype, tol):
    y, x, a, b, ranks, scalings, slots = _inputs(dtype=dtype)
    out = multi_lora_add_ref(y.clone(), x, a, b, ranks, scalings, slots)
    torch.testing.assert_close(out.double(), _oracle(y, x, a, b, ranks, scalings, slots), rtol=tol, atol=tol)
    s = sgmv_shrink_ref(x, a, ranks, slots)  # S is kept in fp32, as the kernels keep it
    split = sgmv_expand_ref(y.clone(), s, b, ranks, scalings, slots)
    torch.testing.assert_close(split, out, rtol=1e-4, atol=1e-4)


def test_reference_leaves_base_tokens_and_empty_slots_bit_for_bit():
    y, x, a, b, ranks, scalings, slots = _inputs()
    out = multi_lora_add_ref(y.clone(), x, a, b, ranks, scalings, slots)
    untouched = (slots < 0) | (ranks[slots.clamp(min=0).long()] == 0)
    assert untouched.any() and torch.equal(out[untouched], y[untouched])
    assert [s for s, _ in token_groups(slots)] == sorted({s for s in slots.tolist() if s >= 0})


def test_reference_computes_in_the_input_dtype_from_an_fp32_bank():
    y, x, a, b, ranks, scalings, slots = _inputs(dtype=torch.float16)
    out = multi_lora_add_ref(y.clone(), x, a, b, ranks, scalings, slots)
    assert out.dtype == torch.float16
    gold = _oracle(y, x, a, b, ranks, scalings, slots)
    assert (out.double() - gold).abs().max() < 0.5  # fp16 rounding of values of size ~20


# ---- the op -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("M", [5, 29])
def test_op_adds_in_place_and_matches_the_reference(M, monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", "reference")
    y, x, a, b, ranks, scalings, slots = _inputs(M=M)
    meta = adapter_batch(slots, a.shape[0])
    out = y.clone().view(1, M, -1)
    ret = multi_lora_add_(out, x.view(1, M, -1), a, b, ranks, scalings, meta)
    assert ret is out
    torch.testing.assert_close(out[0], multi_lora_add_ref(y.clone(), x, a, b, ranks, scalings, slots))


def test_op_rejects_inputs_that_do_not_fit():
    y, x, a, b, ranks, scalings, slots = _inputs()
    meta = adapter_batch(slots, a.shape[0])
    with pytest.raises(ValueError, match="tokens"):
        multi_lora_add_(y[:3], x[:3], a, b, ranks, scalings, meta)
    with pytest.raises(ValueError, match="does not fit"):
        multi_lora_add_(y, x, a[:, :, :5], b, ranks, scalings, meta)


def test_opcheck():
    y, x, a, b, ranks, scalings, slots = _inputs()
    for block_m in (0, 16):
        meta = adapter_batch(slots, a.shape[0], block_m=block_m)
        args = (y.clone(), x, a, b, ranks, scalings, meta.token_slots, meta.sorted_tokens, meta.blocks, block_m)
        torch.library.opcheck(_multi_lora_op, args, test_utils=("test_schema", "test_faketensor"))


def test_compiles_without_graph_breaks(monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", "reference")
    y, x, a, b, ranks, scalings, slots = _inputs()
    meta = adapter_batch(slots, a.shape[0])

    def fn(y, x):
        y = y * 1.0
        return multi_lora_add_(y, x, a, b, ranks, scalings, meta)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(y, x), fn(y, x))


def test_auto_backend_runs_the_reference_on_cpu(monkeypatch):
    import fastlora.reference_multi as reference_multi

    calls = []
    real = reference_multi.multi_lora_add_ref
    monkeypatch.setattr(reference_multi, "multi_lora_add_ref", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("FASTLORA_BACKEND", "auto")
    y, x, a, b, ranks, scalings, slots = _inputs()
    multi_lora_add_(y, x, a, b, ranks, scalings, adapter_batch(slots, a.shape[0]))
    assert calls == [1]


@pytest.mark.interpreter
def test_triton_backend_falls_back_with_a_reason_for_bf16_in_the_interpreter(monkeypatch):
    from fastlora.ops import dispatch

    kernels = dispatch.load_kernels("multi_lora")
    if isinstance(kernels, str):
        pytest.skip(kernels)
    from fastlora.kernels import _config
    from fastlora.kernels.sgmv import _sgmv_expand_kernel

    if not _config.interpreted(_sgmv_expand_kernel):
        pytest.skip("needs the interpreter")
    monkeypatch.setenv("FASTLORA_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    dispatch.warn_once.cache_clear()
    y, x, a, b, ranks, scalings, slots = _inputs()
    meta = adapter_batch(slots, a.shape[0])
    with pytest.warns(RuntimeWarning, match="bfloat16 under the Triton interpreter"):
        out = multi_lora_add_(y.bfloat16(), x.bfloat16(), a, b, ranks, scalings, meta)
    expected = multi_lora_add_ref(y.bfloat16(), x.bfloat16(), a, b, ranks, scalings, slots)
    torch.testing.assert_close(out, expected)
