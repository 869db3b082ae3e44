"""Adaption prompt (LLaMA-Adapter) against PEFT on llama (grouped-query attention) and mistral: names,
counts, outputs, generate, checkpoints both ways; the zero gate; one q_proj and one o_proj call per
adapted layer; several adapters; bad input."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import fastlora
from fastlora.methods.adaption_prompt import AdaptedAttention

TOL = dict(rtol=1e-5, atol=1e-5)
CASES = {"llama-gqa": ("llama", {}), "mistral": ("mistral", {}), "llama-bias": ("llama", dict(attention_bias=True))}


def _config(lib, **overrides):
    return lib.AdaptionPromptConfig(**dict(dict(task_type="CAUSAL_LM", adapter_len=5, adapter_layers=2), **overrides))


@pytest.fixture(params=list(CASES))
def pair(request, tiny_model):
    model_type, overrides = CASES[request.param]
    base = tiny_model(model_type, num_hidden_layers=3, **overrides)
    assert base.config.num_key_value_heads < base.config.num_attention_heads
    theirs = peft.get_peft_model(copy.deepcopy(base), _config(peft))
    ours = fastlora.get_peft_model(copy.deepcopy(base), _config(fastlora))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # open the gates (they start at zero) and move the prompts
        for param in theirs.parameters():
            if param.requires_grad:
                param.add_(0.5 * torch.randn(param.shape, generator=gen))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs, base


def _batch():
    ids = torch.randint(2, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return dict(input_ids=ids, attention_mask=mask)


def test_names_counts_and_outputs_match_peft(pair, capsys):
    ours, theirs, base = pair
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    theirs.print_trainable_parameters()
    expected = capsys.readouterr().out
    ours.print_trainable_parameters()
    assert capsys.readouterr().out == expected
    batch = _batch()
    out, ref = ours(**batch, labels=batch["input_ids"]), theirs(**batch, labels=batch["input_ids"])
    torch.testing.assert_close(out.logits, ref.logits, **TOL)
    with torch.no_grad():
        assert not torch.allclose(out.logits, base(**batch).logits, atol=1e-3)
    out.loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in ours.parameters())


def test_greedy_generate_matches_peft(pair):
    ours, theirs, _ = pair
    kwargs = dict(_batch(), max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(ours.generate(**kwargs), theirs.generate(**kwargs), rtol=0, atol=0)


@pytest.mark.parametrize("direction", ["peft_to_fastlora", "fastlora_to_peft"])
def test_checkpoint_loads_both_ways(pair, direction, tmp_path):
    ours, theirs, base = pair
    writer, reader = (theirs, fastlora) if direction == "peft_to_fastlora" else (ours, peft)
    writer.save_pretrained(tmp_path)
    saved, expected = fastlora.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    assert sorted(saved) == sorted(expected)
    loaded = reader.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**_batch()).logits, theirs(**_batch()).logits, **TOL)


def test_loaded_adapter_is_frozen_unless_trainable(pair, tmp_path, peft_at_least):
    ours, _, base = pair
    ours.save_pretrained(tmp_path)
    for is_trainable in (False, True):
        loaded = fastlora.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=is_trainable)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=is_trainable)
        trainable, total = loaded.get_nb_trainable_parameters()
        assert (trainable > 0) == is_trainable and total == theirs.get_nb_trainable_parameters()[1]
        if is_trainable or peft_at_least("0.22"):  # PEFT 0.21 left a loaded adapter trainable
            assert trainable == theirs.get_nb_trainable_parameters()[0]


def test_zero_gate_starts_at_the_base_model(tiny_llama):
    base = tiny_llama()
    model = fastlora.get_peft_model(copy.deepcopy(base), _config(fastlora, adapter_layers=1))
    with torch.no_grad():
        torch.testing.assert_close(model(**_batch()).logits, base(**_batch()).logits, rtol=0, atol=0)


def test_one_q_proj_and_one_o_proj_call_per_adapted_layer(tiny_llama):
    """PEFT runs q_proj and o_proj a second time in each adapted layer; fastlora reuses the attention's."""
    model = fastlora.get_peft_model(tiny_llama(), _config(fastlora, adapter_layers=2))
    calls = []
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "o_proj")):
            module.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    with torch.no_grad():
        model(**_batch())
    assert len(calls) == len(set(calls)) == 4  # 2 layers x (q_proj, o_proj), each once


def test_adapters_switch_disable_and_delete(tiny_llama):
    base = tiny_llama()
    model = fastlora.get_peft_model(copy.deepcopy(base), _config(fastlora, adapter_layers=1))
    model.add_adapter("other", _config(fastlora, adapter_len=3, adapter_layers=2))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.5)
        first = model(**_batch()).logits
        model.set_adapter("other")
        assert sum(isinstance(m, AdaptedAttention) for m in model.modules()) == 2
        second = model(**_batch()).logits
        assert not torch.allclose(first, second)
        with model.disable_adapter():
            torch.testing.assert_close(model(**_batch()).logits, base(**_batch()).logits, rtol=0, atol=0)
        model.delete_adapter("other")
        assert model.active_adapter == "default"
        torch.testing.assert_close(model(**_batch()).logits, first, rtol=0, atol=0)


def test_training_lowers_the_loss(steerable_llama, train_losses):
    model = fastlora.get_peft_model(steerable_llama(), _config(fastlora))
    losses = train_losses(model, dict(_batch(), labels=_batch()["input_ids"]), lr=0.05)
    assert losses[-1] < 0.85 * losses[0], losses


def test_bad_input_is_refused_before_any_change(tiny_llama, tiny_gpt2):
    with pytest.raises(ValueError, match="adapter_len"):
        _config(fastlora, adapter_len=0)
    for base, config, match in [
        (tiny_gpt2(), _config(fastlora), "model types"),
        (tiny_llama(), _config(fastlora, adapter_layers=3), "adapter_layers=3, but the model has 2"),
        (tiny_llama(), _config(fastlora, adapter_len=None), "adapter_len"),
    ]:
        with pytest.raises(ValueError, match=match):
            fastlora.get_peft_model(base, config)
        assert all(p.requires_grad for p in base.parameters())
        assert not any(isinstance(m, AdaptedAttention) for m in base.modules())
