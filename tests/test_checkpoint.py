"""Adapter checkpoints in PEFT's format, written atomically.

What PEFT writes is the reference: the same file names, the same tensor keys (adapter name stripped),
the same folder layout for several adapters, safetensors metadata ``{"format": "pt"}``.
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import peft
import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import fastlora

TOL = dict(rtol=1e-5, atol=1e-5)


def _config(lib, **overrides):
    kwargs = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, init_lora_weights=False,
                  target_modules=["q_proj", "v_proj", "down_proj"])
    kwargs.update(overrides)
    return lib.LoraConfig(**kwargs)


def _batch(model):
    gen = torch.Generator().manual_seed(0)
    return dict(input_ids=torch.randint(2, model.config.vocab_size, (2, 6), generator=gen))


def _out(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _keys(folder) -> set[str]:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as fh:
        return set(fh.keys())


def _listing(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, dirs, files in os.walk(folder) for name in dirs + files)


@pytest.fixture
def base(tiny_llama):
    return tiny_llama().eval()


def test_folder_holds_peft_files_with_pt_metadata(base, tmp_path):
    model = fastlora.get_peft_model(copy.deepcopy(base), _config(fastlora))
    model.save_pretrained(tmp_path)
    assert _listing(tmp_path) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as fh:
        assert fh.metadata() == {"format": "pt"}
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["task_type"] == "CAUSAL_LM"
    assert saved["r"] == 4 and saved["lora_alpha"] == 8
    assert saved["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert saved["inference_mode"] is True  # as PEFT writes it
    assert model.peft_config["default"].inference_mode is False  # saving does not change the live model
    # PEFT's own config class reads it.
    assert peft.PeftConfig.from_pretrained(str(tmp_path)).r == 4


@pytest.mark.parametrize("adapter_name", ["default", "mine"])
def test_saved_keys_and_tensors_equal_peft(base, tmp_path, adapter_name):
    fl_model = fastlora.get_peft_model(copy.deepcopy(base), _config(fastlora), adapter_name=adapter_name)
    pf_model = peft.get_peft_model(copy.deepcopy(base), _config(peft), adapter_name=adapter_name)
    fl_model.load_state_dict(pf_model.state_dict())
    fl_model.save_pretrained(tmp_path / "fl")
    pf_model.save_pretrained(tmp_path / "pf")
    sub = "" if adapter_name == "default" else adapter_name  # PEFT puts non-default adapters in sub-folders
    keys = _keys(tmp_path / "fl" / sub)
    assert keys == _keys(tmp_path / "pf" / sub)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert not any(f".{adapter_name}." in k for k in keys)
    fl_state = fastlora.get_peft_model_state_dict(fl_model, adapter_name=adapter_name)
    pf_state = peft.get_peft_model_state_dict(pf_model, adapter_name=adapter_name)
    assert fl_state.keys() == pf_state.keys()
    for key in fl_state:
        assert torch.equal(fl_state[key], pf_state[key]), key


def test_several_adapters_root_and_subfolders(base, tmp_path):
    model = fastlora.get_peft_model(copy.deepcopy(base), _config(fastlora))
    model.add_adapter("b", _config(fastlora, r=2))
    model.add_adapter("c", _config(fastlora, r=3, target_modules=["o_proj"]))
    model.save_pretrained(tmp_path)
    assert _listing(tmp_path) == [
        "adapter_config.json", "adapter_model.safetensors",
        "b", "b/adapter_config.json", "b/adapter_model.safetensors",
        "c", "c/adapter_config.json", "c/adapter_model.safetensors",
    ]
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["r"] == 3
    assert all(".o_proj." in k for k in _keys(tmp_path / "c"))

    model.save_pretrained(tmp_path / "only_b", selected_adapters=["b"])
    assert _listing(tmp_path / "only_b") == ["b", "b/adapter_config.json", "b/adapter_model.safetensors"]


def test_round_trip_restores_outputs(base, tmp_path):
    model = fastlora.get_peft_model(copy.deepcopy(base), _config(fastlora)).eval()
    model.save_pretrained(tmp_path)
    loaded = fastlora.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    batch = _batch(base)
    torch.testing.assert_close(_out(loaded, batch), _out(model, batch), **TOL)


@pytest.mark.parametrize("writer", ["fastlora", "peft"])
def test_legacy_bin_checkpoints_load_both_ways(base, tmp_path, writer):
    writer_lib, reader_lib = (fastlora, peft) if writer == "fastlora" else (peft, fastlora)
    model = writer_lib.get_peft_model(copy.deepcopy(base), _config(writer_lib)).eval()
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    assert not (tmp_path / "adapter_model.safetensors").exists()
    loaded = reader_lib.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    batch = _batch(base)
    torch.testing.assert_close(_out(loaded, batch), _out(model, batch), **TOL)


def test_peft_written_config_loads_without_unknown_key_warnings(base, tmp_path):
    peft.get_peft_model(copy.deepcopy(base), _config(peft)).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*unknown config keys.*")
        config = fastlora.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, fastlora.LoraConfig) and config.r == 4


def test_unknown_config_keys_are_tolerated_with_a_warning(base, tmp_path):
    model = fastlora.get_peft_model(copy.deepcopy(base), _config(fastlora)).eval()
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "some_future_field": 3}))
    with pytest.warns(UserWarning, match="some_future_field"):
        loaded = fastlora.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    batch = _batch(base)
    torch.testing.assert_close(_out(loaded, batch), _out(model, batch), **TOL)


# ---- atomic writes: a crash leaves the old adapter or nothing loadable, never a mix ---------------------

class Crash(RuntimeError):
    pass


def _truncating_save_file(tensors, filename, metadata=None):
    """Writes half of a real safetensors file, then dies: a crash in the middle of the write."""
    data = safetensors.torch.save(tensors, metadata=metadata)
    with open(filename, "wb") as fh:
        fh.write(data[: len(data) // 2])
    raise Crash("killed while writing")


def _failing_replace_on_call(n):
    real_replace = os.replace
    calls = []

    def replace(src, dst, *args, **kwargs):
        calls.append(dst)
        if len(calls) == n:
            raise Crash(f"killed at os.replace #{n} ({os.path.basename(dst)})")
        return real_replace(src, dst, *args, **kwargs)

    return replace


CRASHES = {
    "save_file-raises": lambda mp: mp.setattr(safetensors.torch, "save_file", lambda *a, **k: (_ for _ in ()).throw(Crash("disk full"))),
    "save_file-half-written": lambda mp: mp.setattr(safetensors.torch, "save_file", _truncating_save_file),
    "replace-1": lambda mp: mp.setattr(os, "replace", _failing_replace_on_call(1)),
    "replace-2": lambda mp: mp.setattr(os, "replace", _failing_replace_on_call(2)),
    "replace-3": lambda mp: mp.setattr(os, "replace", _failing_replace_on_call(3)),
}


@pytest.mark.parametrize("crash", list(CRASHES))
def test_crash_during_save_never_leaves_a_mixed_adapter(base, tmp_path, monkeypatch, crash):
    batch = _batch(base)
    old = fastlora.get_peft_model(copy.deepcopy(base), _config(fastlora)).eval()
    old.save_pretrained(tmp_path)
    old_out = _out(old, batch)
    old_listing = _listing(tmp_path)
    # Same shapes, other weights and another lora_alpha: a new config over old weights (or the other
    # way round) would load without error but give outputs of neither adapter.
    torch.manual_seed(123)
    new = fastlora.get_peft_model(copy.deepcopy(base), _config(fastlora, lora_alpha=32)).eval()
    new_out = _out(new, batch)
    assert not torch.allclose(old_out, new_out)

    with monkeypatch.context() as mp:
        CRASHES[crash](mp)
        with pytest.raises(Crash):
            new.save_pretrained(tmp_path)

    assert set(_listing(tmp_path)) <= set(old_listing), "temporary files were left behind"
    try:
        loaded = fastlora.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    except (FileNotFoundError, ValueError):
        assert not (tmp_path / "adapter_config.json").exists()  # nothing loadable, and clearly so
        return
    torch.testing.assert_close(_out(loaded, batch), old_out, **TOL)


@pytest.mark.parametrize("crash", ["save_file-raises", "save_file-half-written"])
def test_crash_while_writing_weights_keeps_the_old_adapter_loadable(base, tmp_path, monkeypatch, crash):
    batch = _batch(base)
    old = fastlora.get_peft_model(copy.deepcopy(base), _config(fastlora)).eval()
    old.save_pretrained(tmp_path)
    torch.manual_seed(123)
    new = fastlora.get_peft_model(copy.deepcopy(base), _config(fastlora)).eval()
    with monkeypatch.context() as mp:
        CRASHES[crash](mp)
        with pytest.raises(Crash):
            new.save_pretrained(tmp_path)
    loaded = fastlora.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(_out(loaded, batch), _out(old, batch), **TOL)


def test_overwriting_an_adapter_replaces_it_and_leaves_no_temporary_files(base, tmp_path):
    batch = _batch(base)
    fastlora.get_peft_model(copy.deepcopy(base), _config(fastlora)).save_pretrained(tmp_path)
    torch.manual_seed(123)
    new = fastlora.get_peft_model(copy.deepcopy(base), _config(fastlora, lora_alpha=32)).eval()
    new.save_pretrained(tmp_path)
    assert _listing(tmp_path) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = fastlora.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(_out(loaded, batch), _out(new, batch), **TOL)
