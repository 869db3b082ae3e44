"""Parity with the real PEFT: same names, same numbers, same printout, checkpoints that load both ways.

Each case is a config-built transformers model with a LoRA config that exercises one thing PEFT users
rely on: Llama with grouped-query attention (k/v projections narrower than q), GPT-2's ``Conv1D``
(``fan_in_fan_out``), BERT sequence classification with a ``modules_to_save`` head, and T5
(encoder-decoder). Both libraries wrap deep copies of one base model, so any difference is the
library's.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import fastlora
from fastlora.reference import SMALL_MASK

# fp32 everywhere: the two libraries order the same fp32 operations differently (fastlora adds the
# scaled update in place), so results agree to rounding, not bit for bit.
TOL = dict(rtol=1e-5, atol=1e-5)

CASES = {
    "llama-gqa": dict(
        factory="tiny_llama",
        task_type="CAUSAL_LM",
        lora=dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ),
    "gpt2-conv1d": dict(
        factory="tiny_gpt2",
        task_type="CAUSAL_LM",
        lora=dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    ),
    "bert-seqcls": dict(
        factory="tiny_bert_cls",
        task_type="SEQ_CLS",
        lora=dict(target_modules=["query", "value"], modules_to_save=["classifier"]),
    ),
    "t5": dict(factory="tiny_t5", task_type="SEQ_2_SEQ_LM", lora=dict(target_modules=["q", "k", "v", "o"])),
}
AUTO_CLASSES = {
    "CAUSAL_LM": ("AutoModelForCausalLM", "AutoPeftModelForCausalLM"),
    "SEQ_CLS": ("AutoModelForSequenceClassification", "AutoPeftModelForSequenceClassification"),
    "SEQ_2_SEQ_LM": ("AutoModelForSeq2SeqLM", "AutoPeftModelForSeq2SeqLM"),
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request):
    spec = CASES[request.param]
    base = request.getfixturevalue(spec["factory"])().eval()
    if request.param == "llama-gqa":
        assert base.config.num_key_value_heads < base.config.num_attention_heads, "the Llama case must use GQA"
    return dict(name=request.param, base=base, **spec)


def _configs(case, **overrides):
    """The same LoRA config in both libraries; init_lora_weights=False so B != 0 and the update shows."""
    kwargs = dict(task_type=case["task_type"], r=4, lora_alpha=8, init_lora_weights=False, **case["lora"])
    kwargs.update(overrides)
    return fastlora.LoraConfig(**kwargs), peft.LoraConfig(**kwargs)


# adapters start from a small random offset (PEFT's weights, copied into fastlora: see parity.pair)
PERTURB = 0.1


def _pair(parity, case, **overrides):
    """(fastlora model, peft model) over copies of one base, with PEFT's weights copied into fastlora."""
    return parity.pair(case["base"], *_configs(case, **overrides), scale=PERTURB)


def test_same_parameter_names_and_trainable_set(case):
    fl_config, pf_config = _configs(case)
    fl_model = fastlora.get_peft_model(copy.deepcopy(case["base"]), fl_config)
    pf_model = peft.get_peft_model(copy.deepcopy(case["base"]), pf_config)
    assert type(fl_model).__name__ == type(pf_model).__name__
    assert list(fl_model.state_dict()) == list(pf_model.state_dict())
    trainable = lambda m: [n for n, p in m.named_parameters() if p.requires_grad]  # noqa: E731
    assert trainable(fl_model) == trainable(pf_model)
    assert fl_model.get_nb_trainable_parameters() == pf_model.get_nb_trainable_parameters()


def test_print_trainable_parameters_identical(case, capsys):
    fl_config, pf_config = _configs(case)
    fastlora.get_peft_model(copy.deepcopy(case["base"]), fl_config).print_trainable_parameters()
    fl_text = capsys.readouterr().out
    peft.get_peft_model(copy.deepcopy(case["base"]), pf_config).print_trainable_parameters()
    pf_text = capsys.readouterr().out
    assert fl_text.startswith("trainable params: ")
    assert fl_text == pf_text


def test_identical_outputs_for_identical_weights(case, parity):
    fl_model, pf_model = _pair(parity, case)
    batch = parity.batch(case["base"])
    base_out = parity.out(case["base"], batch)
    fl_out = parity.out(fl_model, batch)
    assert not torch.allclose(fl_out, base_out, **TOL), "the adapter must change the output for this test to mean anything"
    torch.testing.assert_close(fl_out, parity.out(pf_model, batch), **TOL)


