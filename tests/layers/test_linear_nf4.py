"""``LinearNF4`` against ``bitsandbytes.nn.Linear4bit`` on CPU: state dicts both ways, outputs, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastlora import LinearNF4
from fastlora.quant import QuantStateError, dequantize_nf4

bnb = pytest.importorskip("bitsandbytes")


def _linear(in_features, out_features, seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def _bnb_layer(linear, blocksize=64, double_quant=False, quant_storage=torch.uint8):
    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=torch.float32,
        compress_statistics=double_quant, quant_type="nf4", quant_storage=quant_storage,
    )
    layer.weight.blocksize = blocksize
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # quantizes


def _bytes(t):
    return t.reshape(-1).contiguous().view(torch.uint8)


def _same_state_dict(a, b):
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(_bytes(a[key]), _bytes(b[key])), key


CASES = [  # (in, out, blocksize, double_quant, quant_storage)
    (64, 48, 64, False, torch.uint8),
    (64, 48, 64, True, torch.uint8),
    (96, 40, 32, True, torch.bfloat16),  # weights stored through a bf16 view
    (65, 33, 64, False, torch.uint8),  # in not a multiple of the blocksize, odd element count
    (200, 24, 128, True, torch.uint8),
]
IDS = [f"{i}x{o}-bs{b}-{'dq' if d else 'sq'}-{str(s)[6:]}" for i, o, b, d, s in CASES]


@pytest.mark.parametrize("in_f,out_f,blocksize,double_quant,storage", CASES, ids=IDS)
def test_bitsandbytes_state_dict_loads_and_matches(in_f, out_f, blocksize, double_quant, storage):
    linear = _linear(in_f, out_f)
    theirs = _bnb_layer(linear, blocksize, double_quant, storage)
    ours = LinearNF4(in_f, out_f)
    assert not ours.load_state_dict(theirs.state_dict()).missing_keys
    assert ours.quant_state.blocksize == blocksize and ours.quant_state.nested == double_quant
    # The same state dict comes back out, byte for byte (bf16 view included).
    _same_state_dict(ours.state_dict(), theirs.state_dict())
    x = torch.randn(5, in_f)
    if blocksize <= 64:
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    else:  # bitsandbytes' CPU library dequantizes blocksize >= 128 wrongly here (see tests/quant/test_nf4_quant.py)
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

        ts = theirs.weight.quant_state
        absmax = bnb.functional.dequantize_blockwise(ts.absmax, ts.state2) + ts.offset if ts.nested else ts.absmax
        code = bnb.functional.get_4bit_type("nf4", device="cpu")
        w = _dequantize_4bit_compute.__wrapped__(_bytes(theirs.weight), absmax, code, ts.blocksize, ts.shape, ts.dtype)
        torch.testing.assert_close(ours(x), x @ w.t() + linear.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_f,out_f,blocksize,double_quant,storage", CASES, ids=IDS)
def test_our_quantization_is_bitsandbytes_and_loads_there(in_f, out_f, blocksize, double_quant, storage):
    linear = _linear(in_f, out_f, seed=1)
    ours = LinearNF4.from_linear(linear, blocksize=blocksize, double_quant=double_quant, quant_storage=storage)
    theirs = _bnb_layer(linear, blocksize, double_quant, storage)
    sd = ours.state_dict()
    if not double_quant:  # nested bytes may differ by a rounding tie (see tests/quant/test_nf4_quant.py); the weight never does
        _same_state_dict(sd, theirs.state_dict())
    assert torch.equal(_bytes(sd["weight"]), _bytes(theirs.state_dict()["weight"]))
    # bitsandbytes reads our state dict (as transformers does for a prequantized checkpoint).
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    loaded = bnb.nn.Linear4bit(in_f, out_f, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    loaded.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=loaded)
    loaded.bias = nn.Parameter(sd["bias"])
    got = bnb.functional.dequantize_4bit(loaded.weight, loaded.weight.quant_state) if blocksize <= 64 else None
    if got is not None:
        assert torch.equal(got, ours.dequantize())
        x = torch.randn(4, in_f)
        torch.testing.assert_close(loaded(x), ours(x), rtol=1e-5, atol=1e-5)


def test_forward_computes_in_compute_dtype_and_returns_input_dtype():
    linear = _linear(64, 32)
    layer = LinearNF4.from_linear(linear, compute_dtype=torch.float16)
    x = torch.randn(3, 64)
    y = layer(x)
    assert y.dtype == torch.float32
    expected = (x.half() @ layer.dequantize(torch.float16).t() + linear.bias.half()).float()
    torch.testing.assert_close(y, expected, rtol=2e-3, atol=2e-3)
    # gradient flows to the input through the frozen 4-bit weight
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert not layer.weight.requires_grad


def test_dtype_casts_leave_the_quantization_state_alone():
    layer = LinearNF4.from_linear(_linear(64, 32), double_quant=True)
    packed = layer.weight.clone()
    absmax = layer.quant_state.absmax.clone()
    nested = layer.quant_state.nested_absmax.clone()
    layer.half()
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.uint8 and torch.equal(layer.weight, packed)
    assert torch.equal(layer.quant_state.absmax, absmax) and layer.quant_state.nested_absmax.dtype == torch.float32
    assert torch.equal(layer.quant_state.nested_absmax, nested)
    assert layer.bias.dtype == torch.bfloat16
    y = layer(torch.randn(2, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_float_checkpoint_is_quantized_on_load():
    linear = _linear(64, 32)
    layer = LinearNF4(64, 32, blocksize=32, double_quant=True)
    layer.load_state_dict(linear.state_dict())
    reference = LinearNF4.from_linear(linear, blocksize=32, double_quant=True)
    assert torch.equal(layer.weight, reference.weight)
    assert torch.equal(layer.dequantize(), reference.dequantize())


def test_conv1d_weight_is_transposed():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(48, 64)  # nf=48 outputs, nx=64 inputs: weight [64, 48]
    layer = LinearNF4.from_linear(conv, transpose=True)
    assert (layer.in_features, layer.out_features) == (64, 48)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ dequantize_nf4(layer.weight, layer.quant_state).t() + conv.bias)
    # the same bytes as quantizing the [out, in] weight of the equivalent nn.Linear
    assert torch.equal(layer.weight, LinearNF4.from_linear(_as_linear(conv)).weight)


def _as_linear(conv):
    linear = nn.Linear(conv.weight.shape[0], conv.weight.shape[1])
    linear.weight.data = conv.weight.detach().t().contiguous()
    return linear


def _corrupt(sd, how):
    sd = dict(sd)
    if how == "missing_absmax":
        del sd["weight.absmax"]
    elif how == "short_absmax":
        sd["weight.absmax"] = sd["weight.absmax"][:-1]
    elif how == "not_nf4":
        sd["weight.quant_map"] = sd["weight.quant_map"].flip(0)
    elif how == "fp4":
        sd["weight.quant_state.bitsandbytes__fp4"] = sd.pop("weight.quant_state.bitsandbytes__nf4")
    elif how == "bad_json":
        sd["weight.quant_state.bitsandbytes__nf4"] = torch.tensor([1, 2, 255], dtype=torch.uint8)
    elif how == "wrong_shape":
        sd["weight"] = sd["weight"][:-3]
    elif how == "no_state":
        sd = {k: v for k, v in sd.items() if not k.startswith("weight.")}
    elif how == "missing_nested":
        del sd["weight.nested_absmax"]
    return sd


@pytest.mark.parametrize("how", ["missing_absmax", "short_absmax", "not_nf4", "fp4", "bad_json", "wrong_shape",
                                 "no_state", "missing_nested"])
def test_bad_quant_state_is_refused_and_the_layer_keeps_its_weights(how):
    source = LinearNF4.from_linear(_linear(64, 32, seed=3), double_quant=True).state_dict()
    layer = LinearNF4.from_linear(_linear(64, 32, seed=4), double_quant=True)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError) as err:
        layer.load_state_dict(_corrupt(source, how))
    message = str(err.value)
    assert "LinearNF4" in message or "weight" in message
    after = layer.state_dict()
    for key, value in before.items():
        assert torch.equal(_bytes(value), _bytes(after[key])), key


def test_error_names_the_layer_in_a_model():
    model = nn.Sequential()
    model.add_module("proj", LinearNF4.from_linear(_linear(64, 32)))
    sd = model.state_dict()
    sd["proj.weight.quant_map"] = torch.zeros(16)
    with pytest.raises(RuntimeError, match=r"proj: weight.quant_map is not the NF4 codebook"):
        model.load_state_dict(sd)
    with pytest.raises(QuantStateError):
        from fastlora.layers.nf4 import check_nf4_entries

        check_nf4_entries(sd, "proj.", "proj", 32, 64, torch.device("cpu"))
