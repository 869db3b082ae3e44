"""``LoraLinear`` against PEFT's ``lora.Linear``: layout, initialisation, adapters, merging, forward.

Each test builds PEFT's layer on an identical base (same seed) and asks it for the expected answer
where PEFT defines one.
"""

from __future__ import annotations

import math

import peft
import pytest
import torch
from peft.tuners.lora import layer as peft_layer
from torch import nn
from transformers.pytorch_utils import Conv1D

from fastlora import LoraLinear

IN, OUT, R = 24, 20, 4
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32, different summation order than PEFT


def _base(kind: str = "linear", bias: bool = True, seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "conv1d":  # GPT-2 style: weight stored [in, out]
        module = Conv1D(OUT, IN)
        nn.init.normal_(module.bias)
    else:
        module = nn.Linear(IN, OUT, bias=bias)
    return module.to(dtype)


def _pair(kind="linear", bias=True, r=R, alpha=8, dtype=torch.float32, **kwargs):
    """(ours, PEFT's) on identical bases, with identical (random, non-zero) adapter weights."""
    fan_in_fan_out = kind == "conv1d"
    ours = LoraLinear(_base(kind, bias, dtype=dtype), "default", r=r, lora_alpha=alpha,
                      fan_in_fan_out=fan_in_fan_out, init_lora_weights=False, **kwargs)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, fan_in_fan_out=fan_in_fan_out, init_lora_weights=False,
                             use_rslora=kwargs.get("use_rslora", False), lora_dropout=kwargs.get("lora_dropout", 0.0))
    theirs = peft_layer.Linear(_base(kind, bias, dtype=dtype), "default", config=config, r=r, lora_alpha=alpha,
                               is_target_conv_1d_layer=fan_in_fan_out)
    _copy_adapter(ours, theirs, "default")
    return ours, theirs


def _copy_adapter(ours, theirs, name):
    with torch.no_grad():
        for table in ("lora_A", "lora_B"):
            getattr(theirs, table)[name].weight.copy_(getattr(ours, table)[name].weight)


def _peft_add(theirs, name, r, alpha, **kwargs):
    config = peft.LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, **kwargs)
    theirs.update_layer(name, r, lora_alpha=alpha, config=config)