def test_identical_gradients_for_identical_weights(case, parity):
    fl_model, pf_model = _pair(parity, case)
    batch = parity.batch(case["base"])
    for model in (fl_model, pf_model):
        model.train()
        torch.manual_seed(0)  # the same dropout masks in the base model (GPT-2, BERT, T5 have dropout)
        model(**batch).logits.float().pow(2).mean().backward()
    parity.assert_same_grads(fl_model, pf_model)


def test_lora_dropout_draws_the_masks_peft_draws(case, parity):
    """With lora_dropout and the same torch seed, training gives PEFT's outputs and gradients: for a few
    rows (at most SMALL_MASK elements of a layer's input, as in every layer here) fastlora draws each
    mask as PEFT's ``nn.Dropout`` does, from torch's generator, in the same order."""
    batch = parity.batch(case["base"])
    widest = max(m.in_features for m in case["base"].modules() if isinstance(m, torch.nn.Linear))
    assert batch["input_ids"].numel() * max(widest, 4 * case["base"].config.hidden_size) <= SMALL_MASK
    fl_model, pf_model = _pair(parity, case, lora_dropout=0.3)
    outs = []
    for model in (fl_model, pf_model):
        model.train()
        torch.manual_seed(0)
        out = model(**batch).logits.float()
        out.pow(2).mean().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1], **TOL)
    theirs = dict(pf_model.named_parameters())
    for name, param in fl_model.named_parameters():
        if param.requires_grad:  # to fp32 rounding of the largest entry (T5's unscaled attention: ~1e-5 of it)
            scale = param.grad.abs().max().item()
            torch.testing.assert_close(param.grad, theirs[name].grad, rtol=0, atol=1e-4 * scale, msg=name)
    # The LoRA masks matter here: without them (same seed, so the same base-model dropout) the output moves.
    for module in fl_model.modules():
        if isinstance(module, fastlora.LoraLinear):
            module.lora_dropout["default"].p = 0.0
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.allclose(fl_model(**batch).logits.float(), outs[0], **TOL)


def test_fastlora_checkpoint_loads_in_peft(case, tmp_path, parity):
    fl_model, pf_model = _pair(parity, case)
    batch = parity.batch(case["base"])
    fl_model.save_pretrained(tmp_path / "fl")
    pf_model.save_pretrained(tmp_path / "pf")
    assert parity.saved_keys(tmp_path / "fl") == parity.saved_keys(tmp_path / "pf")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(case["base"]), tmp_path / "fl").eval()
    torch.testing.assert_close(parity.out(loaded, batch), parity.out(fl_model, batch), **TOL)


def test_peft_checkpoint_loads_in_fastlora(case, tmp_path, parity):
    fl_model, pf_model = _pair(parity, case)
    batch = parity.batch(case["base"])
    pf_model.save_pretrained(tmp_path / "pf")
    loaded = fastlora.PeftModel.from_pretrained(copy.deepcopy(case["base"]), tmp_path / "pf")
    assert type(loaded).__name__ == type(pf_model).__name__
    torch.testing.assert_close(parity.out(loaded, batch), parity.out(pf_model, batch), **TOL)


def test_auto_peft_model_reads_the_other_librarys_folder(case, tmp_path, parity):
    import transformers

    base_dir = tmp_path / "base"
    case["base"].save_pretrained(base_dir)
    hf_auto, peft_auto = AUTO_CLASSES[case["task_type"]]
    fl_config, pf_config = _configs(case, base_model_name_or_path=str(base_dir))
    # Bases loaded back from disk, so both sides start from exactly what the Auto class will read.
    fl_model = fastlora.get_peft_model(getattr(transformers, hf_auto).from_pretrained(base_dir), fl_config)
    pf_model = peft.get_peft_model(getattr(transformers, hf_auto).from_pretrained(base_dir), pf_config)
    parity.perturb(pf_model, scale=PERTURB)
    fl_model.load_state_dict(pf_model.state_dict())
    fl_model.save_pretrained(tmp_path / "fl")
    pf_model.save_pretrained(tmp_path / "pf")
    batch = parity.batch(case["base"])
    expected = parity.out(pf_model.eval(), batch)

    by_peft = getattr(peft, peft_auto).from_pretrained(tmp_path / "fl")
    by_fastlora = getattr(fastlora, peft_auto).from_pretrained(tmp_path / "pf")
    assert isinstance(by_fastlora, fastlora.PeftModel) and isinstance(by_peft, peft.PeftModel)
    torch.testing.assert_close(parity.out(by_peft, batch), expected, **TOL)
    torch.testing.assert_close(parity.out(by_fastlora, batch), expected, **TOL)


