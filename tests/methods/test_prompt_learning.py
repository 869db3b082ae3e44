"""Prompt learning against the real PEFT: every method on every task type it supports, same names, same
outputs for the same learned tensors, same saved tensors, checkpoints both ways, same greedy generate.

Both libraries wrap deep copies of one config-built base model; PEFT's adapter tensors are moved off
their initial values (seeded noise) and copied into fastlora by state-dict key, so any difference in
outputs is the libraries' and not their initialisation.
"""

from __future__ import annotations

import copy
import inspect

import peft
import pytest
import torch
import transformers

import fastlora

TOL = dict(rtol=1e-5, atol=1e-5)

METHODS = {
    "prompt": ("PromptTuningConfig", dict(num_virtual_tokens=4)),
    "ptuning-mlp": ("PromptEncoderConfig", dict(num_virtual_tokens=4, encoder_hidden_size=16)),
    "ptuning-lstm": ("PromptEncoderConfig", dict(num_virtual_tokens=3, encoder_hidden_size=8,
                                                 encoder_reparameterization_type="LSTM")),
    "prefix": ("PrefixTuningConfig", dict(num_virtual_tokens=4)),
    "prefix-proj": ("PrefixTuningConfig", dict(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16)),
    "multitask": ("MultitaskPromptTuningConfig", dict(num_virtual_tokens=4, num_tasks=3, num_ranks=2)),
}


def _llama_cls(tiny_config):
    config = tiny_config("llama", num_labels=3, pad_token_id=0)
    return transformers.LlamaForSequenceClassification(config)


MODELS = {
    # (builder, task type); llama uses grouped-query attention (4 heads, 2 KV heads)
    "llama-gqa": (lambda f: f["tiny_llama"](), "CAUSAL_LM"),
    "gpt2": (lambda f: f["tiny_gpt2"](), "CAUSAL_LM"),
    "t5": (lambda f: f["tiny_t5"](), "SEQ_2_SEQ_LM"),
    "bert-seqcls": (lambda f: f["tiny_bert_cls"](), "SEQ_CLS"),
    "llama-tokcls": (lambda f: _seeded(transformers.LlamaForTokenClassification(
        f["tiny_config"]("llama", num_labels=3, pad_token_id=0))), "TOKEN_CLS"),
}
# The full grid on the causal models, the main methods elsewhere (the rest runs the same code).
CASES = [(m, k) for m in ("llama-gqa", "gpt2") for k in METHODS]
CASES += [(m, k) for m in ("t5", "bert-seqcls", "llama-tokcls")
          for k in ("prompt", "ptuning-mlp", "prefix", "multitask")]


def _seeded(model):
    torch.manual_seed(0)
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.2)
    return model.float().eval()


@pytest.fixture
def factories(tiny_llama, tiny_gpt2, tiny_t5, tiny_bert_cls, tiny_config):
    return dict(tiny_llama=tiny_llama, tiny_gpt2=tiny_gpt2, tiny_t5=tiny_t5, tiny_bert_cls=tiny_bert_cls,
                tiny_config=tiny_config)


def build_pair(base, task_type, method, **overrides):
    """(fastlora model, PEFT model, base copy) carrying the same, non-initial adapter tensors."""
    name, kwargs = METHODS[method]
    kwargs = dict(kwargs, task_type=task_type, **overrides)
    theirs = peft.get_peft_model(copy.deepcopy(base), getattr(peft, name)(**kwargs))
    ours = fastlora.get_peft_model(copy.deepcopy(base), getattr(fastlora, name)(**kwargs))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in theirs.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not missing and not unexpected
    return ours, theirs


