"""fastlora's warnings name the user's line (``fastlora._warn``): whatever depth of fastlora, torch and
transformers frames lies between, the file and line a warning reports are the caller's, here this test's.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastlora

HERE = __file__


def _caught(call):
    """Run ``call``; the fastlora warnings it raised (message, filename, line)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [w for w in caught if "fastlora" in str(w.message) or issubclass(w.category, UserWarning)]


def _only(caught, text):
    found = [w for w in caught if text in str(w.message)]
    assert len(found) == 1, [str(w.message) for w in caught]
    return found[0]


@pytest.fixture
def lacking(tiny_llama, tmp_path):
    """A saved adapter (and its base, for AutoPeftModel) whose file lacks one tensor."""
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    import transformers

    base = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    model = fastlora.get_peft_model(base, fastlora.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"]))
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    weights = load_file(folder / "adapter_model.safetensors")
    weights.pop(next(iter(weights)))
    save_file(weights, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return folder


def test_a_partial_load_warns_at_the_callers_line(lacking, tiny_llama):
    def load():  # through torch.no_grad's wrapper
        fastlora.PeftModel.from_pretrained(tiny_llama(), lacking, strict_adapter_check="warn")

    w = _only(_caught(load), "the checkpoint lacks")
    assert (w.filename, w.lineno) == (HERE, load.__code__.co_firstlineno + 1)

    def auto():  # one frame more
        fastlora.AutoPeftModelForCausalLM.from_pretrained(lacking, strict_adapter_check="warn")

    w = _only(_caught(auto), "the checkpoint lacks")
    assert (w.filename, w.lineno) == (HERE, auto.__code__.co_firstlineno + 1)


def test_unknown_config_keys_warn_at_the_callers_line(tiny_llama, tmp_path):
    model = fastlora.get_peft_model(tiny_llama(), fastlora.LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "a_key_from_the_future": 1}))

    def config():
        fastlora.PeftConfig.from_pretrained(tmp_path)

    def adapter():
        fastlora.PeftModel.from_pretrained(tiny_llama(), tmp_path)

    for call in (config, adapter):
        w = _only(_caught(call), "a_key_from_the_future")
        assert (w.filename, w.lineno) == (HERE, call.__code__.co_firstlineno + 1)


def test_injection_and_forward_warnings_name_the_callers_line(tiny_gpt2, tiny_llama):
    def inject():
        fastlora.get_peft_model(tiny_gpt2(), fastlora.LoraConfig(r=4, target_modules=["h.0.attn.c_attn"]))

    w = _only(_caught(inject), "is a Conv1D")
    assert (w.filename, w.lineno) == (HERE, inject.__code__.co_firstlineno + 1)

    model = fastlora.get_peft_model(tiny_llama(), fastlora.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                              num_virtual_tokens=2))
    ids = torch.tensor([[1, 2, 3]])

    def forward():  # through nn.Module.__call__ and PeftModel's forward
        model(input_ids=ids, position_ids=torch.arange(3)[None])

    w = _only(_caught(forward), "position_ids are ignored")
    assert (w.filename, w.lineno) == (HERE, forward.__code__.co_firstlineno + 1)


def test_once_per_line_of_the_users_code_under_the_default_filter(tiny_gpt2):
    """Under Python's default filter a warning shows once per reported location: with the user's line as
    that location, two lines of user code that do the same thing each hear about it."""
    config = fastlora.LoraConfig(r=4, target_modules=["h.0.attn.c_attn"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for _ in range(2):
            fastlora.get_peft_model(tiny_gpt2(), copy.deepcopy(config))  # one line, twice: one warning
        fastlora.get_peft_model(tiny_gpt2(), copy.deepcopy(config))  # another line: one more
    lines = [w.lineno for w in caught if "is a Conv1D" in str(w.message)]
    assert len(lines) == 2 and len(set(lines)) == 2