@pytest.mark.parametrize("safe_merge", [False, True], ids=["merge", "safe_merge"])
def test_merge_and_unload_matches_peft(case, safe_merge, parity):
    fl_model, pf_model = _pair(parity, case)
    batch = parity.batch(case["base"])
    unmerged = parity.out(fl_model, batch)
    fl_merged = fl_model.merge_and_unload(safe_merge=safe_merge)
    pf_merged = pf_model.merge_and_unload(safe_merge=safe_merge)
    assert type(fl_merged) is type(case["base"])
    assert list(fl_merged.state_dict()) == list(case["base"].state_dict())
    torch.testing.assert_close(parity.out(fl_merged, batch), unmerged, **TOL)
    torch.testing.assert_close(parity.out(fl_merged, batch), parity.out(pf_merged, batch), **TOL)
    pf_state = pf_merged.state_dict()
    for name, tensor in fl_merged.state_dict().items():
        torch.testing.assert_close(tensor, pf_state[name], **TOL, msg=name)


def test_merge_adapter_then_unmerge_matches_peft(case, parity):
    fl_model, pf_model = _pair(parity, case)
    batch = parity.batch(case["base"])
    unmerged = parity.out(fl_model, batch)
    fl_model.merge_adapter()
    pf_model.merge_adapter()
    torch.testing.assert_close(parity.out(fl_model, batch), parity.out(pf_model, batch), **TOL)
    torch.testing.assert_close(parity.out(fl_model, batch), unmerged, **TOL)
    fl_model.unmerge_adapter()
    torch.testing.assert_close(parity.out(fl_model, batch), unmerged, **TOL)


def _second_config(lib, case):
    # A different rank and a different target set, so the sub-folder adapter cannot pass for the default.
    targets = case["lora"]["target_modules"][:1]
    extra = {"modules_to_save": ["classifier"]} if case["task_type"] == "SEQ_CLS" else {}
    fan = {"fan_in_fan_out": True} if "fan_in_fan_out" in case["lora"] else {}
    return lib.LoraConfig(task_type=case["task_type"], r=2, lora_alpha=4, init_lora_weights=False,
                          target_modules=targets, **extra, **fan)


def _outputs_per_adapter(parity, model, batch, names):
    outs = {}
    for name in names:
        model.set_adapter(name)
        outs[name] = parity.out(model, batch)
    return outs


@pytest.mark.parametrize("writer", ["fastlora", "peft"])
def test_multiple_adapters_saved_by_one_load_in_the_other(case, writer, tmp_path, parity):
    writer_lib, reader_lib = (fastlora, peft) if writer == "fastlora" else (peft, fastlora)
    config = (_configs(case)[0] if writer == "fastlora" else _configs(case)[1])
    model = writer_lib.get_peft_model(copy.deepcopy(case["base"]), config)
    model.add_adapter("second", _second_config(writer_lib, case))
    for seed, name in enumerate(("default", "second"), start=1):
        model.set_adapter(name)  # set_adapter makes that adapter's tensors trainable: perturb each in turn
        parity.perturb(model, seed=seed, scale=PERTURB)
    model.eval()
    batch = parity.batch(case["base"])
    expected = _outputs_per_adapter(parity, model, batch, ["default", "second"])
    assert not torch.allclose(expected["default"], expected["second"])
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "second" / "adapter_config.json").is_file()

    loaded = reader_lib.PeftModel.from_pretrained(copy.deepcopy(case["base"]), tmp_path)
    loaded.load_adapter(tmp_path / "second", adapter_name="second")
    got = _outputs_per_adapter(parity, loaded.eval(), batch, ["default", "second"])
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **TOL, msg=name)


def test_multiple_adapter_folders_have_peft_keys(case, tmp_path, parity):
    fl_config, pf_config = _configs(case)
    fl_model = fastlora.get_peft_model(copy.deepcopy(case["base"]), fl_config)
    fl_model.add_adapter("second", _second_config(fastlora, case))
    pf_model = peft.get_peft_model(copy.deepcopy(case["base"]), pf_config)
    pf_model.add_adapter("second", _second_config(peft, case))
    fl_model.save_pretrained(tmp_path / "fl")
    pf_model.save_pretrained(tmp_path / "pf")
    for sub in ("", "second"):
        assert parity.saved_keys(tmp_path / "fl" / sub) == parity.saved_keys(tmp_path / "pf" / sub)


