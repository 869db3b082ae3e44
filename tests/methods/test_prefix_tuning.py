"""Prefix tuning specifics: the cache it builds (grouped-query attention), sizes that do not fit the model,
zero init, position ids."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from transformers import DynamicCache

import fastlora


def test_prefix_cache_has_the_models_key_value_shape(tiny_llama):
    model = fastlora.get_peft_model(tiny_llama(), fastlora.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                              num_virtual_tokens=5))
    config = model.peft_config["default"]
    # GQA: 2 KV heads of size 8 (hidden 32 / 4 heads), so the prefix is 16 wide per key / value
    assert (config.num_attention_heads, config.token_dim, config.num_layers) == (2, 16, 2)
    assert tuple(model.prompt_encoder["default"].embedding.weight.shape) == (5, 2 * 2 * 16)
    cache = model.prompt_encoder.prefix_cache(batch_size=3, dtype=torch.float32)
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 5
    assert [tuple(layer.keys.shape) for layer in cache.layers] == [(3, 2, 5, 8)] * 2


@pytest.mark.parametrize("overrides, match", [
    (dict(num_layers=3), "num_layers=3, but the model has 2 layers"),
    (dict(token_dim=30), "not a multiple"),
    (dict(token_dim=64, num_attention_heads=4), "heads of size 8"),
])
def test_sizes_that_do_not_fit_are_refused_before_any_change(tiny_gpt2, overrides, match):
    base = tiny_gpt2()
    with pytest.raises(ValueError, match=match):
        fastlora.get_peft_model(base, fastlora.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                                  **overrides))
    assert all(p.requires_grad for p in base.parameters())


@pytest.mark.parametrize("projection", [False, True])
def test_zero_init_matches_peft(tiny_llama, projection):
    kwargs = dict(task_type="CAUSAL_LM", num_virtual_tokens=3, init_weights="zero", prefix_projection=projection)
    ours = fastlora.get_peft_model(tiny_llama(), fastlora.PrefixTuningConfig(**kwargs))
    theirs = peft.get_peft_model(tiny_llama(), peft.PrefixTuningConfig(**kwargs))
    assert not fastlora.get_peft_model_state_dict(ours)["prompt_embeddings"].any()
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())


def test_position_ids_move_by_the_prefix_as_in_peft(tiny_llama):
    base = tiny_llama()
    kwargs = dict(task_type="CAUSAL_LM", num_virtual_tokens=3)
    ours = fastlora.get_peft_model(copy.deepcopy(base), fastlora.PrefixTuningConfig(**kwargs))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(**kwargs))
    ours.load_state_dict(theirs.state_dict())
    ids = torch.randint(2, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(6).expand(2, -1)
    with torch.no_grad():
        out = ours(input_ids=ids, position_ids=positions).logits
        torch.testing.assert_close(out, theirs(input_ids=ids, position_ids=positions).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)  # same numbering


def test_gradient_checkpointing_is_refused_before_any_change(tiny_llama):
    base = tiny_llama()
    base.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        fastlora.get_peft_model(base, fastlora.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert all(p.requires_grad for p in base.parameters())