def _x(*lead, dtype=torch.float32, seed=1):
    return torch.randn(*lead, IN, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---- layout -------------------------------------------------------------------------------------------

PEFT_ATTRIBUTES = [
    "base_layer", "lora_A", "lora_B", "lora_dropout", "r", "lora_alpha", "scaling", "merged_adapters",
    "active_adapter", "active_adapters", "disable_adapters", "merged", "in_features", "out_features",
    "fan_in_fan_out", "adapter_layer_names", "other_param_names", "update_layer", "reset_lora_parameters",
    "set_adapter", "enable_adapters", "delete_adapter", "merge", "unmerge", "get_delta_weight", "get_base_layer",
]


@pytest.mark.parametrize("kind, bias", [("linear", True), ("linear", False), ("conv1d", True)],
                         ids=["linear-bias", "linear-nobias", "conv1d"])
def test_state_dict_keys_and_shapes_equal_peft(kind, bias):
    ours, theirs = _pair(kind, bias)
    _peft_add(theirs, "other", 2, 4)
    ours.update_layer("other", 2, 4)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert sorted(ours_sd) == sorted(theirs_sd)
    for key in ours_sd:
        assert ours_sd[key].shape == theirs_sd[key].shape, key


@pytest.mark.parametrize("name", PEFT_ATTRIBUTES)
def test_peft_attribute_names(name):
    ours, theirs = _pair()
    assert hasattr(theirs, name), f"PEFT has no {name} any more: update the list"
    assert hasattr(ours, name)


def test_get_base_layer_is_the_wrapped_layer():
    ours, theirs = _pair()
    assert ours.get_base_layer() is ours.base_layer
    assert type(ours.get_base_layer()) is type(theirs.get_base_layer())


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dimensions_and_bookkeeping_match_peft(kind):
    ours, theirs = _pair(kind, use_rslora=True, r=9, alpha=6)
    for attr in ("in_features", "out_features", "fan_in_fan_out", "r", "lora_alpha", "scaling",
                 "active_adapters", "merged_adapters", "merged", "disable_adapters"):
        # (not active_adapter: PEFT's layer answers a str or a list depending on history)
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert ours.active_adapter == "default"


# ---- initialisation -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("init", [True, "gaussian", False], ids=["true", "gaussian", "false"])
def test_init_lora_weights_equals_peft(init):
    torch.manual_seed(0)
    ours = LoraLinear(nn.Linear(IN, OUT), r=R, lora_alpha=8, init_lora_weights=init)
    torch.manual_seed(0)
    config = peft.LoraConfig(r=R, lora_alpha=8, init_lora_weights=init)
    theirs = peft_layer.Linear(nn.Linear(IN, OUT), "default", config=config, r=R, lora_alpha=8)
    # same seed, same draws: the initialisation is PEFT's, value for value
    torch.testing.assert_close(ours.lora_A["default"].weight, theirs.lora_A["default"].weight, rtol=0, atol=0)
    torch.testing.assert_close(ours.lora_B["default"].weight, theirs.lora_B["default"].weight, rtol=0, atol=0)


@pytest.mark.parametrize("init", [True, "gaussian"], ids=["true", "gaussian"])
def test_default_inits_start_as_a_no_op(init):
    layer = LoraLinear(_base(), r=R, lora_alpha=16, init_lora_weights=init)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert torch.count_nonzero(layer.lora_A["default"].weight) == R * IN
    x = _x(3, 5)
    torch.testing.assert_close(layer(x), layer.base_layer(x), **TOL)


def test_gaussian_init_has_std_one_over_r():
    torch.manual_seed(0)
    r = 8
    layer = LoraLinear(nn.Linear(1024, 4), r=r, init_lora_weights="gaussian")
    assert layer.lora_A["default"].weight.std().item() == pytest.approx(1 / r, rel=0.05)


def test_init_false_changes_the_output():
    layer = LoraLinear(_base(), r=R, init_lora_weights=False)
    x = _x(7)
    assert (layer(x) - layer.base_layer(x)).abs().max() > 1e-3


@pytest.mark.parametrize("use_rslora, expected", [(False, 16 / 9), (True, 16 / 3)], ids=["lora", "rslora"])
def test_scaling_and_rslora(use_rslora, expected):
    layer = LoraLinear(_base(), r=9, lora_alpha=16, use_rslora=use_rslora)
    assert layer.scaling["default"] == pytest.approx(expected)
    layer.update_layer("other", 4, 8, use_rslora=use_rslora)
    assert layer.scaling["other"] == pytest.approx(8 / math.sqrt(4) if use_rslora else 8 / 4)


@pytest.mark.parametrize("r", [0, -1])
def test_bad_rank_raises(r):
    with pytest.raises(ValueError, match="r must be a positive int"):
        LoraLinear(_base(), r=r)


def test_adapter_dtype():
    base = _base(dtype=torch.bfloat16)
    assert LoraLinear(base).lora_A["default"].weight.dtype == torch.float32  # PEFT's autocast_adapter_dtype
    assert LoraLinear(_base(dtype=torch.bfloat16), adapter_dtype=None).lora_B["default"].weight.dtype == torch.bfloat16


# ---- forward ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, bias", [("linear", True), ("linear", False), ("conv1d", True)],
                         ids=["linear-bias", "linear-nobias", "conv1d"])
@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_forward_and_backward_equal_peft_fp32(kind, bias, use_rslora):
    ours, theirs = _pair(kind, bias, r=6, alpha=12, use_rslora=use_rslora)
    x1 = _x(2, 9).requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = ours(x1), theirs(x2)
    torch.testing.assert_close(y1, y2, **TOL)
    dy = torch.randn_like(y1)
    y1.backward(dy)
    y2.backward(dy)
    torch.testing.assert_close(x1.grad, x2.grad, **TOL)
    for table in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(ours, table)["default"].weight.grad,
                                   getattr(theirs, table)["default"].weight.grad, **TOL)


