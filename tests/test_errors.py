"""Bad input gets a clear error and changes nothing.

"Nothing" is checked, not assumed: the model's state dict (names and values), its module types, its
adapters and the active adapter are compared before and after each failed call.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import fastlora
from fastlora import LoraLinear, ModulesToSaveWrapper


def _config(**overrides):
    kwargs = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, init_lora_weights=False,
                  target_modules=["q_proj", "v_proj"])
    kwargs.update(overrides)
    return fastlora.LoraConfig(**kwargs)


def _snapshot(model) -> dict:
    """Everything a failed call must leave alone."""
    return dict(
        state={k: v.detach().clone() for k, v in model.state_dict().items()},
        types={n: type(m) for n, m in model.named_modules()},
        trainable={n for n, p in model.named_parameters() if p.requires_grad},
        adapters=list(getattr(model, "peft_config", {}) or {}),
        active=getattr(model, "active_adapter", None) if hasattr(model, "peft_config") else None,
        merged=[n for n, m in model.named_modules() if isinstance(m, LoraLinear) and m.merged],
    )


def _assert_unchanged(model, before) -> None:
    after = _snapshot(model)
    assert after["types"] == before["types"]
    assert after["adapters"] == before["adapters"] and after["active"] == before["active"]
    assert after["trainable"] == before["trainable"]
    assert after["merged"] == before["merged"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        torch.testing.assert_close(after["state"][key], value, rtol=0, atol=0, equal_nan=True, msg=f"{key} changed")


def _no_fastlora_modules(model) -> bool:
    return not any(isinstance(m, (LoraLinear, ModulesToSaveWrapper)) for m in model.modules())


@pytest.fixture
def base(tiny_llama):
    return tiny_llama().eval()


@pytest.fixture
def two_adapters(base):
    model = fastlora.get_peft_model(copy.deepcopy(base), _config()).eval()
    model.add_adapter("other", _config(r=2, target_modules=["o_proj"]))
    return model


# ---- unknown adapter names -------------------------------------------------------------------------------

UNKNOWN_NAME_CALLS = {
    "set_adapter": lambda m: m.set_adapter("nope"),
    "delete_adapter": lambda m: m.delete_adapter("nope"),
    "merge_adapter": lambda m: m.merge_adapter(adapter_names=["default", "nope"]),
    "merge_and_unload": lambda m: m.merge_and_unload(adapter_names=["nope"]),
    "save_pretrained": lambda m: m.save_pretrained("unused", selected_adapters=["nope"]),
}


@pytest.mark.parametrize("call", list(UNKNOWN_NAME_CALLS))
def test_unknown_adapter_name_is_a_clear_error(two_adapters, call, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = _snapshot(two_adapters)
    with pytest.raises(ValueError, match=r"unknown adapter 'nope'.*\['default', 'other'\]"):
        UNKNOWN_NAME_CALLS[call](two_adapters)
    _assert_unchanged(two_adapters, before)
    assert list(tmp_path.iterdir()) == []


def test_adding_an_existing_adapter_name_is_an_error(two_adapters, tmp_path):
    two_adapters.save_pretrained(tmp_path)
    before = _snapshot(two_adapters)
    with pytest.raises(ValueError, match="'other' already exists"):
        two_adapters.load_adapter(tmp_path / "other", adapter_name="other")
    with pytest.raises(ValueError, match="'other' already exists"):
        two_adapters.add_adapter("other", _config())
    _assert_unchanged(two_adapters, before)


# ---- adapters that do not fit ------------------------------------------------------------------------------

@pytest.fixture
def wide_adapter(tiny_llama, tmp_path):
    """An adapter trained on a wider Llama (hidden 48): its q_proj lora_A is [4, 48], the base expects [4, 32]."""
    wide = fastlora.get_peft_model(tiny_llama(hidden_size=48), _config())
    wide.save_pretrained(tmp_path / "wide")
    return tmp_path / "wide"


def test_from_pretrained_shape_mismatch_names_module_and_shapes_and_undoes_injection(base, wide_adapter):
    before = _snapshot(base)
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj.*\(4, 32\).*\(4, 48\)"):
        fastlora.PeftModel.from_pretrained(base, wide_adapter)
    assert _no_fastlora_modules(base)
    _assert_unchanged(base, before)


def test_load_adapter_shape_mismatch_keeps_previous_adapters(two_adapters, wide_adapter):
    before = _snapshot(two_adapters)
    with pytest.raises(ValueError, match=r"q_proj.*\(4, 32\).*\(4, 48\)"):
        two_adapters.load_adapter(wide_adapter, adapter_name="wide")
    _assert_unchanged(two_adapters, before)
    assert not any(".wide." in k for k in two_adapters.state_dict())


def test_load_adapter_rolls_back_modules_only_the_failed_adapter_wrapped(base, tiny_llama, tmp_path):
    """The failing adapter targets k_proj, which nothing wrapped before: k_proj must be a plain Linear again."""
    wide = fastlora.get_peft_model(tiny_llama(hidden_size=48), _config(target_modules=["k_proj"]))
    wide.save_pretrained(tmp_path)
    model = fastlora.get_peft_model(copy.deepcopy(base), _config()).eval()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="k_proj"):
        model.load_adapter(tmp_path, adapter_name="wide")
    _assert_unchanged(model, before)
    assert type(model.base_model.model.model.layers[0].self_attn.k_proj) is torch.nn.Linear


def test_checkpoint_with_tensors_for_untargeted_modules_is_rejected(base, tmp_path):
    model = fastlora.get_peft_model(copy.deepcopy(base), _config(target_modules=["q_proj", "v_proj", "o_proj"]))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "target_modules": ["q_proj", "v_proj"]}))
    before = _snapshot(base)
    with pytest.raises(ValueError, match="o_proj"):
        fastlora.PeftModel.from_pretrained(base, tmp_path)
    _assert_unchanged(base, before)


def test_checkpoint_missing_tensors_is_rejected(base, tmp_path):
    from safetensors.torch import load_file, save_file

    fastlora.get_peft_model(copy.deepcopy(base), _config()).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    dropped = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del weights[dropped]
    save_file(weights, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    before = _snapshot(base)
    with pytest.raises(ValueError, match=r"lacks.*layers\.1\.self_attn\.v_proj\.lora_B"):
        fastlora.PeftModel.from_pretrained(base, tmp_path)
    _assert_unchanged(base, before)


# ---- bad adapter_config.json -------------------------------------------------------------------------------

BAD_CONFIGS = {
    "missing-peft_type": (lambda c: {k: v for k, v in c.items() if k != "peft_type"}, "no 'peft_type'"),
    "unknown-peft_type": (lambda c: {**c, "peft_type": "NOT_A_METHOD"}, "unknown peft_type 'NOT_A_METHOD'"),
    "r-zero": (lambda c: {**c, "r": 0}, "r must be a positive int"),
    "dropout-one": (lambda c: {**c, "lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
    "not-json": (None, "not valid JSON"),
}


@pytest.fixture
def saved(base, tmp_path):
    fastlora.get_peft_model(copy.deepcopy(base), _config()).save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


@pytest.mark.parametrize("kind", list(BAD_CONFIGS))
def test_bad_adapter_config_is_a_clear_error_and_touches_nothing(base, two_adapters, saved, kind):
    edit, message = BAD_CONFIGS[kind]
    path = saved / "adapter_config.json"
    path.write_text("{not json" if edit is None else json.dumps(edit(json.loads(path.read_text()))))
    before = _snapshot(base)
    with pytest.raises(ValueError, match=message):
        fastlora.PeftModel.from_pretrained(base, saved)
    _assert_unchanged(base, before)
    before = _snapshot(two_adapters)
    with pytest.raises(ValueError, match=message):
        two_adapters.load_adapter(saved, adapter_name="third")
    _assert_unchanged(two_adapters, before)


def test_missing_adapter_files_are_a_clear_error(base, saved):
    (saved / "adapter_model.safetensors").unlink()
    before = _snapshot(base)
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        fastlora.PeftModel.from_pretrained(base, saved)
    _assert_unchanged(base, before)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        fastlora.PeftModel.from_pretrained(base, saved / "no_such_folder")


# ---- damaged weights ---------------------------------------------------------------------------------------

def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _garbage_header(data: bytes) -> bytes:
    # Bytes 8.. hold the JSON header (dtypes, shapes, offsets): overwrite part of it with junk.
    return data[:8] + bytes(range(200, 240)) + data[48:]


def _garbage_length(data: bytes) -> bytes:
    return b"\xff" * 8 + data[8:]  # the little-endian header length, now absurd


CORRUPTIONS = {
    "truncated": _truncate,
    "truncated-to-header": lambda data: data[:6],
    "garbage-header": _garbage_header,
    "garbage-length": _garbage_length,
    "empty": lambda data: b"",
}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS))
def test_corrupted_safetensors_is_a_clear_error_and_touches_nothing(base, two_adapters, saved, corrupt):
    path = saved / "adapter_model.safetensors"
    path.write_bytes(CORRUPTIONS[corrupt](path.read_bytes()))
    before = _snapshot(base)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        fastlora.PeftModel.from_pretrained(base, saved)
    _assert_unchanged(base, before)
    before = _snapshot(two_adapters)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        two_adapters.load_adapter(saved, adapter_name="third")
    _assert_unchanged(two_adapters, before)


# ---- invalid configs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "r must be a positive int, got 0"),
    (dict(r=-2), "r must be a positive int, got -2"),
    (dict(r=2.0), "r must be a positive int"),
    (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be a positive int"),
    (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\), got 1.0"),
    (dict(lora_dropout=-0.1), r"lora_dropout must be in \[0, 1\), got -0.1"),
], ids=["r=0", "r<0", "r-float", "rank_pattern=0", "dropout=1", "dropout<0"])
def test_invalid_lora_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fastlora.LoraConfig(**kwargs)


def test_add_adapter_with_invalid_rank_changes_nothing(two_adapters):
    config = _config()
    config.r = 0  # bypasses the dataclass check: the layer must still refuse it
    before = _snapshot(two_adapters)
    with pytest.raises(ValueError, match="positive int"):
        two_adapters.add_adapter("bad", config)
    _assert_unchanged(two_adapters, before)


# ---- safe_merge ------------------------------------------------------------------------------------------------

def _poison(model, value: float, layer: int = -1) -> None:
    """Put ``value`` into one lora_B of the last layer: earlier layers merge fine, this one must not."""
    with torch.no_grad():
        model.base_model.model.model.layers[layer].self_attn.v_proj.lora_B["default"].weight[0, 0] = value


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("call", ["merge_and_unload", "merge_adapter"])
def test_safe_merge_refuses_nan_or_inf_and_leaves_base_weights(base, call, value):
    model = fastlora.get_peft_model(copy.deepcopy(base), _config()).eval()
    _poison(model, value)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="NaN or Inf"):
        getattr(model, call)(safe_merge=True)
    _assert_unchanged(model, before)  # no layer merged, not even those before the poisoned one


def test_safe_merge_catches_overflow_in_a_half_precision_base(tiny_llama):
    """The merged fp32 weight is finite, but it does not fit in fp16: the merged base would hold Inf."""
    model = fastlora.get_peft_model(tiny_llama().half(), _config()).eval()
    with torch.no_grad():
        model.base_model.model.model.layers[-1].self_attn.v_proj.lora_B["default"].weight.fill_(1e5)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.merge_and_unload(safe_merge=True)
    _assert_unchanged(model, before)
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.merge_adapter(safe_merge=True)
    _assert_unchanged(model, before)
