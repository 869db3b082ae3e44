"""LoHa against the real PEFT on config-built Llama (GQA) and BERT: names, counts, outputs, gradients,
merging, checkpoints both ways, rank/alpha patterns and several adapters. Both of fastlora's forward
forms are covered: r=2 takes the rank-r^2 LoRA form on the [32, 32] projections, r=4 the merged
weight. GPT-2's Conv1D is refused, as PEFT refuses it."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import fastlora
from fastlora.methods import loha as loha_module
from fastlora.methods.loha import LoHaLinear

TOL = dict(rtol=1e-5, atol=1e-5)

CASES = {
    "llama-r2": dict(factory="tiny_llama", task_type="CAUSAL_LM",
                     kwargs=dict(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama-r4": dict(factory="tiny_llama", task_type="CAUSAL_LM",
                     kwargs=dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "bert-seqcls": dict(factory="tiny_bert_cls", task_type="SEQ_CLS",
                        kwargs=dict(r=2, alpha=2, target_modules=["query", "value"], modules_to_save=["classifier"])),
    "llama-patterns": dict(factory="tiny_llama", task_type="CAUSAL_LM",
                           kwargs=dict(r=2, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 3},
                                       alpha_pattern={"layers.1.self_attn.q_proj": 5})),
}


def _configs(case, **overrides):
    kwargs = dict(task_type=case["task_type"], **case["kwargs"])
    kwargs.update(overrides)
    return fastlora.LoHaConfig(**kwargs), peft.LoHaConfig(**kwargs)


def _pair(parity, case, **overrides):
    return parity.pair(case["base"], *_configs(case, **overrides))


def test_names_trainable_set_and_printout_match_peft(case, capsys):
    fl_config, pf_config = _configs(case)
    fl_model = fastlora.get_peft_model(copy.deepcopy(case["base"]), fl_config)
    pf_model = peft.get_peft_model(copy.deepcopy(case["base"]), pf_config)
    assert list(fl_model.state_dict()) == list(pf_model.state_dict())
    trainable = lambda m: [n for n, p in m.named_parameters() if p.requires_grad]  # noqa: E731
    assert trainable(fl_model) == trainable(pf_model)
    fl_model.print_trainable_parameters()
    pf_model.print_trainable_parameters()
    fl_text, pf_text = capsys.readouterr().out.splitlines()
    assert fl_text == pf_text
    pf_layers = {n: (m.r, m.scaling) for n, m in pf_model.named_modules() if hasattr(m, "hada_w1_a")}
    fl_layers = {n: (m.r, m.scaling) for n, m in fl_model.named_modules() if isinstance(m, LoHaLinear)}
    assert fl_layers == pf_layers


def test_fresh_adapter_is_the_identity(case, parity):
    fl_model = fastlora.get_peft_model(copy.deepcopy(case["base"]), _configs(case)[0]).eval()
    batch = parity.batch(case["base"])
    torch.testing.assert_close(parity.out(fl_model, batch), parity.out(case["base"], batch), **TOL)


def test_outputs_and_gradients_match_peft(case, parity):
    fl_model, pf_model = _pair(parity, case)
    parity.assert_same_outputs_and_grads(fl_model, pf_model, case["base"], TOL)


@pytest.mark.parametrize("writer", ["fastlora", "peft"])
def test_checkpoints_load_both_ways(case, writer, tmp_path, parity):
    fl_model, pf_model = _pair(parity, case)
    batch = parity.batch(case["base"])
    fl_model.save_pretrained(tmp_path / "fastlora")
    pf_model.save_pretrained(tmp_path / "peft")
    keys = parity.saved_keys(tmp_path / "fastlora")
    assert keys == parity.saved_keys(tmp_path / "peft")
    assert {k.rpartition(".")[2] for k in keys if ".hada_" in k} == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
    reader = peft if writer == "fastlora" else fastlora
    loaded = reader.PeftModel.from_pretrained(copy.deepcopy(case["base"]), tmp_path / writer).eval()
    torch.testing.assert_close(parity.out(loaded, batch), parity.out(pf_model, batch), **TOL)


@pytest.mark.parametrize("safe_merge", [False, True], ids=["merge", "safe_merge"])
def test_merge_and_unload_matches_peft(case, safe_merge, parity):
    fl_model, pf_model = _pair(parity, case)
    batch = parity.batch(case["base"])
    unmerged = parity.out(fl_model, batch)
    fl_merged = fl_model.merge_and_unload(safe_merge=safe_merge)
    pf_merged = pf_model.merge_and_unload(safe_merge=safe_merge)
    assert list(fl_merged.state_dict()) == list(case["base"].state_dict())
    torch.testing.assert_close(parity.out(fl_merged, batch), unmerged, **TOL)
    pf_state = pf_merged.state_dict()
    for name, tensor in fl_merged.state_dict().items():
        torch.testing.assert_close(tensor, pf_state[name], **TOL, msg=name)


def test_merge_adapter_then_unmerge(case, parity):
    fl_model, _ = _pair(parity, case)
    batch = parity.batch(case["base"])
    unmerged = parity.out(fl_model, batch)
    fl_model.merge_adapter()
    torch.testing.assert_close(parity.out(fl_model, batch), unmerged, **TOL)
    fl_model.unmerge_adapter()
    torch.testing.assert_close(parity.out(fl_model, batch), unmerged, **TOL)
    with fl_model.disable_adapter():
        torch.testing.assert_close(parity.out(fl_model, batch), parity.out(case["base"], batch), **TOL)


def test_several_adapters_match_peft_and_checkpoints_cross(tiny_llama, tmp_path, parity):
    base = tiny_llama()
    models = []
    for lib in (fastlora, peft):
        model = lib.get_peft_model(copy.deepcopy(base), lib.LoHaConfig(r=2, target_modules=["q_proj", "v_proj"]))
        model.add_adapter("second", lib.LoHaConfig(r=3, alpha=6, target_modules=["q_proj", "o_proj"]))
        for seed, name in enumerate(("default", "second"), start=1):
            model.set_adapter(name)
            parity.perturb(model, seed=seed)
        models.append(model.eval())
    fl_model, pf_model = models
    fl_model.load_state_dict(pf_model.state_dict())
    batch = parity.batch(base)
    outs = {}
    for name in ("default", "second"):
        for model in models:
            model.set_adapter(name)
        assert [n for n, p in fl_model.named_parameters() if p.requires_grad] == \
            [n for n, p in pf_model.named_parameters() if p.requires_grad]
        outs[name] = parity.out(fl_model, batch)
        torch.testing.assert_close(outs[name], parity.out(pf_model, batch), **TOL, msg=name)
    assert not torch.allclose(outs["default"], outs["second"])
    fl_model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    loaded.load_adapter(tmp_path / "second", adapter_name="second")
    for name in ("default", "second"):
        loaded.set_adapter(name)
        torch.testing.assert_close(parity.out(loaded.eval(), batch), outs[name], **TOL, msg=name)
    merged = copy.deepcopy(fl_model).merge_and_unload(adapter_names=["default", "second"])
    pf_merged = pf_model.merge_and_unload(adapter_names=["default", "second"])
    torch.testing.assert_close(parity.out(merged, batch), parity.out(pf_merged, batch), **TOL)

    fl_model.delete_adapter("second")
    assert fl_model.active_adapters == ["default"]
    assert not any(".second" in k for k in fl_model.state_dict())
    torch.testing.assert_close(parity.out(fl_model, batch), outs["default"], **TOL)


# ---- the two forward forms ------------------------------------------------------------------------------------

@pytest.mark.parametrize("low_rank", [True, False], ids=["rank-r2-lora-form", "merged-weight"])
@pytest.mark.parametrize("grad", [True, False], ids=["train", "no-grad"])
def test_both_forward_forms_match_the_delta_weight(monkeypatch, low_rank, grad):
    monkeypatch.setattr(loha_module, "_low_rank_pays", lambda *args: low_rank)
    torch.manual_seed(0)
    layer = LoHaLinear(torch.nn.Linear(13, 7, dtype=torch.float64).requires_grad_(False), r=3, alpha=5,
                       init_weights=False, adapter_dtype=torch.float64)
    x = torch.randn(2, 5, 13, dtype=torch.float64, requires_grad=grad)
    factors = list(layer._factors("default"))
    dw = (factors[0] @ factors[1]) * (factors[2] @ factors[3]) * (5 / 3)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ dw.t())
    if grad:
        torch.autograd.gradcheck(lambda x, *f: _forward_with(layer, x, f), (x, *factors))


def test_merged_form_gradients_with_a_rank_dropout_mask():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 13, generator=gen, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(7, 13, generator=gen, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    factors = [torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
               for shape in ((7, 3), (3, 13), (7, 3), (3, 13))]
    mask = torch.tensor([2.0, 0, 2, 0, 2, 2, 0], dtype=torch.float64)
    torch.autograd.gradcheck(lambda x, *f: loha_module._LoHaMergedLinear.apply(x, weight, bias, *f, 1.5, mask),
                             (x, *factors))


def _forward_with(layer, x, factors):
    for table, value in zip(layer.adapter_layer_names, factors):
        getattr(layer, table)._parameters["default"] = value  # gradcheck's own tensors
    return layer(x)


def test_module_and_rank_dropout_only_in_training(tiny_llama, parity):
    base = tiny_llama()
    batch = parity.batch(base)
    off = fastlora.get_peft_model(copy.deepcopy(base), fastlora.LoHaConfig(r=2, module_dropout=1.0, init_weights=False,
                                                                        target_modules=["q_proj"]))
    torch.testing.assert_close(parity.out(off.train(), batch), parity.out(base, batch))  # every adapter dropped
    assert not torch.allclose(parity.out(off.eval(), batch), parity.out(base, batch))
    ranked = fastlora.get_peft_model(copy.deepcopy(base), fastlora.LoHaConfig(r=2, rank_dropout=0.5, init_weights=False,
                                                                           target_modules=["q_proj"]))
    evaluated = parity.out(ranked.eval(), batch)
    torch.manual_seed(0)
    assert not torch.allclose(parity.out(ranked.train(), batch), evaluated)
    torch.testing.assert_close(parity.out(ranked.eval(), batch), evaluated)


# ---- bad input: clear errors before any module is swapped ---------------------------------------------------

def test_conv1d_is_refused_as_in_peft(tiny_gpt2):
    model = tiny_gpt2()
    before = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match="LoHa wraps nn.Linear"):
        fastlora.get_peft_model(model, fastlora.LoHaConfig(target_modules=["c_attn", "c_fc"]))
    assert [(n, type(m)) for n, m in model.named_modules()] == before
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises((TypeError, ValueError)):
        peft.get_peft_model(copy.deepcopy(model), peft.LoHaConfig(target_modules=["c_attn"]))


@pytest.mark.parametrize("kwargs", [dict(r=0), dict(rank_dropout=1.5), dict(rank_pattern={"q_proj": -1}),
                                    dict(layers_pattern="layers")],
                         ids=["r", "rank_dropout", "rank_pattern", "layers_pattern"])
def test_bad_config_values_are_refused(kwargs):
    with pytest.raises(ValueError):
        fastlora.LoHaConfig(**kwargs)


def test_failed_second_adapter_leaves_the_first(tiny_llama):
    model = fastlora.get_peft_model(tiny_llama(), fastlora.LoHaConfig(r=2, target_modules=["q_proj"]))
    before = list(model.state_dict())
    with pytest.raises(ValueError, match="matched no module"):
        model.add_adapter("second", fastlora.LoHaConfig(target_modules=["nope"]))
    assert list(model.state_dict()) == before and list(model.peft_config) == ["default"]


@pytest.mark.interpreter
def test_low_rank_form_on_the_kernels_matches_the_reference(monkeypatch, assert_kernels_match_reference):
    """The rank-r^2 form rides on fastlora.ops.lora_linear: the Triton kernels (interpreted on CPU) give
    the reference's outputs and gradients."""
    monkeypatch.setattr(loha_module, "_low_rank_pays", lambda *args: True)
    torch.manual_seed(0)
    layer = LoHaLinear(torch.nn.Linear(40, 24).requires_grad_(False), r=3, init_weights=False)
    assert_kernels_match_reference(layer, torch.randn(3, 5, 40))