def test_forward_bf16_base_fp32_adapters_close_to_peft():
    ours, theirs = _pair(dtype=torch.bfloat16)
    for module in (ours, theirs):  # PEFT's LoraModel keeps adapters fp32 (autocast_adapter_dtype)
        module.lora_A.float()
        module.lora_B.float()
    _copy_adapter(ours, theirs, "default")
    x = _x(4, 8, dtype=torch.bfloat16)
    y, y_peft = ours(x), theirs(x)
    assert y.dtype == y_peft.dtype == torch.bfloat16
    # fp64 gold from the same values; PEFT upcasts x to run the low-rank path in fp32, fastlora keeps
    # it in bf16 (never copies x to fp32), so allow twice PEFT's error plus a bf16 ulp at this scale.
    w, b = ours.base_layer.weight.double(), ours.base_layer.bias.double()
    a, bb = ours.lora_A["default"].weight.double(), ours.lora_B["default"].weight.double()
    gold = x.double() @ w.t() + b + ours.scaling["default"] * (x.double() @ a.t()) @ bb.t()
    err, err_peft = (y.double() - gold).abs().max().item(), (y_peft.double() - gold).abs().max().item()
    assert err <= 2 * err_peft + 1e-2 * gold.abs().max().item()
    torch.testing.assert_close(y, y_peft, rtol=2e-2, atol=2e-2)


def test_dropout_only_in_training():
    layer = LoraLinear(_base(), r=R, lora_dropout=0.5, init_lora_weights=False)
    assert isinstance(layer.lora_dropout["default"], nn.Dropout)
    x = _x(64)
    layer.eval()
    no_dropout = layer.base_layer(x) + x @ layer.get_delta_weight("default").t()  # delta includes scaling
    torch.testing.assert_close(layer(x), no_dropout, **TOL)
    layer.train()
    torch.manual_seed(0)
    first = layer(x)
    torch.manual_seed(0)
    assert torch.equal(layer(x), first)  # torch.manual_seed reproduces
    assert not torch.allclose(first, no_dropout)


# ---- several adapters ------------------------------------------------------------------------------------------------

def _two_adapters():
    ours, theirs = _pair()
    ours.update_layer("other", 3, 6, init_lora_weights=False)
    _peft_add(theirs, "other", 3, 6)
    _copy_adapter(ours, theirs, "other")
    return ours, theirs


def _trainable(layer):
    return {name: p.requires_grad for name, p in layer.named_parameters() if "lora_" in name}


def test_set_adapter_trainability_matches_peft():
    ours, theirs = _two_adapters()
    assert _trainable(ours) == _trainable(theirs)
    assert _trainable(ours)["lora_A.other.weight"] is False  # a new adapter is not active: frozen
    for active in ("other", ["default", "other"], "default"):
        ours.set_adapter(active)
        theirs.set_adapter(active)
        assert _trainable(ours) == _trainable(theirs), active
        assert ours.active_adapters == theirs.active_adapters


@pytest.mark.parametrize("active", ["other", ["default", "other"], ["other", "default"]],
                         ids=["other", "both", "both-reversed"])
def test_active_adapters_sum_like_peft(active):
    ours, theirs = _two_adapters()
    ours.set_adapter(active)
    theirs.set_adapter(active)
    x = _x(3, 7)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    if isinstance(active, list):  # and the sum really has both terms
        expected = ours.base_layer(x) + sum(x @ ours.get_delta_weight(n).t() for n in active)
        torch.testing.assert_close(ours(x), expected, **TOL)


def test_delete_adapter_matches_peft():
    ours, theirs = _two_adapters()
    for layer in (ours, theirs):
        layer.set_adapter(["default", "other"])
        layer.delete_adapter("default")
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    assert "default" not in ours.r and "default" not in ours.scaling and "default" not in ours.lora_dropout
    assert ours.active_adapters == theirs.active_adapters == ["other"]
    x = _x(5)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)


def test_deleting_the_only_active_adapter_activates_a_remaining_one():
    ours, _ = _two_adapters()
    ours.delete_adapter("default")
    assert ours.active_adapters == ["other"]
    assert _trainable(ours) == {"lora_A.other.weight": True, "lora_B.other.weight": True}


def test_delete_merged_adapter_raises():
    ours, _ = _pair()
    ours.merge()
    with pytest.raises(ValueError, match="unmerge"):
        ours.delete_adapter("default")


def test_enable_adapters():
    ours, theirs = _pair()
    x = _x(6)
    with_lora = ours(x)
    ours.enable_adapters(False)
    assert ours.disable_adapters
    torch.testing.assert_close(ours(x), ours.base_layer(x), rtol=0, atol=0)
    ours.enable_adapters(True)
    torch.testing.assert_close(ours(x), with_lora, rtol=0, atol=0)
    assert not torch.allclose(with_lora, ours.base_layer(x))


def test_disabling_a_merged_layer_unmerges_it():
    ours, _ = _pair()
    original = ours.base_layer.weight.detach().clone()
    ours.merge()
    ours.enable_adapters(False)
    assert not ours.merged
    torch.testing.assert_close(ours.base_layer.weight, original, rtol=0, atol=1e-6)


