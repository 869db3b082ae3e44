"""NF4 (4-bit NormalFloat) quantization in bitsandbytes' exact format: the spec, the CPU path, the oracle.

Format (what ``bitsandbytes.functional.quantize_4bit(quant_type="nf4")`` writes):

- The weight ``[out, in]`` is flattened row-major and cut into blocks of ``blocksize`` values (32 ... 4096;
  64 by default). Blocks run over the flattened weight, so with ``in % blocksize != 0`` a block spans
  two rows; the last block may be short.
- Per block, ``absmax`` (fp32) = max |w|. Each value is scaled by ``1 / absmax`` (a multiply by the
  reciprocal; the short last block divides instead), clamped to [-1, 1] and rounded to the nearest of the
  16 NF4 levels (ties to the lower level), giving a 4-bit index.
- Two indices per byte, the first element in the high nibble; packed shape ``[(n + 1) // 2, 1]`` uint8
  (a checkpoint may hold the same bytes viewed as another dtype: ``quant_storage``).
- Double quantization (bitsandbytes' ``compress_statistics``): ``offset = mean(absmax)``; ``absmax -
  offset`` is quantized to 8 bits with the signed dynamic map in blocks of 256 (per-block fp32
  ``nested_absmax``, nearest level). Dequantized, ``absmax = dynamic[q] * nested_absmax + offset``.
- Dequantization: ``w = NF4[index] * absmax`` in fp32, then cast to the target dtype.

Rounding: this module rounds to the nearest level exactly, as bitsandbytes' CUDA and pure-PyTorch
backends do. bitsandbytes' CPU library rounds the 8-bit nested absmax through a 65,536-entry lookup
table, so for an absmax within about 3e-5 (relative) of a midpoint between two dynamic levels its byte
can differ from ours by one level; the 4-bit weight bytes themselves match exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

__all__ = [
    "NF4_CODE",
    "BLOCKSIZES",
    "NESTED_BLOCKSIZE",
    "dynamic_map",
    "NF4State",
    "quantize_nf4",
    "dequantize_nf4",
    "dequantize_absmax",
    "quantize_blockwise_8bit",
    "packed_numel",
]

# The 16 NF4 levels (QLoRA, appendix E): quantiles of N(0, 1) normalised to [-1, 1], with an exact 0.
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (Dettmers 2015): 256 sorted fp32 levels in [-1, 1].

    For exponents e = 0..6 it holds the 2^e midpoints of an even split of [0.1, 1], scaled by 10^(e-6),
    with both signs, then 0 and 1. Everything is computed in fp32 tensor arithmetic, which is what makes
    the levels bit-identical with bitsandbytes'.
    """
    levels: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (e - 6)
        levels += (scale * mids).tolist() + (-scale * mids).tolist()
    levels += [0.0, 1.0]
    return torch.tensor(sorted(levels), dtype=torch.float32)


_DYNAMIC = dynamic_map()


def _midpoints(code: torch.Tensor) -> torch.Tensor:
    """Decision boundaries of a sorted codebook; ``bucketize`` against them rounds to the nearest level."""
    return (code[:-1] + code[1:]) / 2


def packed_numel(n: int) -> int:
    """Bytes holding ``n`` 4-bit values."""
    return (n + 1) // 2


@dataclass
class NF4State:
    """Everything needed to dequantize a packed NF4 weight (bitsandbytes' ``QuantState``, nf4 only).

    ``absmax`` is fp32 per block, or uint8 per block when ``nested`` (double quantization), in which
    case ``nested_absmax`` (fp32 per 256 blocks), ``nested_code`` (the 256-level dynamic map) and
    ``offset`` recover it. ``dtype`` is the dtype the weight had before quantization (bitsandbytes'
    ``quant_state.dtype``); ``shape`` its ``[out, in]``.
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    code: torch.Tensor = NF4_CODE
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE
    offset: float = 0.0

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def to(self, device: torch.device | str) -> NF4State:
        """A copy with every tensor on ``device`` (dtypes never change)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self, absmax=move(self.absmax), code=move(self.code), nested_absmax=move(self.nested_absmax),
            nested_code=move(self.nested_code),
        )

    def tensors(self) -> list[torch.Tensor]:
        """The per-layer tensors (the NF4 codebook, a constant, is not one of them)."""
        return [t for t in (self.absmax, self.nested_absmax, self.nested_code) if t is not None]


