"""AdaLoRA against the real PEFT on config-built Llama (GQA), GPT-2 (Conv1D, fan_in_fan_out) and BERT:
names, counts, outputs, gradients (with the orthogonal penalty in the loss), merging, checkpoints both
ways; and a short training run, side by side with PEFT, in which ``update_and_allocate`` prunes the
budget from init_r to target_r per layer, allocates the same ranks as PEFT, and saves adapters (with
``rank_pattern``) that each library loads from the other with the same outputs."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastlora
from fastlora.methods.adalora import SVDLinear

TOL = dict(rtol=1e-5, atol=1e-5)

CASES = {
    "llama": dict(factory="tiny_llama", task_type="CAUSAL_LM",
                  kwargs=dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    "gpt2-conv1d": dict(factory="tiny_gpt2", task_type="CAUSAL_LM",
                        kwargs=dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "bert-seqcls": dict(factory="tiny_bert_cls", task_type="SEQ_CLS",
                        kwargs=dict(target_modules=["query", "value"], modules_to_save=["classifier"])),
}
SCHEDULE = dict(init_r=6, target_r=2, tinit=2, tfinal=2, deltaT=1, total_step=10, lora_alpha=8)


def _configs(case, **overrides):
    kwargs = dict(task_type=case["task_type"], **SCHEDULE, **case["kwargs"])
    kwargs.update(overrides)
    return fastlora.AdaLoraConfig(**kwargs), peft.AdaLoraConfig(**kwargs)


def _pair(parity, case, **overrides):
    return parity.pair(case["base"], *_configs(case, **overrides))


def test_names_trainable_set_and_printout_match_peft(case, capsys):
    fl_config, pf_config = _configs(case)
    fl_model = fastlora.get_peft_model(copy.deepcopy(case["base"]), fl_config)
    pf_model = peft.get_peft_model(copy.deepcopy(case["base"]), pf_config)
    assert list(fl_model.state_dict()) == list(pf_model.state_dict())  # lora_A/B/E and ranknum, in order
    trainable = lambda m: [n for n, p in m.named_parameters() if p.requires_grad]  # noqa: E731
    assert trainable(fl_model) == trainable(pf_model)
    fl_model.print_trainable_parameters()
    pf_model.print_trainable_parameters()
    fl_text, pf_text = capsys.readouterr().out.splitlines()
    assert fl_text == pf_text


def test_outputs_loss_and_gradients_match_peft(case, parity):
    fl_model, pf_model = _pair(parity, case)
    batch = parity.batch(case["base"], labels=True)
    fl_out = parity.out(fl_model, batch)
    assert not torch.allclose(fl_out, parity.out(case["base"], batch), **TOL)
    torch.testing.assert_close(fl_out, parity.out(pf_model, batch), **TOL)
    losses = []
    for model in (fl_model, pf_model):
        model.train()
        torch.manual_seed(0)
        loss = model(**batch).loss  # with the orthogonal penalty on A and B
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], **TOL)
    with torch.no_grad():
        torch.manual_seed(0)
        plain = fl_model.base_model.model(**batch).loss  # the transformers model alone: no penalty
    assert losses[0] > plain + 1e-3
    parity.assert_same_grads(fl_model, pf_model)


@pytest.mark.parametrize("writer", ["fastlora", "peft"])
def test_checkpoints_load_both_ways(case, writer, tmp_path, parity):
    fl_model, pf_model = _pair(parity, case)
    batch = parity.batch(case["base"])
    fl_model.save_pretrained(tmp_path / "fastlora")
    pf_model.save_pretrained(tmp_path / "peft")
    fl_saved, pf_saved = (load_file(tmp_path / w / "adapter_model.safetensors") for w in ("fastlora", "peft"))
    assert fl_saved.keys() == pf_saved.keys()
    assert not any("ranknum" in k for k in fl_saved)  # as PEFT: ranknum is init_r, never saved
    reader = peft if writer == "fastlora" else fastlora
    loaded = reader.PeftModel.from_pretrained(copy.deepcopy(case["base"]), tmp_path / writer).eval()
    torch.testing.assert_close(parity.out(loaded, batch), parity.out(pf_model, batch), **TOL)


@pytest.mark.parametrize("safe_merge", [False, True], ids=["merge", "safe_merge"])
def test_merge_and_unload_matches_peft(case, safe_merge, parity):
    fl_model, pf_model = _pair(parity, case)
    batch = parity.batch(case["base"])
    unmerged = parity.out(fl_model, batch)
    fl_model.merge_adapter()
    torch.testing.assert_close(parity.out(fl_model, batch), unmerged, **TOL)
    fl_model.unmerge_adapter()
    torch.testing.assert_close(parity.out(fl_model, batch), unmerged, **TOL)
    fl_merged = fl_model.merge_and_unload(safe_merge=safe_merge)
    pf_merged = pf_model.merge_and_unload(safe_merge=safe_merge)
    assert list(fl_merged.state_dict()) == list(case["base"].state_dict())
    torch.testing.assert_close(parity.out(fl_merged, batch), unmerged, **TOL)
    pf_state = pf_merged.state_dict()
    for name, tensor in fl_merged.state_dict().items():
        torch.testing.assert_close(tensor, pf_state[name], **TOL, msg=name)


# ---- the rank allocator: a short training run beside PEFT's --------------------------------------------------

def _train_side_by_side(base, task_type, kwargs, steps):
    configs = dict(task_type=task_type, **SCHEDULE, **kwargs)
    pf_model = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(**configs))
    fl_model = fastlora.get_peft_model(copy.deepcopy(base), fastlora.AdaLoraConfig(**configs))
    fl_model.load_state_dict(pf_model.state_dict())
    models = (fl_model, pf_model)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in models]
    gen = torch.Generator().manual_seed(0)
    budgets = []
    for step in range(steps):
        input_ids = torch.randint(2, base.config.vocab_size, (4, 12), generator=gen)
        for model, optimizer in zip(models, optimizers):
            model.train()
            model(input_ids=input_ids, labels=input_ids).loss.backward()
            optimizer.step()
            model.base_model.update_and_allocate(step)
            optimizer.zero_grad()
        patterns = [m.peft_config["default"].rank_pattern for m in models]
        if patterns[1] is not None:  # PEFT's keys carry the adapter name until saved
            patterns[1] = {k.replace(".default", ""): v for k, v in patterns[1].items()}
        assert patterns[0] == patterns[1], f"step {step}: the allocations differ"
        budgets.append(None if patterns[0] is None else sum(sum(keep) for keep in patterns[0].values()))
    return fl_model.eval(), pf_model.eval(), budgets


def test_budget_falls_to_target_like_peft_and_pruned_adapters_load_both_ways(tiny_llama, tmp_path, capsys, parity):
    base = tiny_llama()
    targets = ["q_proj", "v_proj", "down_proj"]
    fl_model, pf_model, budgets = _train_side_by_side(base, "CAUSAL_LM", dict(target_modules=targets),
                                                      SCHEDULE["total_step"])
    layers = 2 * len(targets)
    # tinit steps at init_r, then a falling budget, then target_r per layer on average for the last tfinal steps
    assert budgets[: SCHEDULE["tinit"] + 1] == [None] * (SCHEDULE["tinit"] + 1)
    falling = [b for b in budgets if b is not None]
    assert falling == sorted(falling, reverse=True) and falling[0] < SCHEDULE["init_r"] * layers
    assert falling[-1] == SCHEDULE["target_r"] * layers and falling.count(falling[-1]) >= SCHEDULE["tfinal"] + 1
    pattern = fl_model.peft_config["default"].rank_pattern
    for key, keep in pattern.items():  # pruned ranks have E = 0 in the live model
        layer = fl_model.base_model.model.get_submodule(key.removesuffix(".lora_E"))
        assert (layer.lora_E["default"].flatten()[~torch.tensor(keep)] == 0).all()

    batch = parity.batch(base)
    expected = parity.out(fl_model, batch)
    torch.testing.assert_close(expected, parity.out(pf_model, batch), **TOL)
    fl_model.save_pretrained(tmp_path / "fastlora")
    pf_model.save_pretrained(tmp_path / "peft")
    for writer in ("fastlora", "peft"):
        saved = json.loads((tmp_path / writer / "adapter_config.json").read_text())["rank_pattern"]
        assert saved == pattern
    fl_saved = load_file(tmp_path / "fastlora" / "adapter_model.safetensors")
    pf_saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in fl_saved.items()} == {k: v.shape for k, v in pf_saved.items()}
    q0 = "base_model.model.model.layers.0.self_attn.q_proj"
    assert fl_saved[f"{q0}.lora_A"].shape[0] == sum(pattern["model.layers.0.self_attn.q_proj.lora_E"])
    for key, tensor in fl_saved.items():
        torch.testing.assert_close(tensor, pf_saved[key], rtol=1e-4, atol=1e-5, msg=key)

    for writer, reader in (("fastlora", peft), ("peft", fastlora), ("fastlora", fastlora)):
        loaded = reader.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / writer).eval()
        torch.testing.assert_close(parity.out(loaded, batch), expected, **TOL, msg=f"{writer} -> {reader.__name__}")
    # a pruned adapter loaded for more training: the same shapes and counts as PEFT's
    counts = [lib.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "fastlora", is_trainable=True)
              .get_nb_trainable_parameters() for lib in (fastlora, peft)]
    assert counts[0] == counts[1] and counts[0][0] == sum(t.numel() for t in fl_saved.values())


def test_update_and_allocate_needs_gradients(tiny_llama):
    model = fastlora.get_peft_model(tiny_llama(), fastlora.AdaLoraConfig(target_modules=["q_proj"], total_step=5))
    with pytest.raises(RuntimeError, match="after loss.backward"):
        model.base_model.update_and_allocate(0)


# ---- several adapters: one trainable, the others for inference (as PEFT) --------------------------------------

def test_several_adapters_match_peft(case, parity):
    second = dict(task_type=case["task_type"], **SCHEDULE, **case["kwargs"])
    second.update(target_modules=case["kwargs"]["target_modules"][:1], init_r=3, inference_mode=True,
                  init_lora_weights=False)
    models = []
    for lib in (fastlora, peft):
        model = lib.get_peft_model(copy.deepcopy(case["base"]), lib.AdaLoraConfig(task_type=case["task_type"],
                                                                                  **SCHEDULE, **case["kwargs"]))
        model.add_adapter("second", lib.AdaLoraConfig(**second))
        models.append(model)
    fl_model, pf_model = models
    parity.perturb(pf_model)
    fl_model.load_state_dict(pf_model.state_dict())
    trainable = lambda m: [n for n, p in m.named_parameters() if p.requires_grad]  # noqa: E731
    assert trainable(fl_model) == trainable(pf_model)
    batch = parity.batch(case["base"])
    outs = {}
    for name in ("default", "second"):
        for model in models:
            model.set_adapter(name)
            model.eval()
        outs[name] = parity.out(fl_model, batch)
        torch.testing.assert_close(outs[name], parity.out(pf_model, batch), **TOL, msg=name)
    assert not torch.allclose(outs["default"], outs["second"])
    with fl_model.disable_adapter():
        torch.testing.assert_close(parity.out(fl_model, batch), parity.out(case["base"], batch), **TOL)
    fl_model.delete_adapter("second")
    assert fl_model.active_adapters == ["default"]
    assert not any(".second" in k for k in fl_model.state_dict())
    torch.testing.assert_close(parity.out(fl_model, batch), outs["default"], **TOL)


def test_a_second_trainable_adapter_is_refused_before_any_swap(tiny_llama):
    model = fastlora.get_peft_model(tiny_llama(), fastlora.AdaLoraConfig(target_modules=["q_proj"], total_step=5))
    before = list(model.state_dict())
    with pytest.raises(ValueError, match="inference_mode=True"):
        model.add_adapter("second", fastlora.AdaLoraConfig(target_modules=["v_proj"], total_step=5))
    assert list(model.state_dict()) == before and list(model.peft_config) == ["default"]


# ---- bad input ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "total_step"),
        (dict(total_step=0), "total_step"),
        (dict(total_step=10, target_r=16, init_r=12), "must not exceed init_r"),
        (dict(total_step=10, tinit=6, tfinal=4), "no budgeting phase"),
        (dict(total_step=10, orth_reg_weight=-1.0), "orth_reg_weight"),
        (dict(total_step=10, beta1=1.0), "beta1"),
        (dict(total_step=10, rank_pattern={"q_proj.lora_E": "all"}), "keep-flags"),
    ],
    ids=["no-total-step", "zero-total-step", "target-above-init", "no-budget-phase", "orth", "beta", "rank-pattern"],
)
def test_bad_configs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastlora.AdaLoraConfig(**kwargs)


def test_bad_targets_leave_the_model_unchanged(tiny_llama):
    model = tiny_llama()
    before = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match="matched no module"):
        fastlora.get_peft_model(model, fastlora.AdaLoraConfig(target_modules=["nope"], total_step=5))
    assert [(n, type(m)) for n, m in model.named_modules()] == before
    assert not any(isinstance(m, SVDLinear) for m in model.modules())


def test_peft_config_with_every_key_loads_without_warnings(tmp_path):
    import warnings

    peft.AdaLoraConfig(total_step=10, target_modules=["q_proj"]).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = fastlora.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, fastlora.AdaLoraConfig) and config.total_step == 10 and config.rank_pattern is None


@pytest.mark.interpreter
def test_kernel_backend_matches_the_reference(assert_kernels_match_reference):
    """``B (E * A)`` rides on fastlora.ops.lora_linear: the Triton kernels (interpreted on CPU) give the
    reference's outputs and gradients."""
    torch.manual_seed(0)
    layer = SVDLinear(torch.nn.Linear(40, 24).requires_grad_(False), r=6, init_lora_weights=False)
    assert_kernels_match_reference(layer, torch.randn(3, 5, 40))