# ---- merging ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "conv1d"], ids=["linear", "conv1d-fan_in_fan_out"])
def test_merge_unmerge_round_trip_matches_peft(kind):
    ours, theirs = _pair(kind)
    original = ours.base_layer.weight.detach().clone()
    x = _x(2, 5)
    unmerged = ours(x)
    torch.testing.assert_close(ours.get_delta_weight("default"), theirs.get_delta_weight("default"), **TOL)
    ours.merge()
    theirs.merge()
    assert ours.merged and ours.merged_adapters == ["default"]
    torch.testing.assert_close(ours.base_layer.weight, theirs.base_layer.weight, **TOL)
    assert not torch.allclose(ours.base_layer.weight, original)
    torch.testing.assert_close(ours(x), unmerged, **TOL)  # the merged weights alone give the same output
    torch.testing.assert_close(ours(x), ours.base_layer(x), rtol=0, atol=0)
    ours.merge()  # merging twice is a no-op
    assert ours.merged_adapters == ["default"]
    ours.unmerge()
    assert not ours.merged
    torch.testing.assert_close(ours.base_layer.weight, original, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours(x), unmerged, **TOL)


def test_merge_several_adapters():
    ours, theirs = _two_adapters()
    x = _x(4)
    ours.set_adapter(["default", "other"])
    expected = ours(x)
    ours.merge()
    assert ours.merged_adapters == ["default", "other"]
    torch.testing.assert_close(ours(x), expected, **TOL)
    ours.unmerge()
    torch.testing.assert_close(ours(x), expected, **TOL)


def test_merge_bf16_base_in_fp32():
    ours, _ = _pair(dtype=torch.bfloat16)
    original = ours.base_layer.weight.detach().clone()
    ours.merge()
    assert ours.base_layer.weight.dtype == torch.bfloat16
    expected = (original.float() + ours.get_delta_weight("default")).bfloat16()
    torch.testing.assert_close(ours.base_layer.weight, expected, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_safe_merge_refuses_non_finite_and_changes_nothing(bad, kind):
    ours, theirs = _pair(kind)
    with torch.no_grad():
        ours.lora_B["default"].weight[0, 0] = bad
        theirs.lora_B["default"].weight[0, 0] = bad
    original = ours.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or Inf"):
        ours.merge(safe_merge=True)
    with pytest.raises(ValueError):  # PEFT refuses too
        theirs.merge(safe_merge=True)
    assert torch.equal(ours.base_layer.weight, original)
    assert ours.merged_adapters == [] and not ours.merged


def test_safe_merge_of_several_adapters_changes_nothing_when_one_is_bad():
    ours, _ = _two_adapters()
    ours.set_adapter(["default", "other"])
    with torch.no_grad():
        ours.lora_B["other"].weight[0, 0] = float("inf")
    original = ours.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or Inf"):
        ours.merge(safe_merge=True)
    assert torch.equal(ours.base_layer.weight, original)  # "default" (fine on its own) is not merged either
    assert ours.merged_adapters == []


def test_safe_merge_catches_overflow_in_the_weight_dtype():
    # finite in fp32, but 7e4 does not fit fp16 (max 65504): the check is made in the weight's dtype
    ours, _ = _pair(dtype=torch.float16)
    with torch.no_grad():
        ours.lora_A["default"].weight.fill_(100.0)
        ours.lora_B["default"].weight.fill_(100.0)
    assert torch.isfinite(ours.get_delta_weight("default")).all()
    original = ours.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or Inf"):
        ours.merge(safe_merge=True)
    assert torch.equal(ours.base_layer.weight, original)


def test_forward_follows_a_parametrized_base_weight_and_reassigned_adapters():
    # The forward reads parameters from the modules' dicts; a parametrized weight (no longer in that dict)
    # and parameters replaced after construction must still be what it uses.
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    base = nn.Linear(12, 8)
    layer = LoraLinear(base, r=4, lora_alpha=4, init_lora_weights=False)
    x = torch.randn(3, 12)
    parametrize.register_parametrization(base, "weight", Double())
    layer.lora_B["default"].weight = nn.Parameter(torch.randn(8, 4))
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    want = torch.nn.functional.linear(x, base.weight, base.bias) + (x @ a.t() @ b.t())
    torch.testing.assert_close(layer(x), want)