def make_batch(model, method, labels=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    config = model.config
    input_ids = torch.randint(2, config.vocab_size, (2, 7), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0
    batch = dict(input_ids=input_ids, attention_mask=attention_mask)
    if METHODS[method][0].startswith("Multitask"):
        batch["task_ids"] = torch.tensor([0, 2])
    if config.is_encoder_decoder:
        target = torch.randint(2, config.vocab_size, (2, 5), generator=gen)
        batch.update(labels=target) if labels else batch.update(decoder_input_ids=target)
    elif labels:
        kind = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__
        if kind.endswith("SequenceClassification"):
            batch["labels"] = torch.tensor([0, 2])
        elif kind.endswith("TokenClassification"):
            batch["labels"] = torch.randint(0, 3, (2, 7), generator=gen)
        else:
            batch["labels"] = input_ids.clone()
    return batch


def peft_forward(model, batch):
    """PEFT's forward, or None where PEFT cannot run it: PEFT 0.21 looks for ``past_key_values`` in the
    model's forward to do prefix tuning, and transformers 5.24 renamed it ``cache``."""
    try:
        return model(**batch)
    except ValueError as err:
        if "does not support past key values" not in str(err):
            raise
        return None


@pytest.fixture(params=CASES, ids=[f"{m}-{k}" for m, k in CASES])
def case(request, factories):
    model_name, method = request.param
    build, task_type = MODELS[model_name]
    base = build(factories)
    if model_name == "llama-gqa":
        assert base.config.num_key_value_heads < base.config.num_attention_heads, "the Llama case must use GQA"
    return dict(base=base, task_type=task_type, method=method, model=model_name)


def test_same_parameter_names_and_counts_as_peft(case, capsys):
    ours, theirs = build_pair(case["base"], case["task_type"], case["method"])
    assert list(dict(ours.named_parameters())) == list(dict(theirs.named_parameters()))
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == \
        [n for n, p in theirs.named_parameters() if p.requires_grad]
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    theirs.print_trainable_parameters()
    expected = capsys.readouterr().out
    ours.print_trainable_parameters()
    assert capsys.readouterr().out == expected


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_outputs_match_peft(case):
    ours, theirs = build_pair(case["base"], case["task_type"], case["method"])
    batch = make_batch(ours, case["method"])
    out = ours(**batch)
    if case["task_type"] == "TOKEN_CLS" and not case["method"].startswith("prefix"):
        # PEFT passes the labels on without room for the virtual tokens, and the loss fails on the
        # length; fastlora pads them (no loss on a virtual token). Compare logits, and the loss by hand.
        ref = theirs(**{k: v for k, v in batch.items() if k != "labels"})
        virtual = ours.peft_config["default"].num_virtual_tokens
        expected_loss = torch.nn.functional.cross_entropy(ref.logits[:, virtual:].reshape(-1, 3),
                                                          batch["labels"].view(-1))
    else:
        ref = peft_forward(theirs, batch)
        if ref is None:
            pytest.skip("PEFT 0.21 cannot run prefix tuning on this model with transformers >= 5.24 (it looks "
                        "for past_key_values, renamed cache); with older transformers this case runs")
        expected_loss = ref.loss
    torch.testing.assert_close(out.logits, ref.logits, **TOL)
    torch.testing.assert_close(out.loss, expected_loss, **TOL)
    base_batch = {k: v for k, v in batch.items() if k != "task_ids"}
    with torch.no_grad():
        plain = case["base"](**base_batch).logits
    if plain.shape == out.logits.shape:  # the virtual tokens change the result (they are not ignored)
        assert not torch.allclose(plain, out.logits, atol=1e-4)
    # gradients reach every trainable tensor and only those
    out.loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in ours.parameters())


def test_saved_tensors_are_peft_tensors(case):
    ours, theirs = build_pair(case["base"], case["task_type"], case["method"])
    saved, expected = fastlora.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    assert sorted(saved) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(saved[key], expected[key], **TOL)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("direction", ["peft_to_fastlora", "fastlora_to_peft"])
def test_checkpoint_loads_both_ways(case, direction, tmp_path, peft_at_least):
    ours, theirs = build_pair(case["base"], case["task_type"], case["method"])
    writer, reader = (theirs, fastlora) if direction == "peft_to_fastlora" else (ours, peft)
    writer.save_pretrained(tmp_path)
    loaded = reader.PeftModel.from_pretrained(copy.deepcopy(case["base"]), tmp_path)
    assert type(loaded).__name__ == type(writer).__name__
    # PEFT's multitask T5 forward needs labels (it builds the decoder input from them)
    batch = make_batch(ours, case["method"], labels=case["task_type"] == "SEQ_2_SEQ_LM")
    with torch.no_grad():
        expected = peft_forward(theirs, batch)
        if expected is not None:
            torch.testing.assert_close(peft_forward(loaded, batch).logits, expected.logits, **TOL)
        elif reader is fastlora:  # PEFT cannot run it (see peft_forward): its tensors, in our forward
            torch.testing.assert_close(loaded(**batch).logits, ours(**batch).logits, **TOL)
        else:
            loaded_state, written = peft.get_peft_model_state_dict(loaded), fastlora.get_peft_model_state_dict(ours)
            assert sorted(loaded_state) == sorted(written)
            for key in written:
                torch.testing.assert_close(loaded_state[key], written[key], rtol=0, atol=0)
    # Loaded without is_trainable, the prompt is frozen (PEFT from 0.22 on; 0.21 left it trainable); the
    # parameter counts agree whichever library loads it.
    other = (peft if reader is fastlora else fastlora).PeftModel.from_pretrained(copy.deepcopy(case["base"]), tmp_path)
    ours_loaded = loaded if reader is fastlora else other
    trainable, total = ours_loaded.get_nb_trainable_parameters()
    assert trainable == 0 and total == other.get_nb_trainable_parameters()[1] == loaded.get_nb_trainable_parameters()[1]
    if peft_at_least("0.22"):
        assert loaded.get_nb_trainable_parameters() == other.get_nb_trainable_parameters()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", list(METHODS))
def test_a_saved_prompt_loads_frozen_unless_trainable(method, tiny_llama, tmp_path):
    """Loaded for inference the prompt is frozen (PEFT 0.22); is_trainable=True, which PEFT refuses for
    prompt learning, loads it for training here (test_p_tuning covers what p-tuning then trains)."""
    base = tiny_llama()
    ours, _ = build_pair(base, "CAUSAL_LM", method)
    ours.save_pretrained(tmp_path)
    frozen = fastlora.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    trainable = fastlora.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert frozen.get_nb_trainable_parameters()[0] == 0
    assert trainable.get_nb_trainable_parameters()[0] > 0
    assert trainable.get_nb_trainable_parameters()[1] == frozen.get_nb_trainable_parameters()[1]
    with pytest.raises(ValueError):  # PEFT's side, as the docstring says
        peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)


