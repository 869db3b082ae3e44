"""``fastlora.functional`` against ``peft.functional``: ``set_training`` (one adapter's dropout off while the
model trains) and ``set_requires_grad`` on the same models give the same modes, outputs and trainable
tensors; and an adapter's dropout follows its own module's mode, also for an adapter added to a model in
eval mode.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastlora
from fastlora import functional

peft = pytest.importorskip("peft")
peft_functional = pytest.importorskip("peft.functional")

CONFIG = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"],
              init_lora_weights=False)
IDS = torch.tensor([[1, 2, 3, 4, 5, 6]])


def _pair(base):
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**CONFIG))
    ours = fastlora.get_peft_model(copy.deepcopy(base), fastlora.LoraConfig(**CONFIG))
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _modes(model) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules() if ".lora_dropout." in name}  # per adapter


def _logits(model):
    return model(input_ids=IDS).logits


def test_set_training_turns_one_adapters_dropout_off_as_peft_does(tiny_llama):
    ours, theirs = _pair(tiny_llama())
    with torch.no_grad():
        eval_out = [_logits(m.eval()) for m in (ours, theirs)]
        for model in (ours, theirs):
            model.train()
        assert not torch.equal(_logits(ours), _logits(ours))  # dropout 0.5 is on: two draws differ
        functional.set_training(ours, "default", False)
        peft_functional.set_training(theirs, "default", False)
        assert _modes(ours) == _modes(theirs) and not any(_modes(ours).values())
        assert ours.training and ours.base_model.model.model.layers[0].self_attn.q_proj.training
        for model, expected in zip((ours, theirs), eval_out):
            torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)  # no dropout left
        ours.train()  # sets every module again
        assert all(_modes(ours).values())


def test_an_adapter_added_in_eval_mode_drops_nothing(tiny_llama):
    ours = fastlora.get_peft_model(tiny_llama().eval(), fastlora.LoraConfig(**CONFIG))
    ours.add_adapter("other", fastlora.LoraConfig(**CONFIG))
    ours.set_adapter("other")
    with torch.no_grad():
        assert torch.equal(_logits(ours), _logits(ours))
    assert not any(_modes(ours).values())


def test_set_requires_grad_on_a_model_trains_what_peft_trains(tiny_llama):
    ours, theirs = _pair(tiny_llama())
    for lib, model in ((fastlora, ours), (peft, theirs)):
        model.add_adapter("other", lib.LoraConfig(**CONFIG))
    functional.set_requires_grad(ours, "other")
    peft_functional.set_requires_grad(theirs, "other")
    trainable = lambda m: [n for n, p in m.named_parameters() if p.requires_grad]  # noqa: E731
    assert trainable(ours) == trainable(theirs) and any(".other." in n for n in trainable(ours))
    functional.set_requires_grad(ours.get_base_model(), ["default", "other"], False)  # a plain transformers model
    peft_functional.set_requires_grad(theirs.get_base_model(), ["default", "other"], False)
    assert trainable(ours) == trainable(theirs) == []


def test_unknown_adapter_names_change_nothing(tiny_llama):
    ours, _ = _pair(tiny_llama())
    ours.train()
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        functional.set_training(ours, ["default", "nope"], False)
    assert all(_modes(ours).values())
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        functional.set_requires_grad(ours, ["nope"], False)
    assert all(p.requires_grad for n, p in ours.named_parameters() if ".lora_" in n)
