"""``AutoPeftModel*``: base model and adapter from one local adapter folder.

The base model is read from the adapter config's ``base_model_name_or_path``, here a local folder
written with ``save_pretrained`` (no hub access).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import fastlora

TOL = dict(rtol=1e-5, atol=1e-5)

# name: (task_type, transformers class, fastlora Auto class, expected PeftModel class)
TASKS = {
    "causal-lm": ("CAUSAL_LM", "LlamaForCausalLM", "AutoPeftModelForCausalLM", "PeftModelForCausalLM"),
    "seq2seq-lm": ("SEQ_2_SEQ_LM", "T5ForConditionalGeneration", "AutoPeftModelForSeq2SeqLM", "PeftModelForSeq2SeqLM"),
    "seq-cls": ("SEQ_CLS", "BertForSequenceClassification", "AutoPeftModelForSequenceClassification",
                "PeftModelForSequenceClassification"),
    "token-cls": ("TOKEN_CLS", "BertForTokenClassification", "AutoPeftModelForTokenClassification",
                  "PeftModelForTokenClassification"),
    "question-answering": ("QUESTION_ANS", "BertForQuestionAnswering", "AutoPeftModelForQuestionAnswering",
                           "PeftModelForQuestionAnswering"),
    "feature-extraction": ("FEATURE_EXTRACTION", "BertModel", "AutoPeftModelForFeatureExtraction",
                           "PeftModelForFeatureExtraction"),
}
MODEL_TYPE = {"LlamaForCausalLM": "llama", "T5ForConditionalGeneration": "t5"}


def _base(tiny_config, class_name):
    model_type = MODEL_TYPE.get(class_name, "bert")
    overrides = {"num_labels": 2} if class_name.startswith("Bert") else {}
    torch.manual_seed(0)
    return getattr(transformers, class_name)(tiny_config(model_type, **overrides)).eval()


def _batch(model):
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, model.config.vocab_size, (2, 6), generator=gen)
    batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    if model.config.is_encoder_decoder:
        batch["decoder_input_ids"] = torch.randint(2, model.config.vocab_size, (2, 4), generator=gen)
    return batch


def _out(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return next(out[k] for k in ("logits", "start_logits", "last_hidden_state") if k in out)


def _adapter_folder(tiny_config, tmp_path, task, **config):
    """Save a base model and an adapter trained on it (random B) to tmp_path; returns (peft model, folder)."""
    task_type, class_name, _, _ = TASKS[task]
    base_dir = tmp_path / "base"
    _base(tiny_config, class_name).save_pretrained(base_dir)
    base = getattr(transformers, class_name).from_pretrained(base_dir).eval()
    assert base.name_or_path == str(base_dir)
    model = fastlora.get_peft_model(base, fastlora.LoraConfig(
        task_type=task_type, r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj", "query", "value", "q", "v"],
        **config)).eval()
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    return model, adapter_dir


@pytest.mark.parametrize("task", list(TASKS))
def test_auto_peft_model_for_task_loads_base_and_adapter(task, tiny_config, tmp_path):
    _, class_name, auto_name, peft_name = TASKS[task]
    model, folder = _adapter_folder(tiny_config, tmp_path, task)
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tmp_path / "base")
    loaded = getattr(fastlora, auto_name).from_pretrained(folder)
    assert type(loaded) is getattr(fastlora, peft_name)
    assert type(loaded.get_base_model()).__name__ == class_name
    assert not any(p.requires_grad for p in loaded.parameters())  # frozen for inference by default
    assert not loaded.training
    batch = _batch(model)
    torch.testing.assert_close(_out(loaded, batch), _out(model, batch), **TOL)


@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
def test_generic_auto_peft_model_picks_the_class_from_task_type(task, tiny_config, tmp_path):
    _, class_name, _, peft_name = TASKS[task]
    model, folder = _adapter_folder(tiny_config, tmp_path, task)
    loaded = fastlora.AutoPeftModel.from_pretrained(folder)
    assert type(loaded) is getattr(fastlora, peft_name)
    assert type(loaded.get_base_model()).__name__ == class_name
    batch = _batch(model)
    torch.testing.assert_close(_out(loaded, batch), _out(model, batch), **TOL)


def test_auto_peft_model_adapter_name_and_is_trainable(tiny_config, tmp_path):
    _, folder = _adapter_folder(tiny_config, tmp_path, "causal-lm")
    loaded = fastlora.AutoPeftModelForCausalLM.from_pretrained(folder, adapter_name="mine", is_trainable=True)
    assert loaded.active_adapter == "mine"
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.mine." in n or ".lora_B.mine." in n for n in trainable)


def test_auto_peft_model_passes_dtype_to_the_base_model(tiny_config, tmp_path):
    _, folder = _adapter_folder(tiny_config, tmp_path, "causal-lm")
    loaded = fastlora.AutoPeftModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    q_proj = loaded.get_base_model().model.layers[0].self_attn.q_proj
    assert q_proj.base_layer.weight.dtype == torch.bfloat16
    assert q_proj.lora_A["default"].weight.dtype == torch.float32  # PEFT's autocast_adapter_dtype


def test_auto_class_for_another_task_raises_a_clear_error(tiny_config, tmp_path):
    _, folder = _adapter_folder(tiny_config, tmp_path, "causal-lm")
    with pytest.raises(ValueError, match=r"SEQ_2_SEQ_LM.*CAUSAL_LM.*AutoPeftModelForCausalLM"):
        fastlora.AutoPeftModelForSeq2SeqLM.from_pretrained(folder)


def test_adapter_without_base_model_path_raises_a_clear_error(tiny_llama, tmp_path):
    model = fastlora.get_peft_model(tiny_llama(), fastlora.LoraConfig(task_type="CAUSAL_LM", r=4))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        fastlora.AutoPeftModelForCausalLM.from_pretrained(tmp_path)


def test_auto_peft_model_cannot_be_instantiated_directly():
    with pytest.raises(OSError, match="from_pretrained"):
        fastlora.AutoPeftModelForCausalLM()