GENERATE_CASES = [(m, k) for m in ("llama-gqa", "gpt2") for k in ("prompt", "ptuning-mlp", "prefix", "multitask")]
GENERATE_CASES += [("t5", k) for k in ("prompt", "prefix")]


def _greedy_by_full_forwards(model, batch, steps):
    """Greedy decoding with no cache: every step runs the whole sequence through the model's forward."""
    batch = dict(batch)
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            out = torch.full((batch["input_ids"].shape[0], 1), model.config.decoder_start_token_id)
            for _ in range(steps):
                out = torch.cat([out, model(**batch, decoder_input_ids=out).logits[:, -1:].argmax(-1)], 1)
            return out
        ids, mask = batch.pop("input_ids"), batch.pop("attention_mask")
        for _ in range(steps):
            token = model(input_ids=ids, attention_mask=mask, **batch).logits[:, -1:].argmax(-1)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
        return ids


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("model_name, method", GENERATE_CASES, ids=[f"{m}-{k}" for m, k in GENERATE_CASES])
def test_greedy_generate_matches_decoding_by_full_forwards(factories, model_name, method):
    # generate (the virtual tokens added at the prefill, then a cache) against greedy decoding that runs
    # the whole sequence through forward at each step (forward is checked against PEFT's above). PEFT's
    # own generate is compared on the first new token only: with transformers 5.24, which hands the
    # model its cache as ``cache``, PEFT 0.21 puts the prompt in again at every step and drifts.
    build, task_type = MODELS[model_name]
    ours, theirs = build_pair(build(factories), task_type, method)
    batch = make_batch(ours, method, labels=False)
    batch.pop("decoder_input_ids", None)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    generated = ours.generate(**batch, **kwargs)
    expected = _greedy_by_full_forwards(ours, batch, 6)
    # a left-padded row: generate numbers positions from the mask, forward does not; compare row 0 there
    rows = slice(None) if ours.config.is_encoder_decoder else slice(0, 1)
    torch.testing.assert_close(generated[rows], expected[rows], rtol=0, atol=0)
    if method != "prefix" or "cache" not in inspect.signature(ours.get_base_model().forward).parameters:
        # PEFT's prefix goes in as past_key_values, which generate's cache overrides from transformers 5.24
        first = 2 if ours.config.is_encoder_decoder else batch["input_ids"].shape[1] + 1
        torch.testing.assert_close(generated[:, :first], theirs.generate(**batch, **kwargs)[:, :first],
                                   rtol=0, atol=0)
    # the virtual tokens are in effect: the first generated logits are the forward's last logits
    if not ours.config.is_encoder_decoder:
        out = ours.generate(**batch, **kwargs, output_scores=True, return_dict_in_generate=True)
        with torch.no_grad():
            logits = ours(**batch).logits[:, -1]
        torch.testing.assert_close(out.scores[0][0], logits[0], **TOL)


