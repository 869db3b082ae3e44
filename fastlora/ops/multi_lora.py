"""``fastlora::multi_lora_add_``: a mixed batch's LoRA updates, each token with its own adapter, added into
the base output in place; and the batch metadata the kernels walk.

The adapters of one layer are stacked in a bank (``fastlora.layers.bank.AdapterBank``): ``lora_A [L, R,
in]``, ``lora_B [L, out, R]``, ``ranks [L]``, ``scalings [L]``. A batch is one slot per token (-1: base
only). ``adapter_batch`` turns that into the metadata the kernels need, once per forward, with device
ops only (no host synchronisation, so a decode step can be captured in a CUDA graph):

- rows mode (up to ``ROWS_MAX_TOKENS`` tokens, decode): the slots themselves, one program per token;
- segments mode: the tokens sorted by slot (``sorted_tokens``) and a block table ``blocks [3, NB]`` of
  (slot, start, end) per program, ``block_m`` tokens at most per block, all of one slot. NB is an upper
  bound known on the host, ``cdiv(M, block_m) + min(L, M)``; the blocks past the last are marked -1.

Inference only: the op has no autograd formula (``LoraLinear`` routes a forward that needs gradients
through plain differentiable ops instead). Registered through ``torch.library`` with a fake
implementation, so it traces under ``torch.compile`` (as a mutation of ``y``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastlora import reference_multi
from fastlora.ops.dispatch import serving_kernels

__all__ = ["ROWS_MAX_TOKENS", "AdapterBatch", "adapter_batch", "multi_lora_add_"]

# Up to this many tokens the kernels take one program per token row (decode); above it, segments.
ROWS_MAX_TOKENS = 16


@dataclass(frozen=True)
class AdapterBatch:
    """Batch metadata shared by every layer of one forward (see the module docstring)."""

    token_slots: torch.Tensor  # [M] int32, -1 = base only
    sorted_tokens: torch.Tensor  # [M] int32, tokens grouped by slot (base tokens last); empty in rows mode
    blocks: torch.Tensor  # [3, NB] int32: slot (-1: no work), start, end into sorted_tokens; empty in rows mode
    block_m: int  # tokens per block; 0 = rows mode

    @property
    def num_tokens(self) -> int:
        return self.token_slots.shape[0]


def segment_block_m(num_tokens: int) -> int:
    """Tokens per segment block: short batches waste less of a block on segments of a few tokens."""
    return 16 if num_tokens <= 128 else 32 if num_tokens <= 1024 else 64


def adapter_batch(token_slots: torch.Tensor, num_slots: int, block_m: int | None = None) -> AdapterBatch:
    """The metadata for ``token_slots`` (``[M]``, values in ``[-1, num_slots)``) over a bank of ``num_slots``.

    ``block_m``: None picks rows mode for up to ``ROWS_MAX_TOKENS`` tokens and segments above; 0 forces
    rows mode, a power of two >= 16 forces segments with that block size.
    """
    slots = token_slots.reshape(-1).to(torch.int32)
    M = slots.shape[0]
    device = slots.device
    if block_m is None:
        block_m = 0 if M <= ROWS_MAX_TOKENS else segment_block_m(M)
    empty = torch.empty(0, dtype=torch.int32, device=device)
    if block_m == 0:
        return AdapterBatch(slots, empty, empty.view(3, 0), 0)
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be 0 (rows) or a power of two >= 16, got {block_m}")
    # Base tokens take key num_slots: they sort last and fall outside every segment.
    key = torch.where(slots >= 0, slots, num_slots).long()
    sorted_tokens = torch.sort(key, stable=True).indices.to(torch.int32)
    counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, key, torch.ones_like(key))  # not bincount: that reads its max on the host
    counts = counts[:num_slots]
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    n_blocks = (counts + block_m - 1) // block_m
    block_ends = torch.cumsum(n_blocks, 0)
    capacity = (M + block_m - 1) // block_m + min(num_slots, M)
    b = torch.arange(capacity, device=device)
    seg = torch.searchsorted(block_ends, b, right=True)  # the slot of block b; num_slots past the last
    valid = seg < num_slots
    seg = seg.clamp(max=max(num_slots - 1, 0))
    if num_slots == 0:
        table = torch.stack([torch.full_like(b, -1), torch.zeros_like(b), torch.zeros_like(b)])
    else:
        start = starts[seg] + (b - (block_ends[seg] - n_blocks[seg])) * block_m
        table = torch.stack([torch.where(valid, seg, -1), start, ends[seg]])
    return AdapterBatch(slots, sorted_tokens, table.to(torch.int32), block_m)


# ---- the op -----------------------------------------------------------------------------------------------------

def _kernels_for(y, x, lora_A, lora_B, ranks, scalings, token_slots):
    return serving_kernels("multi_lora", x.device, y, x, lora_A, lora_B, ranks, scalings, token_slots)


def _multi_lora_add(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    token_slots: torch.Tensor,
    sorted_tokens: torch.Tensor,
    blocks: torch.Tensor,
    block_m: int,
) -> None:
    kernels = _kernels_for(y, x, lora_A, lora_B, ranks, scalings, token_slots)
    if kernels is None:
        reference_multi.multi_lora_add_ref(y, x, lora_A, lora_B, ranks, scalings, token_slots)
    else:
        kernels.multi_lora_add(y, x, lora_A, lora_B, ranks, scalings, token_slots, sorted_tokens, blocks, block_m)


_multi_lora_op = torch.library.custom_op("fastlora::multi_lora_add_", _multi_lora_add, mutates_args=("y",))


@_multi_lora_op.register_fake
def _(y, x, lora_A, lora_B, ranks, scalings, token_slots, sorted_tokens, blocks, block_m):
    return None


def multi_lora_add_(
    y: torch.Tensor,  # [..., out], the base output: updated in place
    x: torch.Tensor,  # [..., in], M tokens in all
    lora_A: torch.Tensor,  # [L, R, in]
    lora_B: torch.Tensor,  # [L, out, R]
    ranks: torch.Tensor,  # [L] int32, on x's device
    scalings: torch.Tensor,  # [L] float32, on x's device
    batch: AdapterBatch,
) -> torch.Tensor:
    """``y[t] += scalings[a_t] * (x[t] A[a_t, :r_t]^T) B[a_t, :, :r_t]^T`` for every token t whose slot
    ``a_t`` is not -1, each adapter at its own rank ``r_t = ranks[a_t]``; returns ``y``.

    The update is computed in x's dtype (the bank is cast per tile, never the input up) with fp32
    accumulation, and added in y's dtype. ``y`` must be contiguous in its last dimension's rows (an
    ``F.linear`` output is).
    """
    K, N = x.shape[-1], y.shape[-1]
    x2 = x.reshape(-1, K)
    y2 = y.view(-1, N)
    if x2.shape[0] != y2.shape[0] or x2.shape[0] != batch.num_tokens:
        raise ValueError(f"multi_lora_add_: x has {x2.shape[0]} tokens, y {y2.shape[0]}, the batch {batch.num_tokens}")
    if lora_A.dim() != 3 or lora_B.dim() != 3 or lora_A.shape[2] != K or lora_B.shape[1] != N \
            or lora_A.shape[:2] != (lora_B.shape[0], lora_B.shape[2]):
        raise ValueError(f"multi_lora_add_: bank lora_A {tuple(lora_A.shape)} / lora_B {tuple(lora_B.shape)} "
                         f"does not fit x [..., {K}] -> y [..., {N}]")
    args = (y2, x2, lora_A, lora_B, ranks, scalings, batch.token_slots, batch.sorted_tokens, batch.blocks,
            batch.block_m)
    if torch.compiler.is_compiling():
        _multi_lora_op(*args)
    else:  # eager: skip the dispatcher's cost, as fastlora.ops.lora_linear does
        _multi_lora_add(*args)
    return y