# ---- bias="all" / "lora_only": the biases are trained and saved with the adapter -----------------------

BIAS_CASES = ["gpt2-conv1d", "bert-seqcls"]


@pytest.mark.parametrize("bias", ["all", "lora_only"])
@pytest.mark.parametrize("writer", ["fastlora", "peft"])
@pytest.mark.parametrize("case_name", BIAS_CASES)
def test_bias_checkpoints_load_both_ways(request, case_name, writer, bias, tmp_path, parity):
    spec = CASES[case_name]
    base = request.getfixturevalue(spec["factory"])().eval()
    case = dict(name=case_name, base=base, **spec)
    fl_model, pf_model = _pair(parity, case, bias=bias)  # _pair perturbs the trainable biases too
    trained = [n for n, p in pf_model.named_parameters() if p.requires_grad and n.endswith("bias")]
    assert trained, "bias != 'none' must make some bias trainable"
    assert [n for n, p in fl_model.named_parameters() if p.requires_grad] == [
        n for n, p in pf_model.named_parameters() if p.requires_grad
    ]
    writer_model, reader_lib = (fl_model, peft) if writer == "fastlora" else (pf_model, fastlora)
    batch = parity.batch(base)
    expected = parity.out(writer_model, batch)
    writer_model.save_pretrained(tmp_path)
    # Load onto an untouched base: the saved biases must bring the trained values back.
    loaded = reader_lib.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(parity.out(loaded, batch), expected, **TOL)


# ---- config features on Llama: the same layers get the same ranks and scalings ----------------------------------

VARIANTS = {
    "rslora": dict(use_rslora=True, target_modules=["q_proj", "v_proj"]),
    "rank-alpha-patterns": dict(target_modules=["q_proj", "v_proj", "down_proj"],
                                rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6}, alpha_pattern={"down_proj": 3}),
    "all-linear": dict(target_modules="all-linear"),
    "regex": dict(target_modules=r".*\.(q_proj|up_proj)"),
    "layers-to-transform": dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers"),
    "exclude-modules": dict(target_modules="all-linear", exclude_modules=["down_proj"]),
    "default-targets": dict(),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variants_match_peft(variant, tiny_llama, tmp_path, capsys, parity):
    base = tiny_llama()
    kwargs = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, init_lora_weights=False, **VARIANTS[variant])
    fl_model = fastlora.get_peft_model(copy.deepcopy(base), fastlora.LoraConfig(**kwargs)).eval()
    pf_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs)).eval()
    assert list(fl_model.state_dict()) == list(pf_model.state_dict())
    fl_model.print_trainable_parameters()
    pf_model.print_trainable_parameters()
    fl_text, pf_text = capsys.readouterr().out.splitlines()
    assert fl_text == pf_text
    fl_model.load_state_dict(pf_model.state_dict())
    batch = parity.batch(base)
    torch.testing.assert_close(parity.out(fl_model, batch), parity.out(pf_model, batch), **TOL)
    fl_model.save_pretrained(tmp_path / "fl")
    pf_model.save_pretrained(tmp_path / "pf")
    assert parity.saved_keys(tmp_path / "fl") == parity.saved_keys(tmp_path / "pf")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "fl").eval()
    torch.testing.assert_close(parity.out(loaded, batch), parity.out(pf_model, batch), **TOL)


def test_merging_several_adapters_matches_peft(tiny_llama):
    base = tiny_llama()
    models = []
    for lib in (fastlora, peft):
        model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False))
        model.add_adapter("b", lib.LoraConfig(task_type="CAUSAL_LM", r=2, init_lora_weights=False,
                                              target_modules=["q_proj", "o_proj"]))
        models.append(model)
    fl_model, pf_model = models
    fl_model.load_state_dict(pf_model.state_dict())
    fl_merged = fl_model.merge_and_unload(adapter_names=["default", "b"])
    pf_state = pf_model.merge_and_unload(adapter_names=["default", "b"]).state_dict()
    changed = 0
    for name, tensor in fl_merged.state_dict().items():
        torch.testing.assert_close(tensor, pf_state[name], **TOL, msg=name)
        changed += not torch.equal(tensor, base.state_dict()[name])
    assert changed == 3 * 2  # q_proj (both adapters), v_proj ("default"), o_proj ("b"), in 2 layers
