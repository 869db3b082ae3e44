"""Pure-PyTorch multi-adapter LoRA over a mixed batch: the specification, the CPU path and the test oracle.

A layer's adapters are stacked in a bank, ``lora_A: [L, R, in]``, ``lora_B: [L, out, R]``, with a rank
and a scaling per slot (slot s holds its adapter in ``A[s, :ranks[s]]`` and ``B[s, :, :ranks[s]]``; rank
0 is an empty slot). Every token t carries a slot ``a_t`` (-1: the base model alone), and

    y[t] = base(x)[t] + scalings[a_t] * (x[t] A[a_t, :r_t]^T) B[a_t, :, :r_t]^T

As ``fastlora.reference.lora_linear_fwd_ref`` does, the math runs in the input's dtype (the bank is cast
down to it, never the input up), each adapter at its own rank, over the tokens that use it only.
Tokens are grouped with one sort; the group sizes are read on the host, which is free on CPU (the
Triton kernels take a segment table built on the device instead, see ``fastlora.ops.multi_lora``).
"""

from __future__ import annotations

import torch

__all__ = ["token_groups", "sgmv_shrink_ref", "sgmv_expand_ref", "multi_lora_add_ref"]


def token_groups(token_slots: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """``[(slot, token rows)]`` for every slot >= 0 that some token uses, in slot order."""
    slots = token_slots.reshape(-1).long()
    order = torch.sort(slots, stable=True).indices
    present, counts = torch.unique_consecutive(slots[order], return_counts=True)
    groups, start = [], 0
    for slot, count in zip(present.tolist(), counts.tolist()):
        if slot >= 0:
            groups.append((slot, order[start:start + count]))
        start += count
    return groups


def sgmv_shrink_ref(x2: torch.Tensor, lora_A: torch.Tensor, ranks: torch.Tensor,
                    token_slots: torch.Tensor) -> torch.Tensor:
    """``S [M, R]`` in fp32: ``S[t, :r_t] = x[t] A[a_t, :r_t]^T``, zero elsewhere (base tokens, past the rank)."""
    M, R = x2.shape[0], lora_A.shape[1]
    s = torch.zeros((M, R), dtype=torch.float32, device=x2.device)
    ranks_host = ranks.tolist()
    for slot, rows in token_groups(token_slots):
        r = ranks_host[slot]
        if r:
            s[rows, :r] = (x2.index_select(0, rows) @ lora_A[slot, :r].to(x2.dtype).t()).float()
    return s


def sgmv_expand_ref(y2: torch.Tensor, s: torch.Tensor, lora_B: torch.Tensor, ranks: torch.Tensor,
                    scalings: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """``y[t] += scalings[a_t] * S[t, :r_t] B[a_t, :, :r_t]^T`` in place, in y's dtype; returns ``y``."""
    ranks_host, scalings_host = ranks.tolist(), scalings.tolist()
    for slot, rows in token_groups(token_slots):
        r = ranks_host[slot]
        if r:
            low = s.index_select(0, rows)[:, :r].to(y2.dtype)
            y2.index_add_(0, rows, low @ lora_B[slot, :, :r].to(y2.dtype).t(), alpha=scalings_host[slot])
    return y2


def multi_lora_add_ref(
    y2: torch.Tensor,  # [M, N], the base output, updated in place
    x2: torch.Tensor,  # [M, K]
    lora_A: torch.Tensor,  # [L, R, K]
    lora_B: torch.Tensor,  # [L, N, R]
    ranks: torch.Tensor,  # [L] int
    scalings: torch.Tensor,  # [L] float
    token_slots: torch.Tensor,  # [M] int, -1 = base
) -> torch.Tensor:
    """``y[t] += scalings[a_t] * (x[t] A[a_t, :r_t]^T) B[a_t, :, :r_t]^T``; returns ``y``."""
    dtype = x2.dtype
    ranks_host, scalings_host = ranks.tolist(), scalings.tolist()
    for slot, rows in token_groups(token_slots):
        r = ranks_host[slot]
        if not r:
            continue
        s = x2.index_select(0, rows) @ lora_A[slot, :r].to(dtype).t()  # [m, K] @ [K, r] -> [m, r]
        update = s @ lora_B[slot, :, :r].to(dtype).t()  # [m, r] @ [r, N] -> [m, N]
        y2.index_add_(0, rows, update.to(y2.dtype), alpha=scalings_host[slot])
    return y2
