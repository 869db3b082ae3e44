"""``get_layer_status`` / ``get_model_status``: field for field what PEFT reports for the same model after
the same steps (two adapters, a modules_to_save head, switching, freezing, merging, disabling), but for
``module_type``, which names each library's own class.

One difference is by choice: disabling adapters leaves their ``requires_grad`` as it was, where PEFT freezes
every adapter tensor and, on enabling, makes the active ones trainable again, also in a model loaded for
inference (PEFT 0.22: 0 trainable tensors before ``with model.disable_adapter():``, 4 after it).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import fastlora

peft = pytest.importorskip("peft")

METHODS = {
    "lora": ("LoraConfig", dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"],
                                init_lora_weights=False)),
    "loha": ("LoHaConfig", dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])),
    "ia3": ("IA3Config", dict(target_modules=["query", "value", "intermediate.dense"],
                              feedforward_modules=["intermediate.dense"], modules_to_save=["classifier"])),
}


def _models(method, base):
    """fastlora's and PEFT's model: "default" on query and value, "other" on query only."""
    class_name, kwargs = METHODS[method]
    other = {**kwargs, "target_modules": ["query"]}
    if method == "ia3":
        other["feedforward_modules"] = []
    models = []
    for lib in (fastlora, peft):
        make = getattr(lib, class_name)
        model = lib.get_peft_model(copy.deepcopy(base), make(task_type="SEQ_CLS", **copy.deepcopy(kwargs)))
        model.add_adapter("other", make(task_type="SEQ_CLS", **copy.deepcopy(other)))
        models.append(model)
    return models


def _fields(status, leave_out=()) -> dict:
    return {k: v for k, v in dataclasses.asdict(status).items() if k not in ("module_type", *leave_out)}


def _same_status(ours, theirs, leave_out=()):
    assert [_fields(s, leave_out) for s in ours.get_layer_status()] == \
        [_fields(s, leave_out) for s in theirs.get_layer_status()]
    assert _fields(ours.get_model_status(), leave_out) == _fields(theirs.get_model_status(), leave_out)
    assert _fields(fastlora.get_model_status(ours)) == _fields(ours.get_model_status())


STEPS = {
    "fresh": lambda m: None,
    "set_adapter": lambda m: m.set_adapter("other"),
    "frozen by set_requires_grad": lambda m: m.set_requires_grad("default", False),
    # the active, trainable adapter's first tensor in its first layer
    "one tensor frozen by hand": lambda m: next(p for n, p in m.named_parameters()
                                                if ".other" in n and "query" in n).requires_grad_(False),
    "merged": lambda m: m.merge_adapter(),
    "unmerged": lambda m: m.unmerge_adapter(),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_status_reports_what_peft_reports_step_by_step(method, tiny_bert_cls):
    ours, theirs = _models(method, tiny_bert_cls())
    for name, step in STEPS.items():
        for model in (ours, theirs):
            step(model)
        _same_status(ours, theirs)
    grads = ours.get_model_status().requires_grad
    for model in (ours, theirs):
        model.base_model.disable_adapter_layers()
    _same_status(ours, theirs, leave_out=("requires_grad", "trainable_params"))  # see the module docstring
    status = ours.get_model_status()
    assert status.enabled is False and status.requires_grad == grads
    assert status.num_adapter_layers == len(ours.get_layer_status()) == 5 + 2 * (method == "ia3")  # query, value in 2 layers, the head


def test_a_hand_frozen_tensor_reads_irregular_and_a_merge_in_one_layer_too(tiny_bert_cls):
    ours, _ = _models("lora", tiny_bert_cls())
    layer = ours.base_model.model.bert.encoder.layer[0].attention.self.query
    layer.lora_A["default"].weight.requires_grad_(False)  # its lora_B still trains
    (status,) = [s for s in ours.get_layer_status() if s.name.endswith("layer.0.attention.self.query")]
    assert status.requires_grad["default"] == "irregular"
    assert ours.get_model_status().requires_grad["default"] == "irregular"
    layer.merge(adapter_names=["default"])
    assert ours.get_model_status().merged_adapters == "irregular"  # merged in one layer, not in the others
    assert status.module_type == "LoraLinear" and status.devices == {"default": ["cpu"], "other": ["cpu"]}


def test_a_4bit_base_is_named_and_models_without_layers_are_refused(tiny_llama):
    model = fastlora.get_peft_model(fastlora.quantize_model(tiny_llama()), fastlora.LoraConfig(r=4,
                                                                                               target_modules=["q_proj"]))
    assert model.get_model_status().quantization_backend == "fastlora nf4"
    assert fastlora.get_model_status(model.base_model.model).adapter_model_type == "None"
    with pytest.raises(ValueError, match="no adapter layers"):
        fastlora.get_layer_status(tiny_llama())
    prompt = fastlora.get_peft_model(tiny_llama(), fastlora.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                               num_virtual_tokens=2))
    with pytest.raises(TypeError, match="PROMPT_TUNING"):
        prompt.get_model_status()
    assert torch.is_grad_enabled()
