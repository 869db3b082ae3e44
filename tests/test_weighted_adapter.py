"""``add_weighted_adapter`` against PEFT's: the same source adapters (same weights, copied) combined in
each of PEFT's ways give the same new adapter, tensor for tensor (for the svd ones: the same update B A,
since singular vectors are fixed only up to sign; for dare: after the same ``torch.manual_seed``), the same
outputs and a config PEFT reads.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastlora

peft = pytest.importorskip("peft")

TOL = dict(rtol=1e-5, atol=1e-6)
IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])


def _sources(base, lib, targets, fan_in_fan_out=False):
    """A model with adapters "one" (r 4, alpha 8) and "two" (r 4, alpha 4; r 6 where asked), B not zero.
    (Not "a" and "b": PEFT warns that a name inside its prefix "lora_" may be re-initialized on loading.)"""
    common = dict(task_type="CAUSAL_LM", init_lora_weights=False, fan_in_fan_out=fan_in_fan_out)
    model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(r=4, lora_alpha=8, target_modules=targets[0],
                                                                   **common), adapter_name="one")
    model.add_adapter("two", lib.LoraConfig(r=targets[2], lora_alpha=4, target_modules=targets[1], **common))
    return model


def _pair(base, targets=(["q_proj", "v_proj"], ["q_proj", "k_proj"], 4), fan_in_fan_out=False):
    theirs = _sources(base, peft, targets, fan_in_fan_out)
    ours = _sources(base, fastlora, targets, fan_in_fan_out)
    torch.manual_seed(1)
    with torch.no_grad():  # every adapter tensor drawn at a scale whose updates show in the outputs
        for name, param in theirs.named_parameters():
            if ".lora_" in name:
                param.normal_(0, 0.2)
    ours.load_state_dict(theirs.state_dict())  # same keys: PEFT's adapter weights in fastlora's layers
    return ours, theirs


def _deltas(model, name):
    return {key: m.lora_B[name].weight @ m.lora_A[name].weight for key, m in model.named_modules()
            if hasattr(m, "lora_A") and name in m.lora_A}


def _logits(model, adapter):
    model.set_adapter(adapter)
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


COMBINATIONS = [
    dict(combination_type="linear"),
    dict(combination_type="cat"),
    dict(combination_type="svd"),
    dict(combination_type="svd", svd_rank=3, svd_clamp=0.9),
    dict(combination_type="ties", density=0.5),
    dict(combination_type="ties", density=0.3, majority_sign_method="frequency"),
    dict(combination_type="magnitude_prune", density=0.5),
    dict(combination_type="dare_linear", density=0.5),
    dict(combination_type="dare_ties", density=0.7),
    dict(combination_type="ties_svd", density=0.5, svd_rank=3),
    dict(combination_type="dare_linear_svd", density=0.5),
    dict(combination_type="dare_ties_svd", density=0.6, majority_sign_method="frequency"),
    dict(combination_type="magnitude_prune_svd", density=0.4),
]


@pytest.mark.parametrize("kwargs", COMBINATIONS, ids=lambda k: "-".join(map(str, k.values())))
def test_weighted_adapter_matches_peft(kwargs, tiny_llama):
    ours, theirs = _pair(tiny_llama())
    for model in (ours, theirs):
        torch.manual_seed(0)  # dare's random pruning
        model.add_weighted_adapter(["one", "two"], [0.7, -0.3], "mix", **kwargs)
    trainable = lambda m: [n for n, p in m.named_parameters() if p.requires_grad]  # noqa: E731
    assert trainable(ours) == trainable(theirs) and not any(".mix." in n for n in trainable(ours))  # frozen
    assert set(ours.peft_config["mix"].target_modules) == set(theirs.peft_config["mix"].target_modules)
    assert ours.peft_config["mix"].r == theirs.peft_config["mix"].r
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    if not kwargs["combination_type"].endswith("svd"):
        for key in ours_sd:
            torch.testing.assert_close(ours_sd[key], theirs_sd[key], **TOL)
    ours_d, theirs_d = _deltas(ours, "mix"), _deltas(theirs, "mix")
    assert list(ours_d) == list(theirs_d)
    for key in ours_d:
        torch.testing.assert_close(ours_d[key], theirs_d[key], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_logits(ours, "mix"), _logits(theirs, "mix"), rtol=1e-4, atol=1e-5)


def test_cat_is_the_weighted_sum_of_the_updates_and_svd_of_full_rank_too(tiny_llama):
    ours, _ = _pair(tiny_llama(), targets=(["q_proj"], ["q_proj"], 6))  # ranks 4 and 6
    ours.add_weighted_adapter(["one", "two"], [0.5, 2.0], "cat", combination_type="cat")
    ours.add_weighted_adapter(["one", "two"], [0.5, 2.0], "svd", combination_type="svd", svd_rank=10)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    expected = 0.5 * layer.get_delta_weight("one") + 2.0 * layer.get_delta_weight("two")
    for name in ("cat", "svd"):
        assert layer.lora_A[name].weight.shape[0] == 10 and layer.scaling[name] == 1.0
        torch.testing.assert_close(layer.get_delta_weight(name), expected, rtol=1e-4, atol=1e-5)


def test_gpt2_conv1d_layers_combine_as_in_peft(tiny_gpt2, tmp_path):
    targets = (["c_attn"], ["c_attn", "c_fc"], 4)
    ours, theirs = _pair(tiny_gpt2(), targets=targets, fan_in_fan_out=True)
    for model in (ours, theirs):
        model.add_weighted_adapter(["one", "two"], [1.0, 0.5], "mix", combination_type="svd")
    torch.testing.assert_close(_logits(ours, "mix"), _logits(theirs, "mix"), rtol=1e-4, atol=1e-5)
    ours.save_pretrained(tmp_path, selected_adapters=["mix"])  # a combined adapter saves and PEFT loads it
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(theirs.get_base_model()), tmp_path / "mix",
                                            adapter_name="mix")
    torch.testing.assert_close(_logits(loaded, "mix"), _logits(ours, "mix"), rtol=1e-5, atol=1e-6)


def test_bad_requests_are_refused_and_change_nothing(tiny_llama):
    ours, _ = _pair(tiny_llama(), targets=(["q_proj"], ["q_proj"], 6))
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    cases = [
        (dict(adapters=["one", "two"], weights=[1.0, 1.0], adapter_name="one"), ValueError, "already exists"),
        (dict(adapters=["one", "nope"], weights=[1.0, 1.0], adapter_name="x"), ValueError, "unknown adapter 'nope'"),
        (dict(adapters=["one", "two"], weights=[1.0], adapter_name="x"), ValueError, "one weight per adapter"),
        (dict(adapters=["one", "two"], weights=[1.0, 1.0], adapter_name="x", combination_type="linear"), ValueError,
         "one rank"),
        (dict(adapters=["one", "two"], weights=[1.0, 1.0], adapter_name="x", combination_type="ties_svd"), ValueError,
         "give density"),
        (dict(adapters=["one", "two"], weights=[1.0, 1.0], adapter_name="x", combination_type="dare_ties_svd",
              density=0.5, majority_sign_method="most"), ValueError, "majority_sign_method"),
        (dict(adapters=["one", "two"], weights=[1.0, 1.0], adapter_name="x", combination_type="avg"), ValueError,
         "unknown combination_type"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            ours.add_weighted_adapter(**kwargs)
    assert sorted(ours.peft_config) == ["one", "two"]
    after = ours.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_a_combination_that_fails_halfway_leaves_no_adapter_behind(tiny_llama, monkeypatch):
    ours, _ = _pair(tiny_llama())
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    calls = []

    def svd_failing_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.linalg.LinAlgError("did not converge")
        return svd(*args, **kwargs)

    svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", svd_failing_second)
    with pytest.raises(torch.linalg.LinAlgError):
        ours.add_weighted_adapter(["one", "two"], [1.0, 1.0], "mix")
    assert len(calls) == 2 and sorted(ours.peft_config) == ["one", "two"]
    after = ours.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_a_layer_that_only_the_union_of_targets_reaches_gets_no_update(tiny_llama):
    """The new adapter takes the first source's config with the union of the targets, so it can reach a
    layer that no source adapts (here layer 0's v_proj): there its update is zero, not its random init."""
    common = dict(r=4, init_lora_weights=False)
    first = fastlora.LoraConfig(target_modules=["q_proj"], layers_to_transform=[0], **common)
    model = fastlora.get_peft_model(tiny_llama(), first, adapter_name="one")
    model.add_adapter("two", fastlora.LoraConfig(target_modules=["v_proj"], layers_to_transform=[1], **common))
    model.add_weighted_adapter(["one", "two"], [1.0, 1.0], "mix", combination_type="cat")
    attn = model.base_model.model.model.layers[0].self_attn
    assert "mix" in attn.v_proj.lora_A and "one" not in attn.v_proj.lora_A
    assert attn.v_proj.get_delta_weight("mix").abs().sum() == 0
    torch.testing.assert_close(attn.q_proj.get_delta_weight("mix"), attn.q_proj.get_delta_weight("one"))
