"""Adapter banks and mixed batches: one layer serving many adapters in one pass.

- ``AdapterBank``: the adapters of one layer stacked for the multi-adapter kernels, ``lora_A [L, R, in]``,
  ``lora_B [L, out, R]``, a rank and a scaling per slot (``R`` is the widest rank held; slot s uses its
  first ``ranks[s]`` rows / columns, so adapters of different ranks, alphas and rsLoRA sit side by
  side). Adapters are added, replaced and removed by name or slot; nothing is re-injected.
- ``MixedBatch``: which adapter slot each sequence (PEFT's ``adapter_names``) or each token (a serving
  backend) uses, turned into ``fastlora.ops.AdapterBatch`` metadata once per input shape and shared by
  every layer of the forward (the first layer that sees a shape builds it, the others reuse it).
- ``sync_bank`` / ``mixed_batch_forward``: what ``LoraLinear`` does with them. The layer's PEFT-layout
  parameters (``lora_A[name]``, ``lora_B[name]``) stay the weights of record and what is saved; the
  bank is a copy in the base layer's compute dtype, refreshed when a parameter changes (its version
  counter or storage moves) or an adapter comes or goes.

The base layer is only ever called (``base_layer(x)``), never looked into: the bank's update is added to
whatever it returns, so a 4-bit ``LinearNF4`` base works as a dense one does.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn

from fastlora.ops import AdapterBatch, adapter_batch, multi_lora_add_

__all__ = ["BASE_ADAPTER", "AdapterBank", "MixedBatch", "sync_bank", "mixed_batch_forward", "bank_dtype"]

# PEFT's name for "no adapter, the base model" in ``adapter_names``.
BASE_ADAPTER = "__base__"


class AdapterBank:
    """The adapters of one layer, stacked: see the module docstring. Slots beyond ``num_slots`` do not exist;
    a slot of rank 0 is empty (its tokens get the base output alone).

    A plain object rather than an ``nn.Module``: it is a cache of the layer's parameters, not part of the
    model's state (``state_dict``, ``named_modules`` and ``.to()`` stay PEFT's); ``sync_bank`` rebuilds it
    when the layer moves to another device or dtype.
    """

    def __init__(self, in_features: int, out_features: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, num_slots: int = 0, max_rank: int = 0):
        self.in_features, self.out_features = in_features, out_features
        self.device, self.dtype = torch.device(device or "cpu"), dtype
        self.lora_A = torch.zeros((num_slots, max_rank, in_features), device=self.device, dtype=dtype)
        self.lora_B = torch.zeros((num_slots, out_features, max_rank), device=self.device, dtype=dtype)
        self.ranks = torch.zeros(num_slots, dtype=torch.int32, device=self.device)
        self.scalings = torch.zeros(num_slots, dtype=torch.float32, device=self.device)
        self.names: dict[str, int] = {}  # adapter name -> slot
        self._ranks: list[int] = [0] * num_slots  # host copy: growing and keys never read the device
        self._sources: dict[int, tuple] = {}  # slot -> what it was copied from (sync_bank)

    # ---- sizes ----------------------------------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return self.lora_A.shape[0]

    @property
    def max_rank(self) -> int:
        return self.lora_A.shape[1]

    def rank(self, slot: int) -> int:
        return self._ranks[slot] if 0 <= slot < self.num_slots else 0

    def reserve(self, num_slots: int, max_rank: int | None = None) -> None:
        """Grow to at least ``num_slots`` slots and ``max_rank`` columns, keeping what is held."""
        max_rank = self.max_rank if max_rank is None else max_rank
        L, R = max(num_slots, self.num_slots), max(max_rank, self.max_rank)
        if (L, R) == (self.num_slots, self.max_rank):
            return
        a = self.lora_A.new_zeros((L, R, self.in_features))
        b = self.lora_B.new_zeros((L, self.out_features, R))
        a[: self.num_slots, : self.max_rank] = self.lora_A
        b[: self.num_slots, :, : self.max_rank] = self.lora_B
        ranks = self.ranks.new_zeros(L)
        scalings = self.scalings.new_zeros(L)
        ranks[: self.num_slots] = self.ranks
        scalings[: self.num_slots] = self.scalings
        self._ranks += [0] * (L - len(self._ranks))
        self.lora_A, self.lora_B, self.ranks, self.scalings = a, b, ranks, scalings

    # ---- by slot ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def set_slot(self, slot: int, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> None:
        """Put an adapter (``lora_A [r, in]``, ``lora_B [out, r]``, PEFT's layout) into ``slot``."""
        r = lora_A.shape[0]
        if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[1] != self.in_features \
                or tuple(lora_B.shape) != (self.out_features, r):
            raise ValueError(f"adapter bank [{self.out_features}, {self.in_features}]: lora_A {tuple(lora_A.shape)} "
                             f"and lora_B {tuple(lora_B.shape)} do not fit")
        if slot < 0:
            raise ValueError(f"slot must be >= 0, got {slot}")
        if not math.isfinite(scaling):
            raise ValueError(f"scaling must be finite, got {scaling}")
        self.reserve(slot + 1, r)
        self.lora_A[slot, :r] = lora_A
        self.lora_A[slot, r:] = 0
        self.lora_B[slot, :, :r] = lora_B
        self.lora_B[slot, :, r:] = 0
        self.ranks[slot] = r
        self.scalings[slot] = scaling
        self._ranks[slot] = r
        self._sources.pop(slot, None)

    def clear_slot(self, slot: int) -> None:
        """Empty ``slot``: its tokens get the base output alone."""
        if 0 <= slot < self.num_slots and self._ranks[slot]:
            self.ranks[slot] = 0
            self.scalings[slot] = 0.0
            self._ranks[slot] = 0
        self._sources.pop(slot, None)
        for name in [n for n, s in self.names.items() if s == slot]:
            del self.names[name]

    # ---- by name ----------------------------------------------------------------------------------------------
    def add(self, name: str, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
            slot: int | None = None) -> int:
        """Add adapter ``name`` in ``slot`` (the first free one by default); returns the slot."""
        if name in self.names:
            raise ValueError(f"adapter {name!r} is already in the bank (slot {self.names[name]}); use replace")
        taken = set(self.names.values())
        if slot is None:
            slot = next(s for s in range(self.num_slots + 1) if s not in taken)
        elif slot in taken:
            raise ValueError(f"slot {slot} holds adapter {self.slot_name(slot)!r}")
        self.set_slot(slot, lora_A, lora_B, scaling)
        self.names[name] = slot
        return slot

    def replace(self, name: str, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> int:
        """New weights (any rank) for adapter ``name``, in its slot; returns the slot."""
        slot = self.slot(name)
        self.set_slot(slot, lora_A, lora_B, scaling)
        return slot

    def remove(self, name: str) -> None:
        self.clear_slot(self.slot(name))

    def slot(self, name: str) -> int:
        try:
            return self.names[name]
        except KeyError:
            raise KeyError(f"adapter {name!r} is not in the bank; it holds {sorted(self.names)}") from None

    def slot_name(self, slot: int) -> str | None:
        return next((n for n, s in self.names.items() if s == slot), None)

    # ---- compute ----------------------------------------------------------------------------------------------
    def apply_(self, y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
        """Add every token's adapter update into ``y`` (the base output for ``x``), in place; returns ``y``."""
        if self.num_slots == 0:
            return y
        return multi_lora_add_(y, x, self.lora_A, self.lora_B, self.ranks, self.scalings, batch)

    def __repr__(self) -> str:
        held = ", ".join(f"{s}: r={r}" for s, r in enumerate(self._ranks) if r)
        return (f"AdapterBank(in={self.in_features}, out={self.out_features}, slots={self.num_slots}, "
                f"max_rank={self.max_rank}, {self.dtype}, {held or 'empty'})")


class MixedBatch:
    """Which adapter slot each sequence or each token of a batch uses (-1: the base model alone).

    Give ``seq_slots`` (``[B]``, one per sequence, PEFT's ``adapter_names``; ``beam_slots`` is the same
    repeated per beam, for the decoder of a beam search) or ``token_slots`` (``[M]``, one per token, a
    serving backend's flattened batch). ``names[slot]`` is the adapter in each slot (for the error
    messages and the differentiable path).
    """

    def __init__(self, num_slots: int, names: dict[int, str], *, seq_slots: torch.Tensor | None = None,
                 beam_slots: torch.Tensor | None = None, token_slots: torch.Tensor | None = None,
                 block_m: int | None = None):
        if (seq_slots is None) == (token_slots is None):
            raise ValueError("MixedBatch takes seq_slots or token_slots, exactly one")
        self.num_slots, self.names, self.block_m = num_slots, names, block_m
        self.seq_slots, self.beam_slots, self.token_slots = seq_slots, beam_slots, token_slots
        self._cache: dict[tuple, AdapterBatch] = {}

    def for_input(self, x: torch.Tensor) -> AdapterBatch:
        """The metadata for a layer input ``x [..., in]``: built for the first layer that sees this shape
        and device, reused by the others."""
        lead = tuple(x.shape[:-1])
        key = (lead, x.device)
        meta = self._cache.get(key)
        if meta is None:
            meta = self._cache[key] = adapter_batch(self._token_slots(lead, x.device), self.num_slots, self.block_m)
        return meta

    def _token_slots(self, lead: tuple[int, ...], device: torch.device) -> torch.Tensor:
        tokens = math.prod(lead)
        if self.token_slots is not None:
            if self.token_slots.numel() != tokens:
                raise ValueError(f"the batch has adapter indices for {self.token_slots.numel()} tokens, "
                                 f"the layer input has {tokens}")
            return self.token_slots.reshape(-1).to(device)
        batch = lead[0] if lead else 1
        candidates = [s for s in (self.seq_slots, self.beam_slots) if s is not None]
        seq = next((s for s in candidates if s.shape[0] == batch), None)
        if seq is None:  # PEFT's message
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{self.seq_slots.shape[0]} and {batch} respectively."
            )
        per_seq = tokens // batch if batch else 0
        return seq.to(device).repeat_interleave(per_seq)


def bank_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a layer's bank is kept in: the one its base computes in (the kernels cast adapter tiles
    to the input's dtype anyway), the adapters' own for a base of another kind."""
    base = layer.base_layer
    compute = getattr(base, "compute_dtype", None)
    if compute is not None:
        return compute
    quant_state = getattr(base, "quant_state", None)
    if quant_state is not None:  # 4-bit: the dtype it was quantized from
        return quant_state.dtype
    weight = getattr(base, "weight", None)
    if weight is not None and weight.dtype.is_floating_point:
        return weight.dtype
    first = next(iter(layer.lora_A.values()), None)
    return first.weight.dtype if first is not None else torch.float32


def _source(name: str, a: torch.Tensor, b: torch.Tensor, scaling: float) -> tuple:
    # Weak references: a deleted parameter never matches a new one that reuses its id and storage.
    return (name, weakref.ref(a), a._version, a.data_ptr(), weakref.ref(b), b._version, b.data_ptr(), scaling)


def _is_current(source: tuple | None, name: str, a: torch.Tensor, b: torch.Tensor, scaling: float) -> bool:
    return (source is not None and source[0] == name and source[1]() is a and source[2] == a._version
            and source[3] == a.data_ptr() and source[4]() is b and source[5] == b._version
            and source[6] == b.data_ptr() and source[7] == scaling)


def sync_bank(layer: nn.Module, slots: dict[str, int], num_slots: int) -> AdapterBank:
    """``layer.adapter_bank`` brought up to date with the layer's adapters at the model-wide ``slots``;
    returns it. Copies only the adapters whose parameters changed since the last sync."""
    first = next(iter(layer.lora_A.values()), None)
    device = first.weight.device if first is not None else torch.device("cpu")
    dtype = bank_dtype(layer)
    bank = layer.adapter_bank
    if bank is None or bank.device != device or bank.dtype != dtype:
        bank = AdapterBank(layer.in_features, layer.out_features, device=device, dtype=dtype)
        layer.adapter_bank = bank
    bank.reserve(num_slots)
    live = set()
    for name, slot in slots.items():
        if name not in layer.lora_A:
            continue
        a, b, scaling = layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name])
        live.add(slot)
        if bank.names.get(name) == slot and _is_current(bank._sources.get(slot), name, a, b, scaling):
            continue
        bank.clear_slot(slot)
        bank.names.pop(name, None)
        bank.add(name, a.detach(), b.detach(), scaling, slot=slot)
        bank._sources[slot] = _source(name, a, b, scaling)
    for slot in range(bank.num_slots):
        if slot not in live and (bank.rank(slot) or bank.slot_name(slot) is not None):
            bank.clear_slot(slot)
    return bank


def _needs_grad(layer: nn.Module, x: torch.Tensor) -> bool:
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(p.requires_grad for table in (layer.lora_A, layer.lora_B) for p in table.parameters())


def mixed_batch_forward(layer: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``LoraLinear.forward`` for a mixed batch (``layer.mixed_batch`` set): the base layer's output plus each
    token's own adapter. Without gradients this is the bank's fused op; when autograd needs the adapters'
    gradients it is plain PyTorch over the layer's own parameters (PEFT's way: adapter by adapter)."""
    if layer.merged:  # PEFT's message
        raise ValueError(
            "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
        )
    batch: MixedBatch = layer.mixed_batch
    meta = batch.for_input(x)
    y = layer.base_layer(x, *args, **kwargs)
    if _needs_grad(layer, x):
        return y + _update_autograd(layer, x, meta, batch.names).view_as(y).to(y.dtype)
    bank = layer.adapter_bank
    if bank is None or bank.num_slots < batch.num_slots:
        raise RuntimeError("the layer's adapter bank was not synced for this batch (fastlora.mixed_adapter_batch does)")
    if not y.is_contiguous():
        y = y.contiguous()
    return bank.apply_(y, x, meta)


def _update_autograd(layer: nn.Module, x: torch.Tensor, meta: AdapterBatch, names: dict[int, str]) -> torch.Tensor:
    """The mixed batch's update ``[M, out]`` through differentiable ops on the layer's own parameters."""
    from fastlora.reference_multi import token_groups

    x2 = x.reshape(-1, x.shape[-1])
    update = x2.new_zeros((x2.shape[0], layer.out_features))
    for slot, rows in token_groups(meta.token_slots):
        name = names.get(slot)
        if name is None or name not in layer.lora_A:
            continue
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        part = (x2.index_select(0, rows).to(a.dtype) @ a.t()) @ b.t() * layer.scaling[name]
        update = update.index_add(0, rows, part.to(update.dtype))
    return update
