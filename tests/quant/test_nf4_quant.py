"""NF4 quantization against the bitsandbytes package (CPU): codebooks, packed bytes, absmax, double
quantization, dequantization and the state-dict format."""

from __future__ import annotations

import pytest
import torch

from fastlora.quant import NF4_CODE, NF4State, dequantize_nf4, dynamic_map, quantize_nf4
from fastlora.quant.nf4 import _midpoints

bnb_f = pytest.importorskip("bitsandbytes.functional")

# (out, in): square, in not a multiple of any blocksize, an odd element count (last byte half used),
# fewer elements than one block, and more than 256 blocks (two nested blocks, the last one short).
SHAPES = [(64, 64), (33, 65), (7, 3), (5, 6), (96, 200)]
BLOCKSIZES = [32, 64, 128]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# bitsandbytes' CPU library rounds 8-bit values through a 65,536-entry table over [-1, 1]: near a
# midpoint between two levels its choice can differ from the exact nearest level by one.
LUT_STEP = 2.0 / 65535


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.05
    w[0, 0] = 0.3  # an outlier, as real weights have
    return w.to(dtype)


def _ids(values):
    return [str(v).replace("torch.", "") if not isinstance(v, tuple) else "x".join(map(str, v)) for v in values]


def test_codebooks_are_bitsandbytes():
    assert torch.equal(NF4_CODE, bnb_f.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map(), bnb_f.create_dynamic_map())


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
def test_quantize_matches_bitsandbytes(shape, blocksize, dtype):
    w = _weight(shape, dtype)
    packed, state = quantize_nf4(w, blocksize=blocksize)
    theirs, their_state = bnb_f.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    assert packed.dtype == torch.uint8 and packed.shape == theirs.shape
    assert torch.equal(packed, theirs)
    assert torch.equal(state.absmax, their_state.absmax)
    assert state.shape == their_state.shape and state.dtype == their_state.dtype


@pytest.mark.parametrize("blocksize", [32, 64])
@pytest.mark.parametrize("shape", [(96, 200), (130, 129), (64, 64)], ids=_ids([(96, 200), (130, 129), (64, 64)]))
def test_double_quant_matches_bitsandbytes(shape, blocksize):
    w = _weight(shape, torch.bfloat16, seed=1)
    packed, state = quantize_nf4(w, blocksize=blocksize, double_quant=True)
    theirs, ts = bnb_f.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed, theirs)
    assert state.nested and ts.nested
    assert state.offset == ts.offset.item()
    assert torch.equal(state.nested_absmax, ts.state2.absmax)
    assert torch.equal(state.nested_code, ts.state2.code)
    ours_q, their_q = state.absmax.long(), ts.absmax.long()
    differ = ours_q != their_q
    if differ.any():
        # Only where the normalised value sits within bitsandbytes' table step of a decision boundary.
        absmax_fp32 = _raw_absmax(w, blocksize) - state.offset
        blocks = absmax_fp32.split(256)
        scaled = torch.cat([b / b.abs().max() for b in blocks])
        bounds = _midpoints(dynamic_map())
        near = (scaled[differ, None] - bounds[None, :]).abs().min(dim=1).values <= LUT_STEP
        assert near.all(), "nested absmax differs from bitsandbytes away from a rounding boundary"
        assert ((ours_q - their_q)[differ].abs() == 1).all()
        assert differ.float().mean() < 0.01


def _raw_absmax(w, blocksize):
    flat = w.reshape(-1).float()
    return torch.stack([c.abs().max() for c in flat.split(blocksize)])


def _bnb_dequantize(packed, ts):
    """bitsandbytes' dequantization. Its CPU library, on this AMD EPYC with bitsandbytes 0.50.2, is off
    for blocksizes >= 128 (3-4x the quantization error; bitsandbytes itself falls back for >= 2048
    on AVX-512), so for those the reference is its own pure-PyTorch backend, the code its CPU backend
    falls back to (called unwrapped: bitsandbytes wraps it in torch.compile)."""
    if ts.blocksize <= 64:
        return bnb_f.dequantize_4bit(packed, ts)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = ts.absmax
    if ts.nested:
        absmax = bnb_f.dequantize_blockwise(ts.absmax, ts.state2) + ts.offset
    code = bnb_f.get_4bit_type("nf4", device="cpu")
    return _dequantize_4bit_compute.__wrapped__(packed.reshape(-1), absmax, code, ts.blocksize, ts.shape, ts.dtype)


@pytest.mark.parametrize("double_quant", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
def test_dequantize_matches_bitsandbytes(shape, blocksize, double_quant):
    """Dequantizing bitsandbytes' own bytes and state gives bitsandbytes' values exactly."""
    w = _weight(shape, torch.float16, seed=2)
    theirs, ts = bnb_f.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    expected = _bnb_dequantize(theirs, ts)
    state = NF4State(
        absmax=ts.absmax, shape=ts.shape, dtype=ts.dtype, blocksize=ts.blocksize,
        nested_absmax=ts.state2.absmax if double_quant else None,
        nested_code=ts.state2.code if double_quant else None,
        offset=ts.offset.item() if double_quant else 0.0,
    )
    ours = dequantize_nf4(theirs, state)
    assert ours.dtype == expected.dtype == torch.float16
    assert torch.equal(ours, expected)


def test_roundtrip_error_is_nf4_sized():
    w = _weight((128, 256), torch.float32, seed=3)
    packed, state = quantize_nf4(w)
    err = (dequantize_nf4(packed, state) - w).abs()
    absmax = _raw_absmax(w, 64).repeat_interleave(64).view_as(w)
    # Half the widest gap between NF4 levels (0.304 between -1 and -0.696) per unit of absmax.
    assert (err <= 0.16 * absmax).all()
    assert err.mean() < 0.05 * w.abs().mean() + 0.01


def test_bad_blocksize_and_dtype():
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.randn(4, 64), blocksize=48)
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        quantize_nf4(torch.randint(0, 3, (4, 64)))
