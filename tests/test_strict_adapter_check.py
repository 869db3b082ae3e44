"""``strict_adapter_check`` (PEFT 0.22): what loading does when a checkpoint and the adapter it is loaded
into disagree on tensor names.

fastlora's default is "error" (nothing is loaded); "warn" and "ignore" load the tensors that match, as
PEFT does, and the result is compared with PEFT's own load of the same checkpoint.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastlora
from fastlora.checkpoint import AdapterKeysError

DROPPED = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"


def _config(**overrides):
    kwargs = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, init_lora_weights=False,
                  target_modules=["q_proj", "v_proj"])
    kwargs.update(overrides)
    return fastlora.LoraConfig(**kwargs)


@pytest.fixture
def base(tiny_llama):
    return tiny_llama().eval()


@pytest.fixture
def lacking(base, tmp_path):
    """A saved adapter whose file lacks one lora_B (of layer 1's v_proj); returns (folder, saved tensors).
    Its config asks for PEFT's default init, so a lora_B left as initialized is zeros in either library."""
    fastlora.get_peft_model(copy.deepcopy(base), _config()).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert weights.pop(DROPPED).abs().sum() > 0
    save_file(weights, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "init_lora_weights": True}))
    return tmp_path, weights


@pytest.fixture
def extra(base, tmp_path):
    """A saved adapter with o_proj tensors its config does not target; returns (folder, saved tensors)."""
    fastlora.get_peft_model(copy.deepcopy(base), _config(target_modules=["q_proj", "v_proj", "o_proj"])) \
        .save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "target_modules": ["q_proj", "v_proj"]}))
    return tmp_path, load_file(tmp_path / "adapter_model.safetensors")


def _loaded(model) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's on-disk keys."""
    return fastlora.get_peft_model_state_dict(model)


def _inputs():
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))


def test_default_and_error_load_nothing_and_raise_both_error_types(base, lacking):
    folder, _ = lacking
    for strict in (None, "error"):
        kwargs = {} if strict is None else {"strict_adapter_check": strict}
        with pytest.raises(AdapterKeysError, match=r"lacks.*layers\.1\.self_attn\.v_proj\.lora_B") as info:
            fastlora.PeftModel.from_pretrained(copy.deepcopy(base), folder, **kwargs)
        assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)  # fastlora's, PEFT's


@pytest.mark.parametrize("strict", ["warn", "ignore"])
def test_warn_and_ignore_load_what_matches_and_keep_the_rest(base, lacking, strict):
    folder, saved = lacking
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = fastlora.PeftModel.from_pretrained(copy.deepcopy(base), folder, strict_adapter_check=strict)
    said = [str(w.message) for w in caught if "the checkpoint" in str(w.message)]
    if strict == "warn":
        assert len(said) == 1 and "layers.1.self_attn.v_proj.lora_B" in said[0], said
    else:
        assert said == []
    loaded = _loaded(model)
    assert set(loaded) == set(saved) | {DROPPED}
    for key, value in saved.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)
    assert not loaded[DROPPED].any()  # as initialized (the saved one was not zero)


def test_warn_skips_tensors_the_model_has_no_place_for(base, extra):
    folder, saved = extra
    with pytest.warns(UserWarning, match="no place for.*o_proj"):
        model = fastlora.PeftModel.from_pretrained(copy.deepcopy(base), folder, strict_adapter_check="warn")
    loaded = _loaded(model)
    assert set(loaded) == {k for k in saved if "o_proj" not in k}
    for key, value in loaded.items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=key)


def test_load_adapter_takes_it_too(base, lacking):
    folder, saved = lacking
    model = fastlora.get_peft_model(copy.deepcopy(base), _config())
    with pytest.raises(AdapterKeysError):
        model.load_adapter(folder, adapter_name="other")
    assert list(model.peft_config) == ["default"]
    with pytest.warns(UserWarning, match="lacks"):
        model.load_adapter(folder, adapter_name="other", strict_adapter_check="warn")
    loaded = fastlora.get_peft_model_state_dict(model, adapter_name="other")
    for key, value in saved.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)


def test_a_bad_value_is_refused_before_anything_changes(base, lacking):
    folder, _ = lacking
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="strict_adapter_check must be one of 'error', 'warn', 'ignore', got 'strict'"):
        fastlora.PeftModel.from_pretrained(base, folder, strict_adapter_check="strict")
    assert all(type(m).__module__.startswith("transformers") or type(m).__module__.startswith("torch")
               for m in base.modules())
    for key, value in base.state_dict().items():
        assert torch.equal(value, before[key]), key
    model = fastlora.get_peft_model(copy.deepcopy(base), _config())
    with pytest.raises(ValueError, match="strict_adapter_check must be one of"):
        model.load_adapter(folder, adapter_name="other", strict_adapter_check=True)
    assert list(model.peft_config) == ["default"]
    with pytest.raises(ValueError, match="strict_adapter_check must be one of"):
        fastlora.AutoPeftModelForCausalLM.from_pretrained(folder, strict_adapter_check="WARN")


def test_auto_class_passes_it_on(base, lacking, tmp_path):
    folder, saved = lacking
    base.save_pretrained(tmp_path / "base")
    config_path = folder / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()),
                                       "base_model_name_or_path": str(tmp_path / "base")}))
    with pytest.raises(AdapterKeysError):
        fastlora.AutoPeftModelForCausalLM.from_pretrained(folder)
    with pytest.warns(UserWarning, match="lacks"):
        model = fastlora.AutoPeftModelForCausalLM.from_pretrained(folder, strict_adapter_check="warn")
    loaded = _loaded(model)
    for key, value in saved.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("broken", ["lacking", "extra"])
def test_warn_loads_what_peft_loads(base, broken, peft_at_least, request):
    """The same damaged checkpoint loaded with "warn" by fastlora and by PEFT 0.22: same outputs."""
    if not peft_at_least("0.22"):
        pytest.skip("strict_adapter_check is new in PEFT 0.22")
    import peft

    folder, _ = request.getfixturevalue(broken)
    with pytest.warns(UserWarning):
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder, strict_adapter_check="warn").eval()
    with pytest.warns(UserWarning):
        ours = fastlora.PeftModel.from_pretrained(copy.deepcopy(base), folder, strict_adapter_check="warn").eval()
    ids = _inputs()
    with torch.no_grad():
        expected, got, plain = theirs(ids).logits, ours(ids).logits, base(ids).logits
    assert not torch.allclose(expected, plain)  # the adapter that did load changes the output
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
