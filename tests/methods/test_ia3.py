"""IA3 against the real PEFT: names, counts, outputs, gradients, merging, checkpoints both ways and
several adapters, on config-built Llama (GQA), GPT-2 (Conv1D, fan_in_fan_out) and BERT (classifier head)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import fastlora
from fastlora.methods.ia3 import IA3Linear, _IA3Linear

TOL = dict(rtol=1e-5, atol=1e-5)

CASES = {
    "llama": dict(factory="tiny_llama", task_type="CAUSAL_LM",
                  kwargs=dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "gpt2-conv1d": dict(factory="tiny_gpt2", task_type="CAUSAL_LM",
                        kwargs=dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                                    fan_in_fan_out=True)),
    "bert-seqcls": dict(factory="tiny_bert_cls", task_type="SEQ_CLS",
                        kwargs=dict(target_modules=["key", "value", "output.dense"],
                                    feedforward_modules=["output.dense"], modules_to_save=["classifier"])),
    "llama-defaults": dict(factory="tiny_llama", task_type="CAUSAL_LM", kwargs=dict()),
}


def _configs(case, **overrides):
    kwargs = dict(task_type=case["task_type"], **case["kwargs"])
    kwargs.update(overrides)
    return fastlora.IA3Config(**kwargs), peft.IA3Config(**kwargs)


def _pair(parity, case, **overrides):
    return parity.pair(case["base"], *_configs(case, **overrides))


def test_names_trainable_set_and_printout_match_peft(case, capsys):
    fl_config, pf_config = _configs(case)
    fl_model = fastlora.get_peft_model(copy.deepcopy(case["base"]), fl_config)
    pf_model = peft.get_peft_model(copy.deepcopy(case["base"]), pf_config)
    assert list(fl_model.state_dict()) == list(pf_model.state_dict())
    trainable = lambda m: [n for n, p in m.named_parameters() if p.requires_grad]  # noqa: E731
    assert trainable(fl_model) == trainable(pf_model)
    assert any(n.endswith(".ia3_l.default") for n in trainable(fl_model))
    fl_model.print_trainable_parameters()
    pf_model.print_trainable_parameters()
    fl_text, pf_text = capsys.readouterr().out.splitlines()
    assert fl_text == pf_text
    # which layers scale their input is PEFT's choice too
    pf_ff = {n: m.is_feedforward for n, m in pf_model.named_modules() if hasattr(m, "ia3_l")}
    fl_ff = {n: m.is_feedforward for n, m in fl_model.named_modules() if isinstance(m, IA3Linear)}
    assert fl_ff == pf_ff and any(fl_ff.values()) and not all(fl_ff.values())


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
    assert parity.saved_keys(tmp_path / "fastlora") == parity.saved_keys(tmp_path / "peft")
    assert any(k.endswith(".ia3_l") for k in parity.saved_keys(tmp_path / "fastlora"))
    reader = peft if writer == "fastlora" else fastlora
    loaded = reader.PeftModel.from_pretrained(copy.deepcopy(case["base"]), tmp_path / writer).eval()
    torch.testing.assert_close(parity.out(loaded, batch), parity.out(pf_model, batch), **TOL)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference, as PEFT does


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
    pf_state = pf_merged.state_dict()
    for name, tensor in fl_merged.state_dict().items():
        torch.testing.assert_close(tensor, pf_state[name], **TOL, msg=name)


def test_merge_adapter_then_unmerge(case, parity):
    fl_model, pf_model = _pair(parity, case)
    batch = parity.batch(case["base"])
    unmerged = parity.out(fl_model, batch)
    before = {k: v.clone() for k, v in fl_model.state_dict().items()}
    fl_model.merge_adapter()
    pf_model.merge_adapter()
    torch.testing.assert_close(parity.out(fl_model, batch), unmerged, **TOL)
    torch.testing.assert_close(parity.out(fl_model, batch), parity.out(pf_model, batch), **TOL)
    fl_model.unmerge_adapter()
    torch.testing.assert_close(parity.out(fl_model, batch), unmerged, **TOL)
    for name, tensor in fl_model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=1e-5, atol=1e-6, msg=name)


def test_safe_merge_refuses_nan_and_changes_nothing(tiny_llama):
    model = fastlora.get_peft_model(tiny_llama(), fastlora.IA3Config(target_modules=["k_proj", "down_proj"],
                                                                     feedforward_modules=["down_proj"]))
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        layer.ia3_l["default"][0, 3] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.merge_and_unload(safe_merge=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]) or name.endswith("ia3_l.default"), name


def test_several_adapters_match_peft_and_checkpoints_cross(case, tmp_path, parity):
    second = dict(case["kwargs"])
    second["target_modules"] = (second.get("target_modules") or ["k_proj", "v_proj", "down_proj"])[:1]
    second["feedforward_modules"] = []
    models = []
    for lib in (fastlora, peft):
        model = lib.get_peft_model(copy.deepcopy(case["base"]), lib.IA3Config(task_type=case["task_type"],
                                                                               **case["kwargs"]))
        model.add_adapter("second", lib.IA3Config(task_type=case["task_type"], **second))
        assert [n for n, p in model.named_parameters() if p.requires_grad and ".second" in n] == []
        for seed, name in enumerate(("default", "second"), start=1):
            model.set_adapter(name)
            parity.perturb(model, seed=seed)
        models.append(model.eval())
    fl_model, pf_model = models
    batch = parity.batch(case["base"])
    outs = {}
    for name in ("default", "second"):
        for model in models:
            model.set_adapter(name)
        outs[name] = parity.out(fl_model, batch)
        torch.testing.assert_close(outs[name], parity.out(pf_model, batch), **TOL, msg=name)
    assert not torch.allclose(outs["default"], outs["second"])
    with fl_model.disable_adapter():
        torch.testing.assert_close(parity.out(fl_model, batch), parity.out(case["base"], batch), **TOL)
    fl_model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(case["base"]), tmp_path)
    loaded.load_adapter(tmp_path / "second", adapter_name="second")
    loaded.set_adapter("second")
    torch.testing.assert_close(parity.out(loaded.eval(), batch), outs["second"], **TOL)

    for model in models:
        model.delete_adapter("second")
    assert list(fl_model.state_dict()) == list(pf_model.state_dict())
    assert fl_model.active_adapters == pf_model.active_adapters == ["default"]
    torch.testing.assert_close(parity.out(fl_model, batch), outs["default"], **TOL)


# ---- the scaling op itself ----------------------------------------------------------------------------------

@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "input"])
@pytest.mark.parametrize("rows", [3, 40], ids=["few-rows", "many-rows"])
def test_scaling_op_gradients_and_nograd_fold(feedforward, rows):
    gen = torch.Generator().manual_seed(0)
    k, n = 12, 9
    x = torch.randn(rows, k, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(n, k, generator=gen, dtype=torch.float64)
    bias = torch.randn(n, generator=gen, dtype=torch.float64)
    scale = torch.randn(k if feedforward else n, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, s: _IA3Linear.apply(x, weight, bias, s, feedforward), (x, scale))
    # the no-grad path folds the vector into W when W is the smaller tensor: same numbers
    reference = (x * scale) @ weight.t() + bias if feedforward else (x @ weight.t() + bias) * scale
    layer = IA3Linear(torch.nn.Linear(k, n, dtype=torch.float64), is_feedforward=feedforward,
                      adapter_dtype=torch.float64)
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        layer.base_layer.bias.copy_(bias)
        layer.ia3_l["default"].copy_(scale.reshape(layer.ia3_l["default"].shape))
        torch.testing.assert_close(layer(x), reference)


# ---- bad input: clear errors before any module is swapped ---------------------------------------------------

def test_feedforward_outside_targets_is_refused():
    with pytest.raises(ValueError, match="subset of target_modules"):
        fastlora.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError):
        peft.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_modules=["nonexistent"], feedforward_modules=[]), "matched no module"),
        (dict(target_modules=["embed_tokens"], feedforward_modules=[]), "not supported: IA3 wraps"),
    ],
    ids=["no-match", "embedding"],
)
def test_bad_targets_leave_the_model_unchanged(tiny_llama, kwargs, match):
    model = tiny_llama()
    before = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match=match):
        fastlora.get_peft_model(model, fastlora.IA3Config(**kwargs))
    assert [(n, type(m)) for n, m in model.named_modules()] == before
    assert all(p.requires_grad for p in model.parameters())


def test_model_type_without_feedforward_default_needs_it(tiny_model):
    model = tiny_model("phi3")  # no IA3 defaults for phi3 in PEFT's tables
    before = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match="feedforward_modules is not set"):
        fastlora.get_peft_model(model, fastlora.IA3Config(target_modules=["qkv_proj"]))
    assert [(n, type(m)) for n, m in model.named_modules()] == before
    fastlora.get_peft_model(model, fastlora.IA3Config(target_modules=["qkv_proj"], feedforward_modules=[]))


def test_config_round_trips_through_peft(tmp_path):
    fastlora.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]).save_pretrained(
        tmp_path / "fl")
    peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]).save_pretrained(
        tmp_path / "pf")
    by_peft = peft.PeftConfig.from_pretrained(tmp_path / "fl")
    assert isinstance(by_peft, peft.IA3Config) and by_peft.feedforward_modules == {"down_proj"}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key PEFT writes is known
        by_fastlora = fastlora.PeftConfig.from_pretrained(tmp_path / "pf")
    assert isinstance(by_fastlora, fastlora.IA3Config) and by_fastlora.feedforward_modules == ["down_proj"]
