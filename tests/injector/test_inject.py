"""The injector: which modules become ``LoraLinear`` (compared module for module with
``peft.get_peft_model`` on an identical tiny model), with which rank and alpha, and that every error
leaves the model exactly as it was.
"""

from __future__ import annotations

import copy
import types
import warnings

import peft
import pytest
import torch
import transformers
from peft.tuners.lora import LoraLayer
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS
from torch import nn

from fastlora import LoraConfig, LoraLinear, ModulesToSaveWrapper
from fastlora.injector import LORA_TARGET_MODULES, LoraModel

# Model types whose default PEFT cannot tell us (no default there, or none that works on this
# transformers): the expected module names are spelled out instead.
OWN_DEFAULTS = {
    "phi3": ["qkv_proj"],  # not in PEFT's table: fastlora targets the fused qkv projection
    "mixtral": ["q_proj", "v_proj"],  # PEFT 0.21 + transformers 5 fails to inject its own default here
    "gemma3": ["q_proj", "v_proj"],  # multimodal; not in PEFT's table
}
PEFT_COMPARED = [t for t in LORA_TARGET_MODULES if t not in OWN_DEFAULTS]


def _lora_layers(model: nn.Module, prefix: str = "") -> dict[str, tuple[int, float]]:
    """``{module path: (r, scaling)}`` of the default adapter, for fastlora's or PEFT's layers."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (LoraLinear, LoraLayer)):
            out[name.removeprefix(prefix)] = (module.r["default"], module.scaling["default"])
    return out


def _ours(model: nn.Module, **config) -> dict[str, tuple[int, float]]:
    return _lora_layers(LoraModel(model, LoraConfig(**config)).model)


def _peft(model: nn.Module, **config) -> dict[str, tuple[int, float]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _lora_layers(peft.get_peft_model(model, peft.LoraConfig(**config)), "base_model.model.")


def _tiny_gemma3(tiny_config, seed: int = 0) -> nn.Module:
    text = tiny_config("gemma3_text").to_dict()
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=16, patch_size=8)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=5, boi_token_index=6, eoi_token_index=7)
    torch.manual_seed(seed)
    return transformers.Gemma3ForConditionalGeneration(config).eval()


def _build(model_type: str, tiny_model, tiny_config) -> nn.Module:
    return _tiny_gemma3(tiny_config) if model_type == "gemma3" else tiny_model(model_type)


def _snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(name, type(m)) for name, m in model.named_modules()])


def _assert_unchanged(model: nn.Module, snapshot) -> None:
    state, modules = snapshot
    assert not any(isinstance(m, (LoraLinear, ModulesToSaveWrapper)) for m in model.modules())
    assert [(name, type(m)) for name, m in model.named_modules()] == modules
    now = model.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k], state[k]) for k in state)


# ---- default target table ---------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", [t for t in LORA_TARGET_MODULES if t in PEFT_TARGETS])
def test_default_table_equals_peft(model_type):
    assert LORA_TARGET_MODULES[model_type] == PEFT_TARGETS[model_type]


def test_every_table_entry_is_tested():
    assert set(PEFT_COMPARED) | set(OWN_DEFAULTS) == set(LORA_TARGET_MODULES)
    assert all(LORA_TARGET_MODULES[t] == names for t, names in OWN_DEFAULTS.items())


@pytest.mark.parametrize("model_type", PEFT_COMPARED)
def test_default_targets_swap_what_peft_swaps(model_type, tiny_model):
    ours = _ours(tiny_model(model_type))
    assert ours, "nothing injected"
    assert ours == _peft(tiny_model(model_type))


@pytest.mark.parametrize("model_type", sorted(OWN_DEFAULTS))
def test_default_targets_without_a_peft_default(model_type, tiny_model, tiny_config):
    model = _build(model_type, tiny_model, tiny_config)
    expected = {name for name, m in model.named_modules()
                if isinstance(m, nn.Linear) and name.rpartition(".")[2] in OWN_DEFAULTS[model_type]}
    assert len(expected) >= 2
    assert set(_ours(model)) == expected


def test_injected_model_starts_as_the_base_model(tiny_llama):
    base, model = tiny_llama(), tiny_llama()
    LoraModel(model, LoraConfig(target_modules="all-linear"))
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)


# ---- explicit targets, compared with PEFT -------------------------------------------------------------------

CASES = {
    "list-exact-and-suffix": ("llama", dict(target_modules=["q_proj", "self_attn.v_proj",
                                                            "model.layers.1.mlp.down_proj"])),
    "list-full-path": ("llama", dict(target_modules=["layers.0.self_attn.q_proj"])),
    "regex": ("llama", dict(target_modules=r".*\.(q|k)_proj")),
    "regex-by-layer": ("llama", dict(target_modules=r"model\.layers\.1\..*proj")),
    "all-linear-llama": ("llama", dict(target_modules="all-linear")),
    "all-linear-gpt2": ("gpt2", dict(target_modules="all-linear")),
    "all-linear-t5": ("t5", dict(target_modules="all-linear")),
    "all-linear-bert": ("bert", dict(target_modules="all-linear")),
    "all-linear-bart": ("bart", dict(target_modules="all-linear")),
    "all-linear-opt": ("opt", dict(target_modules="all-linear")),
    "all-linear-bloom": ("bloom", dict(target_modules="all-linear")),
    "all-linear-gpt_neox": ("gpt_neox", dict(target_modules="all-linear")),
    "all-linear-falcon": ("falcon", dict(target_modules="all-linear")),
    "exclude-list": ("llama", dict(target_modules="all-linear", exclude_modules=["o_proj", "model.layers.0.mlp.up_proj"])),
    "exclude-regex": ("llama", dict(target_modules="all-linear", exclude_modules=r".*mlp.*")),
    "layers_to_transform": ("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
    "layers_to_transform-int-pattern": ("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=0,
                                                      layers_pattern="layers")),
    "layers_pattern-gpt2": ("gpt2", dict(target_modules=["c_attn", "c_fc"], layers_to_transform=[1],
                                         layers_pattern="h")),
    "layers_pattern-t5": ("t5", dict(target_modules=["q", "v"], layers_to_transform=[0], layers_pattern="block")),
    "layers_to_transform-t5-first-index": ("t5", dict(target_modules=["q", "v"], layers_to_transform=[1])),
    "rank_alpha_pattern": ("llama", dict(target_modules="all-linear", r=8, lora_alpha=16,
                                         rank_pattern={"q_proj": 2, "model.layers.1.self_attn.v_proj": 3,
                                                       r"^model\.layers\.0\.mlp\..*": 5},
                                         alpha_pattern={"k_proj": 4, "down_proj": 32})),
    "rank_alpha_pattern-rslora": ("llama", dict(target_modules="all-linear", use_rslora=True, r=4,
                                                rank_pattern={"v_proj": 16}, alpha_pattern={"v_proj": 8})),
    "modules_to_save-skipped": ("llama", dict(target_modules=["q_proj", "v_proj"],
                                              modules_to_save=["model.layers.0.self_attn"])),
    "all-linear-with-lm_head-saved": ("llama", dict(target_modules="all-linear", modules_to_save=["lm_head"])),
}


@pytest.mark.filterwarnings("ignore:.*is a Conv1D")
@pytest.mark.parametrize("model_type, config", list(CASES.values()), ids=list(CASES))
def test_targets_equal_peft(model_type, config, tiny_model):
    ours = _ours(tiny_model(model_type), **config)
    assert ours, "nothing injected"
    assert ours == _peft(tiny_model(model_type), **config)  # same modules, same r and scaling each


def test_rank_and_alpha_patterns_are_applied(tiny_model):
    layers = _ours(tiny_model("llama"), **CASES["rank_alpha_pattern"][1])
    assert layers["model.layers.0.self_attn.q_proj"] == (2, 16 / 2)
    assert layers["model.layers.1.self_attn.v_proj"] == (3, 16 / 3)
    assert layers["model.layers.0.mlp.gate_proj"] == (5, 16 / 5)
    assert layers["model.layers.1.mlp.down_proj"] == (8, 32 / 8)
    assert layers["model.layers.1.self_attn.k_proj"] == (8, 4 / 8)
    assert layers["model.layers.1.self_attn.o_proj"] == (8, 16 / 8)


@pytest.mark.filterwarnings("ignore:.*is a Conv1D")
@pytest.mark.parametrize("model_type, head", [("llama", "lm_head"), ("gpt2", "lm_head"), ("t5", "lm_head"),
                                              ("bart", "lm_head")])
def test_all_linear_leaves_the_output_head(model_type, head, tiny_model):
    model = tiny_model(model_type)
    LoraModel(model, LoraConfig(target_modules="all-linear"))
    assert not isinstance(model.get_submodule(head), LoraLinear)
    assert sum(isinstance(m, LoraLinear) for m in model.modules()) > 4


def test_all_linear_leaves_the_classifier_for_seq_cls(tiny_bert_cls):
    config = dict(target_modules="all-linear", task_type="SEQ_CLS")
    ours = _ours(tiny_bert_cls(), **config)
    assert "classifier" not in ours and "bert.pooler.dense" in ours
    assert set(ours) == set(_peft(tiny_bert_cls(), **config))


def test_second_adapter_joins_the_existing_layers(tiny_llama):
    model = tiny_llama()
    lora = LoraModel(model, LoraConfig(target_modules=["q_proj", "v_proj"]))
    lora.inject_adapter(LoraConfig(target_modules=["q_proj", "k_proj"], r=2), "other")
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoraLinear) and sorted(q.lora_A) == ["default", "other"]
    assert not isinstance(q.base_layer, LoraLinear)  # never nested
    assert sorted(model.model.layers[0].self_attn.k_proj.lora_A) == ["other"]
    assert sorted(model.model.layers[0].self_attn.v_proj.lora_A) == ["default"]


@pytest.mark.parametrize("autocast, expected", [(True, torch.float32), (False, torch.bfloat16)])
def test_adapter_dtype_for_a_bf16_model(tiny_llama, autocast, expected):
    model = tiny_llama().to(torch.bfloat16)
    LoraModel(model, LoraConfig(), autocast_adapter_dtype=autocast)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == expected
    assert layer.base_layer.weight.dtype == torch.bfloat16


def test_unload_puts_every_base_layer_back(tiny_llama):
    base, model = tiny_llama(), tiny_llama()
    lora = LoraModel(model, LoraConfig(target_modules="all-linear", modules_to_save=["lm_head"]))
    plain = lora.unload()
    assert not any(isinstance(m, (LoraLinear, ModulesToSaveWrapper)) for m in plain.modules())
    assert list(plain.state_dict()) == list(base.state_dict())


# ---- GPT-2 Conv1D ---------------------------------------------------------------------------------------------------

def test_conv1d_gets_fan_in_fan_out_with_a_warning_and_matches_peft(tiny_gpt2):
    model = tiny_gpt2()
    with pytest.warns(UserWarning, match="Conv1D"):
        LoraModel(model, LoraConfig(target_modules=["c_attn", "c_proj"], init_lora_weights=False))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoraLinear) and layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (32, 96)
    assert layer.lora_A["default"].weight.shape == (8, 32) and layer.lora_B["default"].weight.shape == (96, 8)

    theirs = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(target_modules=["c_attn", "c_proj"],
                                                              fan_in_fan_out=True, init_lora_weights=False))
    assert sorted(model.state_dict()) == sorted(theirs.base_model.model.state_dict())
    theirs.base_model.model.load_state_dict(model.state_dict())
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(ids).logits, tiny_gpt2()(ids).logits)  # the adapters do something


def test_conv1d_with_fan_in_fan_out_set_gives_no_warning(tiny_gpt2):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        LoraModel(tiny_gpt2(), LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True))


def test_fan_in_fan_out_on_a_linear_is_corrected_with_a_warning(tiny_llama):
    model = tiny_llama()
    with pytest.warns(UserWarning, match="nn.Linear"):
        LoraModel(model, LoraConfig(fan_in_fan_out=True, init_lora_weights=False))
    layer = model.model.layers[0].self_attn.q_proj
    assert not layer.fan_in_fan_out
    x = torch.randn(3, 32)
    expected = layer.base_layer(x) + x @ layer.get_delta_weight("default").t()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


# ---- errors leave the model unchanged ---------------------------------------------------------------------------------

class _Custom(nn.Module):
    def __init__(self, model_type):
        super().__init__()
        self.config = types.SimpleNamespace(model_type=model_type)
        self.proj = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)


@pytest.mark.parametrize("model_type", ["my_arch", None])
def test_no_default_and_no_targets_names_the_model_type(model_type):
    model = _Custom(model_type)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=rf"model_type {model_type!r} has no default targets.*target_modules"):
        LoraModel(model, LoraConfig())
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(target_modules=["nonexistent"]), r"\['nonexistent'\] matched no module.*'llama'.*q_proj"),
        (dict(target_modules=r"q_proj"), r"'q_proj' matched no module"),  # a str is a full-match regex
        (dict(target_modules=["q_proj"], layers_to_transform=[5]), r"layers_to_transform=\[5\]"),
        (dict(target_modules=["q_proj"], exclude_modules=["q_proj"]), r"exclude_modules=\['q_proj'\]"),
        (dict(target_modules=["embed_tokens"]), r"embed_tokens \(Embedding\).*not supported"),
        (dict(target_modules=["q_proj", "embed_tokens"]), r"not supported"),  # checked before any swap
        (dict(target_modules=["q_proj"], modules_to_save=["nonexistent_head", "model.layers.0.self_attn"]), None),
    ],
    ids=["no-match", "regex-no-fullmatch", "layers-out-of-range", "all-excluded", "embedding",
         "partly-unsupported", "ok-control"],
)
def test_errors_leave_the_model_unchanged(tiny_llama, config, match):
    model = tiny_llama()
    snapshot = _snapshot(model)
    if match is None:  # the control: the same check does see a change when injection succeeds
        LoraModel(model, LoraConfig(**config))
        with pytest.raises(AssertionError):
            _assert_unchanged(model, snapshot)
        return
    with pytest.raises(ValueError, match=match):
        LoraModel(model, LoraConfig(**config))
    _assert_unchanged(model, snapshot)


def test_injection_raises_before_swapping(tiny_llama):
    model = tiny_llama()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="not supported"):
        LoraModel(model, LoraConfig(target_modules=["q_proj", "embed_tokens"]))
    _assert_unchanged(model, snapshot)
    LoraModel(model, LoraConfig(target_modules=["q_proj"]))
    names = [key for key, m in model.named_modules() if isinstance(m, LoraLinear)]
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


@pytest.mark.parametrize(
    "second, match",
    [
        (dict(target_modules=["nonexistent"]), "matched no module"),
        (dict(target_modules=["k_proj"], modules_to_save=["q_proj"]), "both a LoRA target and in modules_to_save"),
    ],
    ids=["no-match", "fails-after-swapping"],
)
def test_failed_second_adapter_leaves_the_first_intact(tiny_llama, second, match):
    model = tiny_llama()
    lora = LoraModel(model, LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types_before = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match=match):
        lora.inject_adapter(LoraConfig(**second), "second")
    assert list(lora.peft_config) == ["default"]
    assert [(n, type(m)) for n, m in model.named_modules()] == types_before
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all("second" not in m.lora_A for m in model.modules() if isinstance(m, LoraLinear))


def test_snapshot_check_sees_a_second_adapter(tiny_llama):
    # The check above can fail: a second adapter that did get in changes the state_dict keys.
    model = tiny_llama()
    lora = LoraModel(model, LoraConfig(target_modules=["q_proj"]))
    before = list(model.state_dict())
    lora.inject_adapter(LoraConfig(target_modules=["k_proj"]), "second")
    assert list(model.state_dict()) != before
    assert copy.deepcopy(lora.peft_config).keys() == {"default", "second"}
