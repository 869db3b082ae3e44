"""``PeftModel`` and its task classes: the API PEFT users call, behaving as PEFT's does.

Where PEFT defines the answer (class chosen per task, trainable set, printout, adapter bookkeeping),
the test asks the real PEFT for it on a deep copy of the same model.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers

import fastlora
from fastlora import LoraLinear, ModulesToSaveWrapper

TOL = dict(rtol=1e-5, atol=1e-5)


# ---- models and batches ------------------------------------------------------------------------------

TASKS = {
    # name: (task_type, fastlora class, builder(fixtures) -> base model)
    "causal-lm": ("CAUSAL_LM", "PeftModelForCausalLM", lambda f: f["tiny_llama"]()),
    "seq2seq-lm": ("SEQ_2_SEQ_LM", "PeftModelForSeq2SeqLM", lambda f: f["tiny_t5"]()),
    "seq-cls": ("SEQ_CLS", "PeftModelForSequenceClassification", lambda f: f["tiny_bert_cls"]()),
    "token-cls": ("TOKEN_CLS", "PeftModelForTokenClassification",
                  lambda f: transformers.BertForTokenClassification(f["tiny_config"]("bert", num_labels=3))),
    "question-answering": ("QUESTION_ANS", "PeftModelForQuestionAnswering",
                           lambda f: transformers.BertForQuestionAnswering(f["tiny_config"]("bert", num_labels=2))),
    "feature-extraction": ("FEATURE_EXTRACTION", "PeftModelForFeatureExtraction",
                           lambda f: transformers.BertModel(f["tiny_config"]("bert"))),
}


@pytest.fixture
def fixtures(tiny_llama, tiny_t5, tiny_bert_cls, tiny_config):
    return dict(tiny_llama=tiny_llama, tiny_t5=tiny_t5, tiny_bert_cls=tiny_bert_cls, tiny_config=tiny_config)


def _batch(model, labels: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    input_ids = torch.randint(2, vocab, (2, 6), generator=gen)
    batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    if model.config.is_encoder_decoder:
        batch["decoder_input_ids"] = torch.randint(2, vocab, (2, 4), generator=gen)
    if not labels:
        return batch
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        batch["labels"] = input_ids.clone()
    elif name.endswith("ForConditionalGeneration"):
        batch["labels"] = batch.pop("decoder_input_ids")
    elif name.endswith("ForSequenceClassification"):
        batch["labels"] = torch.tensor([0, 1])
    elif name.endswith("ForTokenClassification"):
        batch["labels"] = torch.randint(0, model.config.num_labels, input_ids.shape, generator=gen)
    elif name.endswith("ForQuestionAnswering"):
        batch["start_positions"], batch["end_positions"] = torch.tensor([1, 2]), torch.tensor([3, 4])
    return batch


def _out(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    for key in ("logits", "start_logits", "last_hidden_state"):
        if key in out:
            return out[key]
    raise KeyError(f"no output to compare in {list(out)}")


def _llama_peft(tiny_llama, **config):
    base = tiny_llama()
    config = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, init_lora_weights=False, **config)
    return base, fastlora.get_peft_model(copy.deepcopy(base), fastlora.LoraConfig(**config)).eval()


def _fastlora_modules(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (LoraLinear, ModulesToSaveWrapper))]


# ---- structure ----------------------------------------------------------------------------------------

def test_base_model_is_the_tuner_and_model_the_transformers_model(tiny_llama):
    base = tiny_llama()
    model = fastlora.get_peft_model(base, fastlora.LoraConfig(task_type="CAUSAL_LM", r=4))
    assert isinstance(model.base_model, fastlora.LoraModel)
    assert model.base_model.model is base  # injected in place, as PEFT does
    assert model.get_base_model() is base
    assert model.config is base.config  # attributes fall through to the transformers model
    names = [n for n, _ in model.named_parameters()]
    assert all(n.startswith("base_model.model.") for n in names)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in names
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" in names
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, LoraLinear)


@pytest.mark.parametrize("task", list(TASKS))
def test_task_class_forward_and_parity_with_peft(task, fixtures, capsys, peft_at_least):
    task_type, class_name, build = TASKS[task]
    base = build(fixtures).eval()
    fl_model = fastlora.get_peft_model(copy.deepcopy(base), fastlora.LoraConfig(task_type=task_type, r=4))
    pf_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type=task_type, r=4))
    assert type(fl_model) is getattr(fastlora, class_name)
    assert type(pf_model).__name__ == class_name
    # the heads PEFT trains for this task (0.22 added DistilBERT's pre_classifier to the classification ones)
    if peft_at_least("0.22") or task_type not in ("SEQ_CLS", "TOKEN_CLS"):
        assert fl_model.modules_to_save == pf_model.modules_to_save
    else:
        assert fl_model.modules_to_save == pf_model.modules_to_save | {"pre_classifier"}
    assert fl_model.get_nb_trainable_parameters() == pf_model.get_nb_trainable_parameters()
    fl_model.print_trainable_parameters()
    fl_text = capsys.readouterr().out
    pf_model.print_trainable_parameters()
    assert fl_text == capsys.readouterr().out

    # With B = 0 (PEFT's default init) the wrapped model is the base model until it trains.
    batch = _batch(base)
    torch.testing.assert_close(_out(fl_model.eval(), batch), _out(base, batch), **TOL)
    fl_model.train()
    out = fl_model(**_batch(base, labels=True))
    loss = out.loss if task != "feature-extraction" else out.last_hidden_state.pow(2).mean()
    loss.backward()
    grads = {n for n, p in fl_model.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in fl_model.named_parameters() if p.requires_grad}
    assert any(".lora_B.default." in n for n in grads)


@pytest.mark.parametrize("class_name", sorted({spec[1] for spec in TASKS.values()}))
def test_forward_parameters_bind_as_in_peft(class_name):
    """Positional calls bind as in PEFT: PEFT's named parameters are a prefix of fastlora's."""
    import inspect

    names = lambda cls: [p.name for p in inspect.signature(cls.forward).parameters.values()  # noqa: E731
                         if p.kind is not inspect.Parameter.VAR_KEYWORD]
    ours, theirs = names(getattr(fastlora, class_name)), names(getattr(peft, class_name))
    assert ours[: len(theirs)] == theirs


@pytest.mark.parametrize("builder", ["tiny_llama", "tiny_t5"])
def test_generate_matches_peft_and_disable_adapter_gives_base(builder, request):
    base = request.getfixturevalue(builder)().eval()
    task_type = "CAUSAL_LM" if builder == "tiny_llama" else "SEQ_2_SEQ_LM"
    config = dict(task_type=task_type, r=4, lora_alpha=32, init_lora_weights=False)
    fl_model = fastlora.get_peft_model(copy.deepcopy(base), fastlora.LoraConfig(**config)).eval()
    pf_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config)).eval()
    pf_model.load_state_dict(fl_model.state_dict())
    input_ids = _batch(base)["input_ids"]
    kwargs = dict(input_ids=input_ids, max_new_tokens=5, do_sample=False)
    fl_tokens = fl_model.generate(**kwargs)
    assert torch.equal(fl_tokens, pf_model.generate(**kwargs))
    with fl_model.disable_adapter():
        assert torch.equal(fl_model.generate(**kwargs), base.generate(**kwargs))
    assert torch.equal(fl_model.generate(**kwargs), fl_tokens)


# ---- save / load --------------------------------------------------------------------------------------

@pytest.mark.parametrize("is_trainable", [False, True], ids=["frozen", "trainable"])
def test_from_pretrained_adapter_name_and_is_trainable(tiny_llama, tmp_path, is_trainable):
    base, model = _llama_peft(tiny_llama)
    batch = _batch(base)
    model.save_pretrained(tmp_path)
    loaded = fastlora.PeftModel.from_pretrained(copy.deepcopy(base).train(), tmp_path, adapter_name="mine",
                                                is_trainable=is_trainable)
    assert type(loaded) is fastlora.PeftModelForCausalLM
    assert loaded.active_adapter == "mine" and list(loaded.peft_config) == ["mine"]
    assert loaded.peft_config["mine"].inference_mode is (not is_trainable)
    names = [n for n, _ in loaded.named_parameters()]
    assert any(".lora_A.mine." in n for n in names) and not any(".default." in n for n in names)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    if is_trainable:
        assert trainable == {n for n in names if ".lora_" in n}
    else:
        assert trainable == set()
        assert not any(m.training for m in loaded.modules())
    torch.testing.assert_close(_out(loaded.eval(), batch), _out(model, batch), **TOL)


def test_non_default_adapter_is_saved_in_its_subfolder(tiny_llama, tmp_path):
    base = tiny_llama()
    config = fastlora.LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False)
    model = fastlora.get_peft_model(copy.deepcopy(base), config, adapter_name="mine")
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    loaded = fastlora.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mine", adapter_name="mine")
    batch = _batch(base)
    torch.testing.assert_close(_out(loaded, batch), _out(model.eval(), batch), **TOL)


def test_from_pretrained_and_load_adapter_read_a_subfolder(tiny_llama, tmp_path):
    base, model = _llama_peft(tiny_llama)
    model.add_adapter("second", fastlora.LoraConfig(task_type="CAUSAL_LM", r=2, init_lora_weights=False,
                                                    target_modules=["o_proj"]))
    model.save_pretrained(tmp_path)
    batch = _batch(base)
    model.set_adapter("second")
    expected = _out(model, batch)
    loaded = fastlora.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, subfolder="second")
    torch.testing.assert_close(_out(loaded, batch), expected, **TOL)
    loaded.load_adapter(tmp_path, adapter_name="again", subfolder="second")
    loaded.set_adapter("again")
    torch.testing.assert_close(_out(loaded, batch), expected, **TOL)


def test_load_adapter_adds_a_frozen_second_adapter(tiny_llama, tmp_path):
    base, first = _llama_peft(tiny_llama)
    other = fastlora.get_peft_model(copy.deepcopy(base), fastlora.LoraConfig(
        task_type="CAUSAL_LM", r=2, init_lora_weights=False, target_modules=["o_proj"])).eval()
    other.save_pretrained(tmp_path)
    batch = _batch(base)
    before = _out(first, batch)
    first.load_adapter(tmp_path, adapter_name="other")
    assert list(first.peft_config) == ["default", "other"]
    assert first.active_adapter == "default"  # loading does not switch adapters
    torch.testing.assert_close(_out(first, batch), before, **TOL)
    assert not any(p.requires_grad for n, p in first.named_parameters() if ".other." in n)
    first.set_adapter("other")
    torch.testing.assert_close(_out(first, batch), _out(other, batch), **TOL)


# ---- adapters ------------------------------------------------------------------------------------------

def test_add_set_delete_adapter_and_active_adapters_match_peft(tiny_llama):
    base = tiny_llama()
    libs = {}
    for lib in (fastlora, peft):
        model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False))
        model.add_adapter("b", lib.LoraConfig(task_type="CAUSAL_LM", r=2, init_lora_weights=False,
                                              target_modules=["k_proj", "o_proj"]))
        libs[lib.__name__] = model.eval()
    fl_model, pf_model = libs["fastlora"], libs["peft"]
    fl_model.load_state_dict(pf_model.state_dict())
    trainable = lambda m: [n for n, p in m.named_parameters() if p.requires_grad]  # noqa: E731
    batch = _batch(base)

    assert fl_model.active_adapter == pf_model.active_adapter == "default"
    assert fl_model.active_adapters == pf_model.active_adapters == ["default"]
    assert list(fl_model.peft_config) == ["default", "b"]
    assert trainable(fl_model) == trainable(pf_model)  # the added adapter is frozen until it is set
    out_default = _out(fl_model, batch)

    for model in (fl_model, pf_model):
        model.set_adapter("b")
    assert fl_model.active_adapter == "b" and fl_model.active_adapters == ["b"]
    assert trainable(fl_model) == trainable(pf_model)
    out_b = _out(fl_model, batch)
    torch.testing.assert_close(out_b, _out(pf_model, batch), **TOL)
    assert not torch.allclose(out_b, out_default)

    for model in (fl_model, pf_model):
        model.set_adapter("default")
        model.delete_adapter("b")
    torch.testing.assert_close(_out(fl_model, batch), out_default, **TOL)
    assert list(fl_model.peft_config) == ["default"]
    assert not any(".b." in n for n in fl_model.state_dict())
    # k_proj only carried "b": it is a plain nn.Linear again (PEFT leaves an empty LoRA wrapper there).
    assert type(fl_model.base_model.model.model.layers[0].self_attn.k_proj) is torch.nn.Linear


def test_deleting_the_active_adapter_activates_a_remaining_one(tiny_llama):
    _, model = _llama_peft(tiny_llama)
    model.add_adapter("b", fastlora.LoraConfig(task_type="CAUSAL_LM", r=2))
    model.delete_adapter("default")
    assert model.active_adapter == "b"
    assert list(model.peft_config) == ["b"]
    assert not any(".default." in n for n in model.state_dict())


def test_deleting_the_active_adapter_matches_peft_on_every_layer(tiny_llama):
    """Adapters on different layers: after deleting the active one, every layer holding the remaining
    adapter runs it, including layers that never held the deleted one (PEFT's behaviour)."""
    base = tiny_llama()
    libs = {}
    for lib in (fastlora, peft):
        model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(
            task_type="CAUSAL_LM", r=4, init_lora_weights=False, target_modules=["q_proj"]))
        model.add_adapter("b", lib.LoraConfig(task_type="CAUSAL_LM", r=2, init_lora_weights=False,
                                              target_modules=["q_proj", "v_proj"]))
        libs[lib.__name__] = model.eval()
    ours, theirs = libs["fastlora"], libs["peft"]
    ours.load_state_dict(theirs.state_dict())
    batch = _batch(base)
    for model in (ours, theirs):
        model.delete_adapter("default")
    assert ours.active_adapter == theirs.active_adapter == "b"
    torch.testing.assert_close(_out(ours, batch), _out(theirs, batch), **TOL)
    assert not torch.allclose(_out(ours, batch), _out(base, batch))


