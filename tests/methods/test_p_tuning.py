"""P-tuning specifics: the MLP / LSTM heads, and what a saved adapter (the heads' output) loads into."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import fastlora


def _config(lib, **kwargs):
    return lib.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16, **kwargs)


def test_mlp_ignores_encoder_num_layers_with_a_warning(tiny_llama):
    with pytest.warns(UserWarning, match="encoder_num_layers"):
        model = fastlora.get_peft_model(tiny_llama(), _config(fastlora, encoder_num_layers=4))
    linears = [m for m in model.prompt_encoder["default"].mlp_head if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(16, 32), (16, 16), (32, 16)]


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_trainable_reload_keeps_the_saved_output_and_trains_it(tiny_llama, tmp_path, kind):
    """A saved p-tuning adapter holds the heads' output only. Loaded for training, fastlora trains that
    output directly (PEFT would load it under a fresh head and change the model's output)."""
    base = tiny_llama()
    trained = fastlora.get_peft_model(copy.deepcopy(base), _config(fastlora, encoder_reparameterization_type=kind))
    trained.save_pretrained(tmp_path)
    ids = torch.randint(2, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
    model = fastlora.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    encoder = model.prompt_encoder["default"]
    assert not encoder.has_head and encoder.embedding.weight.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert encoder.embedding.weight.grad is not None


def test_inference_load_matches_peft(tiny_llama, tmp_path):
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), _config(peft, encoder_reparameterization_type="LSTM"))
    theirs.save_pretrained(tmp_path)
    ours = fastlora.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.__class__.from_pretrained(
        copy.deepcopy(base), tmp_path).named_parameters()]  # no heads: only embedding.weight


def test_bad_encoder_settings_are_refused():
    with pytest.raises(ValueError, match="MLP or LSTM"):
        _config(fastlora, encoder_reparameterization_type="GRU")
    with pytest.raises(ValueError, match="encoder_dropout"):
        _config(fastlora, encoder_dropout=1.0)
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        fastlora.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=0)