@pytest.mark.parametrize("method", list(METHODS))
def test_training_lowers_the_loss_and_leaves_the_base_alone(steerable_llama, train_losses, method):
    name, kwargs = METHODS[method]
    base = steerable_llama()  # wider weights than tiny_llama's: a model whose output a prompt can steer
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = fastlora.get_peft_model(base, getattr(fastlora, name)(task_type="CAUSAL_LM", **kwargs))
    losses = train_losses(model, make_batch(model, method), lr=0.1)
    assert losses[-1] < 0.85 * losses[0], losses
    for key, value in model.get_base_model().state_dict().items():
        assert torch.equal(value, frozen[key]), key


def test_disable_adapter_runs_the_base_model(tiny_llama):
    base = tiny_llama()
    model = fastlora.get_peft_model(copy.deepcopy(base), fastlora.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                     num_virtual_tokens=3))
    batch = make_batch(model, "prompt", labels=False)
    with torch.no_grad():
        expected = base(**batch).logits
        with model.disable_adapter():
            torch.testing.assert_close(model(**batch).logits, expected, rtol=0, atol=0)
        assert model(**batch).logits.shape[1] == expected.shape[1] + 3


def test_second_adapter_add_set_delete(tiny_llama):
    model = fastlora.get_peft_model(tiny_llama(), fastlora.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                              num_virtual_tokens=3))
    model.add_adapter("other", fastlora.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    batch = make_batch(model, "prompt", labels=False)
    with torch.no_grad():
        first = model(**batch).logits
        model.set_adapter("other")
        assert model.active_adapter == "other"
        assert model(**batch).logits.shape[1] == first.shape[1] + 2
        model.delete_adapter("other")
        assert model.active_adapter == "default" and list(model.peft_config) == ["default"]
        torch.testing.assert_close(model(**batch).logits, first, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot add"):
        model.add_adapter("lora", fastlora.LoraConfig(target_modules=["q_proj"]))


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_num_virtual_tokens_below_one_is_refused(bad):
    for name in ("PromptTuningConfig", "PromptEncoderConfig", "PrefixTuningConfig", "MultitaskPromptTuningConfig"):
        with pytest.raises(ValueError, match="num_virtual_tokens"):
            getattr(fastlora, name)(task_type="CAUSAL_LM", num_virtual_tokens=bad)


def test_missing_num_virtual_tokens_leaves_the_model_as_it_was(tiny_llama):
    base = tiny_llama()
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        fastlora.get_peft_model(base, fastlora.PromptTuningConfig(task_type="CAUSAL_LM"))
    assert all(p.requires_grad for p in base.parameters())


def test_config_round_trips_through_peft(tmp_path):
    ours = fastlora.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=7, encoder_hidden_size=12,
                                        encoder_reparameterization_type="LSTM")
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftConfig.from_pretrained(tmp_path)
    assert type(theirs).__name__ == "PromptEncoderConfig"
    assert (theirs.num_virtual_tokens, theirs.encoder_hidden_size, theirs.encoder_reparameterization_type) == \
        (7, 12, "LSTM")
    theirs.save_pretrained(tmp_path / "back")
    again = fastlora.PeftConfig.from_pretrained(tmp_path / "back")
    assert again == ours