def test_disable_adapter_gives_base_outputs_and_restores_after(tiny_llama):
    base, model = _llama_peft(tiny_llama)
    batch = _batch(base)
    adapted, plain = _out(model, batch), _out(base, batch)
    assert not torch.allclose(adapted, plain)
    with model.disable_adapter():
        torch.testing.assert_close(_out(model, batch), plain, **TOL)
    torch.testing.assert_close(_out(model, batch), adapted, **TOL)

    with pytest.raises(RuntimeError, match="boom"):
        with model.disable_adapter():
            raise RuntimeError("boom")
    torch.testing.assert_close(_out(model, batch), adapted, **TOL)


def test_disable_adapter_also_disables_modules_to_save_heads(tiny_bert_cls):
    base = tiny_bert_cls()
    model = fastlora.get_peft_model(copy.deepcopy(base), fastlora.LoraConfig(
        task_type="SEQ_CLS", r=4, init_lora_weights=False, modules_to_save=["classifier"])).eval()
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    batch = _batch(base)
    adapted = _out(model, batch)
    with model.disable_adapter():
        torch.testing.assert_close(_out(model, batch), _out(base, batch), **TOL)
    torch.testing.assert_close(_out(model, batch), adapted, **TOL)


def test_disable_adapter_on_a_merged_model_gives_base_outputs(tiny_llama):
    base, model = _llama_peft(tiny_llama)
    batch = _batch(base)
    adapted = _out(model, batch)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(_out(model, batch), _out(base, batch), **TOL)
    torch.testing.assert_close(_out(model, batch), adapted, **TOL)


