"""``PeftModel.set_requires_grad`` and ``active_peft_config`` (PEFT 0.17's): which tensors train after each
step of a session with two adapters must be what PEFT says, name for name, for LoRA (with a
modules_to_save head), LoHa and IA3.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastlora

peft = pytest.importorskip("peft")

METHODS = {
    "lora": ("LoraConfig", dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])),
    "loha": ("LoHaConfig", dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])),
    "ia3": ("IA3Config", dict(target_modules=["query", "value", "intermediate.dense"],
                              feedforward_modules=["intermediate.dense"], modules_to_save=["classifier"])),
}
# (adapter names, requires_grad) in order, then set_adapter between them as a user would.
STEPS = [("other", True), ("default", False), (["default", "other"], True), ("other", False), ("set_adapter", "other"),
         ("default", True)]


def _trainable(model) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def _models(method, base):
    class_name, kwargs = METHODS[method]
    models = []
    for lib in (fastlora, peft):
        config = getattr(lib, class_name)(task_type="SEQ_CLS", **copy.deepcopy(kwargs))
        model = lib.get_peft_model(copy.deepcopy(base), config)
        model.add_adapter("other", getattr(lib, class_name)(task_type="SEQ_CLS", **copy.deepcopy(kwargs)))
        models.append(model)
    return models


@pytest.mark.parametrize("method", list(METHODS))
def test_set_requires_grad_trains_what_peft_trains(method, tiny_bert_cls):
    ours, theirs = _models(method, tiny_bert_cls())
    assert _trainable(ours) == _trainable(theirs)
    for names, value in STEPS:
        for model in (ours, theirs):
            if names == "set_adapter":
                model.set_adapter(value)
            else:
                model.set_requires_grad(names, requires_grad=value)
        assert _trainable(ours) == _trainable(theirs), (names, value)
        assert ours.active_adapters == theirs.active_adapters
    assert ours.active_peft_config is ours.peft_config["other"]
    assert theirs.active_peft_config is theirs.peft_config["other"]


def test_of_two_active_adapters_only_the_unfrozen_one_gets_gradients(tiny_llama):
    config = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = fastlora.get_peft_model(tiny_llama(), fastlora.LoraConfig(**config))
    model.add_adapter("other", fastlora.LoraConfig(**config))
    model.base_model.set_adapter(["default", "other"])  # both run in the forward
    model.set_requires_grad("default", False)
    model.set_requires_grad("other")
    assert model.active_adapters == ["default", "other"]  # what runs did not change
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if ".lora_" in name}
    assert all((g is None) == (".default." in name) for name, g in grads.items()), \
        {name: g is None for name, g in grads.items()}
    assert any(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_bad_names_and_methods_are_refused(tiny_bert_cls, tiny_llama):
    ours, _ = _models("lora", tiny_bert_cls())
    before = _trainable(ours)
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        ours.set_requires_grad(["other", "nope"])
    assert _trainable(ours) == before  # nothing changed, also not "other"
    prompt = fastlora.get_peft_model(tiny_llama(), fastlora.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                               num_virtual_tokens=2))
    with pytest.raises(TypeError, match="not supported for PROMPT_TUNING"):
        prompt.set_requires_grad("default")
    assert prompt.active_peft_config.num_virtual_tokens == 2
