"""Prompt tuning's initialisations (TEXT from a tokenizer folder or object, SAMPLE_VOCAB, RANDOM) and its
config checks, against PEFT where PEFT defines the result."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch

import fastlora

VOCAB = 128
TEXT = "w5 w9 w17"


@pytest.fixture
def tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary (w0 ... w127), built in code."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0")


@pytest.fixture
def tokenizer_dir(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    return str(tmp_path / "tok")


def _text_config(lib, tokenizer, virtual=7, **kwargs):
    return lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual,
                                  prompt_tuning_init="TEXT", prompt_tuning_init_text=TEXT,
                                  tokenizer_name_or_path=tokenizer, **kwargs)


@pytest.mark.parametrize("virtual", [2, 3, 7])  # cut, exact, repeated
def test_text_init_matches_peft(tiny_llama, tokenizer_dir, virtual):
    base = tiny_llama()
    ours = fastlora.get_peft_model(copy.deepcopy(base), _text_config(fastlora, tokenizer_dir, virtual))
    theirs = peft.get_peft_model(copy.deepcopy(base), _text_config(peft, tokenizer_dir, virtual))
    weight = ours.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(weight, theirs.prompt_encoder["default"].embedding.weight, rtol=0, atol=0)
    ids = ([5, 9, 17] * 3)[:virtual]
    torch.testing.assert_close(weight, base.get_input_embeddings().weight[ids], rtol=0, atol=0)
    assert weight.requires_grad and weight.dtype == torch.float32


def test_text_init_takes_a_tokenizer_object_and_saves_its_name(tiny_llama, tokenizer, tokenizer_dir, tmp_path):
    tokenizer.name_or_path = tokenizer_dir
    model = fastlora.get_peft_model(tiny_llama(), _text_config(fastlora, tokenizer, 4))
    ids = [5, 9, 17, 5]
    torch.testing.assert_close(model.prompt_encoder["default"].embedding.weight,
                               model.get_input_embeddings().weight[ids], rtol=0, atol=0)
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["tokenizer_name_or_path"] == tokenizer_dir
    assert isinstance(peft.PeftConfig.from_pretrained(tmp_path / "adapter"), peft.PromptTuningConfig)


def test_sample_vocab_init_takes_rows_of_the_vocabulary(tiny_llama):
    base = tiny_llama()
    model = fastlora.get_peft_model(base, fastlora.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init="SAMPLE_VOCAB"))
    vocab = model.get_input_embeddings().weight
    for row in model.prompt_encoder["default"].embedding.weight:
        assert (vocab == row).all(dim=1).any()


def test_seq2seq_prompt_has_a_row_block_per_submodule(tiny_t5):
    model = fastlora.get_peft_model(tiny_t5(), fastlora.PromptTuningConfig(task_type="SEQ_2_SEQ_LM",
                                                                           num_virtual_tokens=3))
    assert model.peft_config["default"].num_transformer_submodules == 2
    assert tuple(model.prompt_encoder["default"].embedding.weight.shape) == (6, 32)


def test_text_init_errors_come_first(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        fastlora.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prompt_tuning_init="TEXT",
                                    prompt_tuning_init_text="hello")
    with pytest.raises(ValueError, match="prompt_tuning_init_text"):
        fastlora.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prompt_tuning_init="TEXT",
                                    tokenizer_name_or_path="somewhere")
    with pytest.raises(ValueError, match="tokenizer_kwargs"):
        fastlora.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, tokenizer_kwargs={"a": 1})
    with pytest.raises(ValueError, match="prompt_tuning_init must be one of"):
        fastlora.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prompt_tuning_init="ZEROS")
    # a tokenizer folder that is not there: refused before the model is frozen
    base = tiny_llama()
    config = _text_config(fastlora, str(tmp_path / "missing"), 3)
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        fastlora.get_peft_model(base, config)
    assert all(p.requires_grad for p in base.parameters())