def test_merge_adapter_and_unmerge_adapter(tiny_llama):
    base, model = _llama_peft(tiny_llama)
    batch = _batch(base)
    adapted = _out(model, batch)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    original = q_proj.base_layer.weight.detach().clone()
    model.merge_adapter()
    assert q_proj.merged and not torch.allclose(q_proj.base_layer.weight, original)
    torch.testing.assert_close(_out(model, batch), adapted, **TOL)
    model.unmerge_adapter()
    assert not q_proj.merged
    torch.testing.assert_close(q_proj.base_layer.weight, original, rtol=0, atol=1e-6)
    torch.testing.assert_close(_out(model, batch), adapted, **TOL)


# ---- back to a plain transformers model ----------------------------------------------------------------

@pytest.mark.parametrize("safe_merge", [False, True], ids=["merge", "safe_merge"])
@pytest.mark.parametrize("builder", ["tiny_llama", "tiny_bert_cls"])
def test_merge_and_unload_returns_the_plain_transformers_model(builder, safe_merge, request):
    base = request.getfixturevalue(builder)().eval()
    task_type = "CAUSAL_LM" if builder == "tiny_llama" else "SEQ_CLS"
    model = fastlora.get_peft_model(copy.deepcopy(base), fastlora.LoraConfig(
        task_type=task_type, r=4, init_lora_weights=False)).eval()
    if builder == "tiny_bert_cls":
        with torch.no_grad():  # a trained head copy, so the merged model must pick the copy, not the original
            model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    batch = _batch(base)
    adapted = _out(model, batch)
    merged = model.merge_and_unload(safe_merge=safe_merge)
    assert type(merged) is type(base)
    assert _fastlora_modules(merged) == []
    assert list(merged.state_dict()) == list(base.state_dict())
    torch.testing.assert_close(_out(merged, batch), adapted, **TOL)
    assert not torch.allclose(_out(merged, batch), _out(base, batch))


