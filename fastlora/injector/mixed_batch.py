"""Mixed-adapter batches over an injected model: one adapter per sequence or per token, every layer at once.

- ``adapter_slots(model)``: each LoRA adapter's model-wide slot, the index a batch carries per token.
  Slots are stable: deleting an adapter frees its slot (its tokens then get the base model) and the
  next adapter added takes the lowest free one; the others never move.
- ``mixed_adapter_batch(model, adapter_names=... | token_indices=...)``: a context in which every
  ``LoraLinear`` of the model runs each token with its own adapter. On entry it checks the request the
  way PEFT does, brings each layer's adapter bank up to date and hands every layer one shared
  ``MixedBatch``; the sorted batch metadata is built once per input shape by the first layer that sees
  it. On exit the layers are as they were.

``PeftModel.forward(..., adapter_names=[...])`` and ``generate(..., adapter_names=[...])`` run inside this
context (PEFT's spelling: one name per sequence, ``"__base__"`` for the base model); a serving backend
calls it directly with ``token_indices``, one slot per token (-1 for the base model).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from fastlora.injector.inject import iter_modules
from fastlora.layers import LoraLinear, ModulesToSaveWrapper
from fastlora.layers.bank import BASE_ADAPTER, MixedBatch, sync_bank

__all__ = ["BASE_ADAPTER", "adapter_slots", "mixed_adapter_batch"]


def _tuner(model: nn.Module) -> nn.Module:
    """The LoraModel of ``model`` (a PeftModel, or the LoraModel itself)."""
    from fastlora.injector.lora_model import LoraModel  # lora_model imports this module

    if isinstance(model, LoraModel):
        return model
    base = model.__dict__.get("_modules", {}).get("base_model")
    if isinstance(base, LoraModel):
        return base
    raise TypeError(f"mixed-adapter batches need a LoRA model (PeftModel or LoraModel), got {type(model).__name__}")


def adapter_slots(model: nn.Module) -> dict[str, int]:
    """``{adapter name: slot}`` for every LoRA adapter of ``model``: the indices ``token_indices`` speaks."""
    tuner = _tuner(model)
    slots: dict[str, int] = tuner.__dict__.setdefault("_fastlora_adapter_slots", {})
    for name in [n for n in slots if n not in tuner.peft_config]:
        del slots[name]
    for name in tuner.peft_config:
        if name not in slots:
            taken = set(slots.values())
            slots[name] = next(s for s in range(len(slots) + 1) if s not in taken)
    return dict(slots)


def _lora_layers(tuner: nn.Module) -> list[LoraLinear]:
    return [m for _, m in iter_modules(tuner.model) if isinstance(m, LoraLinear)]


def _check_names(adapter_names, layers: list[LoraLinear], num_beams) -> None:
    """PEFT's checks of ``adapter_names``, with its messages."""
    known = {name for layer in layers for name in layer.lora_A}
    unexpected = {name for name in adapter_names if name != BASE_ADAPTER} - known
    if unexpected:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unexpected))}")
    if isinstance(num_beams, int) and num_beams > 1 and not isinstance(adapter_names, (list, tuple)):
        raise TypeError(f"Got adapter names of type {type(adapter_names)}, expected a list of str.")


def _check_token_indices(token_indices: torch.Tensor, num_slots: int, validate: bool) -> torch.Tensor:
    if not isinstance(token_indices, torch.Tensor) or token_indices.is_floating_point() \
            or token_indices.is_complex() or token_indices.dtype == torch.bool:
        raise TypeError("token_indices must be an integer tensor, one adapter slot per token (-1: base model)")
    if validate and token_indices.numel():
        # One host read per call (not per layer); a serving loop that builds valid indices can skip it.
        low, high = int(token_indices.min()), int(token_indices.max())
        if low < -1 or high >= num_slots:
            raise ValueError(f"token_indices must lie in [-1, {num_slots - 1}] (adapter slots: see adapter_slots), "
                             f"got values in [{low}, {high}]")
    return token_indices.reshape(-1).to(torch.int32)


@contextmanager
def mixed_adapter_batch(
    model: nn.Module,
    adapter_names: Sequence[str] | None = None,
    *,
    token_indices: torch.Tensor | None = None,
    num_beams: int | None = None,
    validate: bool = True,
) -> Iterator[MixedBatch | None]:
    """Run ``model`` inside the ``with`` block with one adapter per sequence or per token.

    ``adapter_names``: one adapter name per sequence of the batch (``"__base__"``: the base model), as
    PEFT's ``adapter_names``; with ``num_beams > 1`` each name also covers that sequence's beams.
    ``token_indices``: one slot per token of the flattened batch (``adapter_slots`` gives the slots; -1:
    the base model); ``validate=False`` skips the range check, which reads the indices on the host.

    Raises as PEFT does: in training mode, for unknown adapter names, with adapters merged. With the
    adapters disabled (``disable_adapter()``) the names are ignored and the base model runs, as in PEFT.
    """
    if adapter_names is None and token_indices is None:
        yield None
        return
    if adapter_names is not None and token_indices is not None:
        raise ValueError("pass adapter_names (one per sequence) or token_indices (one per token), not both")
    tuner = _tuner(model)
    layers = _lora_layers(tuner)
    if any(layer.disable_adapters for layer in layers):
        yield None
        return
    if tuner.training:  # PEFT's message
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
    if adapter_names is not None:
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names must be a list of str, one per sequence, got the str {adapter_names!r}")
        _check_names(adapter_names, layers, num_beams)
    if any(layer.merged for layer in layers):  # PEFT's message (it raises from the first layer called)
        raise ValueError(
            "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
        )
    if any(isinstance(m, ModulesToSaveWrapper) for _, m in iter_modules(tuner.model)):
        raise NotImplementedError(
            "mixed-adapter batches with modules_to_save are not supported by fastlora yet; run one adapter per batch"
        )
    slots = adapter_slots(tuner)
    num_slots = max(slots.values(), default=-1) + 1
    device = next((p.device for layer in layers for p in layer.lora_A.parameters()), torch.device("cpu"))
    names = {slot: name for name, slot in slots.items()}
    if adapter_names is not None:
        seq = torch.tensor([-1 if n == BASE_ADAPTER else slots[n] for n in adapter_names], dtype=torch.int32,
                           device=device)
        beams = seq.repeat_interleave(num_beams) if isinstance(num_beams, int) and num_beams > 1 else None
        batch = MixedBatch(num_slots, names, seq_slots=seq, beam_slots=beams)
    else:
        batch = MixedBatch(num_slots, names, token_slots=_check_token_indices(token_indices, num_slots, validate))
    previous = [layer.mixed_batch for layer in layers]
    for layer in layers:
        sync_bank(layer, slots, num_slots)
    try:
        for layer in layers:
            layer.mixed_batch = batch
        yield batch
    finally:
        for layer, before in zip(layers, previous):
            layer.mixed_batch = before