def _block_scaled(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values / absmax clamped to [-1, 1], absmax)`` per block of a flat fp32 tensor.

    Full blocks multiply by the reciprocal, the short last block divides: bitsandbytes does exactly this,
    and the two differ in the last bit often enough to change a rounded index.
    """
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1)).clamp_(-1, 1).view(-1)
    if full < n:
        tail = flat[full:]
        tail_max = tail.abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, (tail / tail_max).clamp_(-1, 1)])
    return scaled, absmax


def quantize_blockwise_8bit(values: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-level 8-bit quantization with the dynamic map: ``(uint8 indices, fp32 absmax per block)``."""
    scaled, absmax = _block_scaled(values.reshape(-1).float(), blocksize)
    code = _DYNAMIC.to(values.device)
    q = torch.bucketize(scaled, _midpoints(code), out_int32=True).to(torch.uint8)
    return q.view(values.shape), absmax


def quantize_nf4(
    weight: torch.Tensor, blocksize: int = 64, double_quant: bool = False
) -> tuple[torch.Tensor, NF4State]:
    """Quantize a float weight to NF4: ``(packed uint8 [(n + 1) // 2, 1], state)``, bitsandbytes' bytes."""
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"NF4 quantizes fp32, fp16 or bf16 weights, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError("cannot quantize an empty weight")
    scaled, absmax = _block_scaled(weight.detach().reshape(-1).float(), blocksize)
    code = NF4_CODE.to(weight.device)
    if scaled.numel() % 2:  # the unused low nibble of the last byte holds the level of 0.0, as bitsandbytes'
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    index = torch.bucketize(scaled, _midpoints(code), out_int32=True).to(torch.uint8)
    packed = ((index[0::2] << 4) | index[1::2]).view(-1, 1)  # first element in the high nibble
    state = NF4State(absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize, code=code)
    if double_quant:
        offset = absmax.mean()
        q_absmax, nested_absmax = quantize_blockwise_8bit(absmax - offset)
        state = replace(
            state, absmax=q_absmax, nested_absmax=nested_absmax, nested_code=_DYNAMIC.to(weight.device),
            offset=float(offset),
        )
    return packed, state


def dequantize_absmax(state: NF4State) -> torch.Tensor:
    """The fp32 absmax per block (undoing double quantization: ``code[q] * nested_absmax + offset``)."""
    if not state.nested:
        return state.absmax
    q = state.absmax.reshape(-1).long()
    n = q.numel()
    values = state.nested_code[q]
    full = n - n % state.nested_blocksize
    out = torch.empty(n, dtype=torch.float32, device=q.device)
    out[:full] = (values[:full].view(-1, state.nested_blocksize) * state.nested_absmax[: full // state.nested_blocksize].view(-1, 1)).view(-1)
    if full < n:
        out[full:] = values[full:] * state.nested_absmax[-1]
    # Two roundings (multiply, then add the offset in fp32), as bitsandbytes does them: no fused multiply-add.
    return out + torch.tensor(state.offset, dtype=torch.float32)


# Bytes unpacked per step: the int32 index of a step is at most 16 MiB (a 4096 x 14336 weight takes 7
# steps). Smaller steps cost time on CPU: 1.9 ms -> 2.9 ms at 2^20 for a 2816 x 1024 weight (2 cores).
_CHUNK_BYTES = 1 << 22


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """``[256, 2]``: the (high-nibble, low-nibble) levels of every byte value."""
    return torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)


def dequantize_nf4(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Unpack to ``state.shape`` in ``dtype`` (default: the dtype the weight was quantized from).

    One row lookup per byte in a 256 x 2 table of level pairs, then the absmax scaling in place: on a
    2-core CPU 3-16x faster than unpacking nibbles into an int64 index, and nothing weight-sized beyond
    the fp32 weight itself (and its cast to ``dtype``).
    """
    data = packed.reshape(-1)
    if data.dtype != torch.uint8:
        data = data.view(torch.uint8)  # a checkpoint's bf16 (or other) storage view of the same bytes
    n = state.numel
    table = _pair_table(state.code)
    pairs = torch.empty((data.numel(), 2), dtype=torch.float32, device=data.device)
    for start in range(0, data.numel(), _CHUNK_BYTES):  # bounded int32 index temporaries
        stop = start + _CHUNK_BYTES
        torch.index_select(table, 0, data[start:stop].to(torch.int32), out=pairs[start:stop])
    values = pairs.view(-1)[:n]  # fp32 levels
    absmax = dequantize_absmax(state)
    full = n - n % state.blocksize
    values[:full].view(-1, state.blocksize).mul_(absmax[: full // state.blocksize].view(-1, 1))
    if full < n:
        values[full:].mul_(absmax[-1])
    return values.view(state.shape).to(dtype or state.dtype)
