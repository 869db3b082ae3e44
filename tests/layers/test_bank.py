"""``fastlora.layers.bank``: the adapter bank of one layer, its sync with ``LoraLinear``'s parameters, the shared
per-shape batch metadata, and a mixed batch over dense, Conv1D-style and 4-bit NF4 base layers.

The oracle for a layer is the same layer run once per token group with that adapter active (the
single-adapter path users already rely on).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastlora.layers import AdapterBank, LinearNF4, LoraLinear, MixedBatch
from fastlora.layers.bank import sync_bank
from fastlora.ops import adapter_batch

# name -> (r, alpha, rsLoRA): different ranks and alphas side by side, one rsLoRA
ADAPTERS = {"r4": (4, 8, False), "r16": (16, 4, True), "r64": (64, 32, False)}
SLOTS = {"r4": 0, "r16": 1, "r64": 2}


def _layer(base: nn.Module, fan_in_fan_out=False, seed=0) -> LoraLinear:
    torch.manual_seed(seed)
    layer = None
    for name, (r, alpha, rslora) in ADAPTERS.items():
        if layer is None:
            layer = LoraLinear(base, name, r=r, lora_alpha=alpha, use_rslora=rslora, init_lora_weights=False,
                               fan_in_fan_out=fan_in_fan_out)
        else:
            layer.update_layer(name, r, alpha, init_lora_weights=False, use_rslora=rslora)
    return layer.eval()


def _mixed(layer, x, token_slots, slots=SLOTS):
    num_slots = max(slots.values()) + 1
    sync_bank(layer, slots, num_slots)
    layer.mixed_batch = MixedBatch(num_slots, {s: n for n, s in slots.items()}, token_slots=token_slots)
    try:
        with torch.no_grad():
            return layer(x)
    finally:
        layer.mixed_batch = None


@torch.no_grad()
def _per_token_oracle(layer, x, token_slots, slots=SLOTS):
    names = {s: n for n, s in slots.items()}
    x2 = x.reshape(-1, x.shape[-1])
    out = []
    for t, slot in enumerate(token_slots.tolist()):
        if slot < 0 or names[slot] not in layer.lora_A:
            layer.enable_adapters(False)
        else:
            layer.set_adapter(names[slot])
        out.append(layer(x2[t:t + 1]))
        layer.enable_adapters(True)
    return torch.cat(out).view(*x.shape[:-1], -1)


# ---- AdapterBank --------------------------------------------------------------------------------------------------

def test_bank_add_replace_remove_and_grow():
    bank = AdapterBank(6, 5)
    assert bank.num_slots == 0 and bank.max_rank == 0
    a4, b4 = torch.randn(4, 6), torch.randn(5, 4)
    assert bank.add("x", a4, b4, 2.0) == 0
    a8, b8 = torch.randn(8, 6), torch.randn(5, 8)
    assert bank.add("y", a8, b8, 0.5) == 1
    assert (bank.num_slots, bank.max_rank) == (2, 8)
    torch.testing.assert_close(bank.lora_A[0, :4], a4)  # the rank-4 adapter survived the growth to 8
    assert bank.lora_A[0, 4:].abs().sum() == 0 and bank.ranks.tolist() == [4, 8]
    bank.replace("x", torch.randn(2, 6), torch.randn(5, 2), 1.0)  # a new rank in place
    assert bank.ranks.tolist() == [2, 8] and bank.scalings.tolist() == [1.0, 0.5] and bank.lora_A[0, 2:].abs().sum() == 0
    bank.remove("x")
    assert bank.ranks.tolist() == [0, 8] and "x" not in bank.names
    assert bank.add("z", a4, b4, 3.0) == 0  # the freed slot is reused
    with pytest.raises(ValueError, match="already in the bank"):
        bank.add("z", a4, b4, 1.0)
    with pytest.raises(KeyError, match="not in the bank"):
        bank.remove("nope")
    with pytest.raises(ValueError, match="do not fit"):
        bank.add("w", torch.randn(4, 7), b4, 1.0)


def test_bank_apply_matches_each_adapter_alone():
    bank = AdapterBank(12, 10)
    gen = torch.Generator().manual_seed(0)
    weights = {n: (torch.randn(r, 12, generator=gen), torch.randn(10, r, generator=gen), s)
               for n, r, s in (("p", 3, 0.5), ("q", 20, 2.0))}
    for name, (a, b, s) in weights.items():
        bank.add(name, a, b, s)
    x, y = torch.randn(2, 9, 12, generator=gen), torch.randn(2, 9, 10, generator=gen)
    slots = torch.tensor([0, 1, -1, 1, 0, 0, -1, 1, 1] * 2)
    out = bank.apply_(y.clone(), x, adapter_batch(slots, bank.num_slots))
    for t, slot in enumerate(slots.tolist()):
        expected = y.view(-1, 10)[t].clone()
        if slot >= 0:
            a, b, s = weights[bank.slot_name(slot)]
            expected += s * (x.view(-1, 12)[t] @ a.t() @ b.t())
        torch.testing.assert_close(out.view(-1, 10)[t], expected, rtol=1e-5, atol=1e-5)


# ---- LoraLinear over any base -------------------------------------------------------------------------------------

def _bases():
    from transformers.pytorch_utils import Conv1D  # GPT-2's layer: weight stored [in, out]

    return {
        "dense": (lambda: nn.Linear(32, 24).requires_grad_(False), False),
        "conv1d": (lambda: Conv1D(24, 32).requires_grad_(False), True),
        "nf4": (lambda: LinearNF4.from_linear(nn.Linear(32, 24)), False),
    }


@pytest.mark.parametrize("kind", ["dense", "conv1d", "nf4"])
def test_mixed_batch_over_any_base_equals_each_token_alone(kind):
    make, fan_in_fan_out = _bases()[kind]
    torch.manual_seed(4)
    layer = _layer(make(), fan_in_fan_out=fan_in_fan_out)
    x = torch.randn(3, 7, 32)
    slots = torch.tensor([0, 1, 2, -1, 2, 2, 0] * 3)
    got = _mixed(layer, x, slots)
    torch.testing.assert_close(got, _per_token_oracle(layer, x, slots), rtol=1e-5, atol=1e-5)
    if kind == "nf4":
        assert layer.adapter_bank.dtype == torch.float32  # the dtype the base was quantized from


def test_scalings_follow_alpha_and_rslora():
    layer = _layer(nn.Linear(32, 24))
    bank = sync_bank(layer, SLOTS, 3)
    for name, (r, alpha, rslora) in ADAPTERS.items():
        expected = alpha / math.sqrt(r) if rslora else alpha / r
        assert bank.scalings[SLOTS[name]].item() == pytest.approx(expected)
        assert bank.ranks[SLOTS[name]].item() == r


def test_bank_is_kept_in_the_base_dtype():
    layer = _layer(nn.Linear(32, 24).to(torch.float16))
    assert all(p.dtype == torch.float32 for p in layer.lora_A.parameters())  # PEFT's fp32 adapters
    bank = sync_bank(layer, SLOTS, 3)
    assert bank.lora_A.dtype == bank.lora_B.dtype == torch.float16


def test_sync_copies_only_what_changed_and_sees_every_change():
    layer = _layer(nn.Linear(32, 24))
    bank = sync_bank(layer, SLOTS, 3)
    snapshot = bank.lora_A.clone()
    assert sync_bank(layer, SLOTS, 3) is bank and torch.equal(bank.lora_A, snapshot)
    copies = []
    real = bank.set_slot
    bank.set_slot = lambda slot, *a: copies.append(slot) or real(slot, *a)
    assert sync_bank(layer, SLOTS, 3) is bank and copies == []  # nothing changed: nothing copied
    with torch.no_grad():
        layer.lora_B["r16"].weight.mul_(2.0)  # in place (an optimizer step, load_state_dict)
    sync_bank(layer, SLOTS, 3)
    assert copies == [1]
    torch.testing.assert_close(bank.lora_B[1, :, :16], layer.lora_B["r16"].weight)
    layer.update_layer("r4", 8, 8, init_lora_weights=False)  # replaced by an adapter of another rank
    sync_bank(layer, SLOTS, 3)
    assert copies == [1, 0] and bank.ranks.tolist() == [8, 16, 64] and bank.scalings[0].item() == 1.0
    layer.scaling["r64"] = 0.25  # PEFT's set_scale / scale_layer change the scaling alone
    sync_bank(layer, SLOTS, 3)
    assert copies == [1, 0, 2] and bank.scalings[2].item() == 0.25
    layer.delete_adapter("r16")
    sync_bank(layer, {"r4": 0, "r64": 2}, 3)
    assert bank.ranks.tolist() == [8, 0, 64] and "r16" not in bank.names


def test_layer_without_an_adapter_gives_its_tokens_the_base_output():
    layer = _layer(nn.Linear(32, 24))
    x = torch.randn(1, 5, 32)
    slots = {"r4": 0, "r16": 1, "r64": 2, "elsewhere": 3}  # an adapter other layers have and this one not
    got = _mixed(layer, x, torch.tensor([3, 3, 0, 3, -1]), slots)
    with torch.no_grad():
        base = layer.base_layer(x)
    torch.testing.assert_close(got[0, [0, 1, 3, 4]], base[0, [0, 1, 3, 4]], rtol=0, atol=0)


# ---- MixedBatch -------------------------------------------------------------------------------------------------

def test_metadata_is_built_once_per_shape_and_shared():
    batch = MixedBatch(3, {0: "a", 1: "b", 2: "c"}, seq_slots=torch.tensor([0, -1, 2], dtype=torch.int32))
    x = torch.randn(3, 5, 8)
    first = batch.for_input(x)
    assert batch.for_input(torch.randn(3, 5, 16)) is first  # another layer, same tokens: same metadata
    assert first.token_slots.tolist() == [0] * 5 + [-1] * 5 + [2] * 5
    decode = batch.for_input(torch.randn(3, 1, 8))
    assert decode is not first and decode.token_slots.tolist() == [0, -1, 2]
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs, "
                                         "but got 3 and 2 respectively."):
        batch.for_input(torch.randn(2, 5, 8))


def test_beam_slots_serve_the_decoder_and_seq_slots_the_encoder():
    seq = torch.tensor([1, -1], dtype=torch.int32)
    batch = MixedBatch(2, {0: "a", 1: "b"}, seq_slots=seq, beam_slots=seq.repeat_interleave(3))
    assert batch.for_input(torch.randn(2, 4, 8)).token_slots.tolist() == [1] * 4 + [-1] * 4
    assert batch.for_input(torch.randn(6, 1, 8)).token_slots.tolist() == [1, 1, 1, -1, -1, -1]


def test_mixed_batch_needs_exactly_one_kind_of_index():
    with pytest.raises(ValueError, match="exactly one"):
        MixedBatch(1, {}, seq_slots=torch.zeros(1), token_slots=torch.zeros(1))