def test_unload_returns_the_base_model_with_original_weights(tiny_llama):
    base, model = _llama_peft(tiny_llama)
    batch = _batch(base)
    model.merge_adapter()  # unload takes merged adapters back out
    plain = model.unload()
    assert type(plain) is type(base)
    assert _fastlora_modules(plain) == []
    assert list(plain.state_dict()) == list(base.state_dict())
    torch.testing.assert_close(_out(plain, batch), _out(base, batch), **TOL)


# ---- modules_to_save --------------------------------------------------------------------------------------

def test_distilbert_pre_classifier_trains_and_saves_with_the_classifier(tiny_config, tmp_path):
    """DistilBERT's pre_classifier is a fresh head too: it joins modules_to_save (as in PEFT 0.22), once
    only, however often the config is reused, and a PEFT model loads it back."""
    torch.manual_seed(0)
    base = transformers.DistilBertForSequenceClassification(tiny_config("distilbert", num_labels=3)).eval()
    config = fastlora.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_lin", "v_lin"],
                                 modules_to_save=["classifier"])
    model = fastlora.get_peft_model(copy.deepcopy(base), config)
    fastlora.get_peft_model(copy.deepcopy(base), config)  # a second fold, same config
    assert config.modules_to_save == ["classifier", "score", "pre_classifier"]
    for name in ("pre_classifier", "classifier"):
        head = getattr(model.base_model.model, name)
        assert isinstance(head, ModulesToSaveWrapper)
        assert all(p.requires_grad for p in head.modules_to_save["default"].parameters())
        with torch.no_grad():
            head.modules_to_save["default"].weight.add_(0.5)
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as fh:
        assert "base_model.model.pre_classifier.weight" in set(fh.keys())
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    batch = _batch(base)
    torch.testing.assert_close(_out(theirs, batch), _out(model, batch), **TOL)
    assert not torch.allclose(_out(base, batch), _out(model, batch))


def test_modules_to_save_head_is_trained_saved_and_loaded_back(tiny_bert_cls, tmp_path):
    base = tiny_bert_cls().eval()
    model = fastlora.get_peft_model(copy.deepcopy(base), fastlora.LoraConfig(
        task_type="SEQ_CLS", r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    head = model.base_model.model.classifier
    assert isinstance(head, ModulesToSaveWrapper)
    original = {k: v.clone() for k, v in head.original_module.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    model(**_batch(base, labels=True)).loss.backward()
    optimizer.step()
    model.eval()
    for key, value in head.original_module.state_dict().items():
        assert torch.equal(value, original[key]), "the original head must stay frozen"
    assert not torch.equal(head.modules_to_save["default"].weight, original["weight"])

    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    loaded = fastlora.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    batch = _batch(base)
    torch.testing.assert_close(_out(loaded, batch), _out(model, batch), **TOL)
    assert torch.equal(loaded.base_model.model.classifier.modules_to_save["default"].weight,
                       head.modules_to_save["default"].weight)
