"""``LoraConfig`` / ``PeftConfig``: PEFT's field names, defaults, validation and adapter_config.json format.

Where PEFT defines the answer (defaults, what its own ``save_pretrained`` writes, what its
``from_pretrained`` reads back), the test asks the installed PEFT.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import peft
import pytest

import fastlora
from fastlora import LoraConfig, PeftConfig, PeftType, TaskType
from fastlora.config import CONFIG_NAME

# PeftConfig fields whose PEFT default is a placeholder filled in later (by PeftModel), not a user choice.
_FILLED_LATER = {"peft_type", "task_type"}


def _peft_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(peft.LoraConfig)}


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


# ---- fields and defaults ----------------------------------------------------------------------------

def test_every_field_is_a_peft_field():
    ours = {f.name for f in dataclasses.fields(LoraConfig)}
    assert ours - set(_peft_fields()) == set()


@pytest.mark.parametrize("name", sorted({f.name for f in dataclasses.fields(LoraConfig)} - _FILLED_LATER))
def test_defaults_equal_peft(name):
    ours = _default({f.name: f for f in dataclasses.fields(LoraConfig)}[name])
    theirs = _default(_peft_fields()[name])
    assert ours == theirs, f"{name}: fastlora default {ours!r}, PEFT default {theirs!r}"


def test_default_instances_agree_on_shared_fields():
    ours, theirs = LoraConfig(), peft.LoraConfig()
    for f in dataclasses.fields(LoraConfig):
        mine, peft_value = getattr(ours, f.name), getattr(theirs, f.name)
        assert str(mine) == str(peft_value) or mine == peft_value, f.name
    assert ours.peft_type == PeftType.LORA == "LORA"


def test_task_type_is_normalised_to_the_enum():
    config = LoraConfig(task_type="CAUSAL_LM")
    assert config.task_type is TaskType.CAUSAL_LM
    assert config.to_dict()["task_type"] == "CAUSAL_LM"


# ---- validation -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param(dict(r=0), "r must be a positive int", id="r=0"),
        pytest.param(dict(r=-4), "r must be a positive int", id="r<0"),
        pytest.param(dict(r=2.5), "r must be a positive int", id="r-float"),
        pytest.param(dict(rank_pattern={"q_proj": 0}), "rank_pattern", id="rank_pattern-0"),
        pytest.param(dict(lora_dropout=1.0), "lora_dropout", id="dropout=1"),
        pytest.param(dict(lora_dropout=-0.1), "lora_dropout", id="dropout<0"),
        pytest.param(dict(bias="some"), "bias", id="bad-bias"),
        pytest.param(dict(init_lora_weights="uniform"), "init_lora_weights", id="bad-init"),
        pytest.param(dict(target_modules=r".*q_proj", layers_to_transform=[0]), "layers_to_transform",
                     id="regex+layers_to_transform"),
        pytest.param(dict(layers_pattern="layers"), "layers_pattern", id="layers_pattern-alone"),
        pytest.param(dict(task_type="CAUSAL"), "task_type", id="unknown-task_type"),
        pytest.param(dict(peft_type="IA3"), "peft_type", id="wrong-peft_type"),
    ],
)
def test_invalid_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_valid_init_lora_weights(init):
    assert LoraConfig(init_lora_weights=init).init_lora_weights == init


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_valid_bias(bias):
    assert LoraConfig(bias=bias).bias == bias


def test_unknown_task_type_names_the_valid_ones():
    with pytest.raises(ValueError, match="CAUSAL_LM"):
        LoraConfig(task_type="GENERATION")


# ---- to_dict / from_dict ----------------------------------------------------------------------------

def _rich_config() -> LoraConfig:
    return LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["v_proj", "q_proj"], exclude_modules=["lm_head"],
        bias="lora_only", use_rslora=True, modules_to_save=["score"], init_lora_weights="gaussian",
        layers_to_transform=[0, 2], layers_pattern="layers", rank_pattern={"q_proj": 4},
        alpha_pattern={"v_proj": 2.0}, task_type="SEQ_CLS", base_model_name_or_path="tiny", inference_mode=True,
    )


def test_to_dict_is_json_and_round_trips():
    config = _rich_config()
    data = config.to_dict()
    assert json.loads(json.dumps(data)) == data  # plain JSON types only (enums as their value)
    assert data["peft_type"] == "LORA" and data["task_type"] == "SEQ_CLS"
    again = LoraConfig.from_dict(data)
    assert again == config
    assert PeftConfig.from_dict(data) == config


def test_save_and_from_pretrained_round_trip(tmp_path):
    config = _rich_config()
    config.save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_NAME).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME]  # no temp file left beside it
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is LoraConfig
    assert loaded == config


def test_from_pretrained_kwargs_override_the_file(tmp_path):
    LoraConfig(r=4).save_pretrained(tmp_path)
    assert LoraConfig.from_pretrained(tmp_path, inference_mode=True).inference_mode is True


def test_from_pretrained_subfolder(tmp_path):
    LoraConfig(r=4).save_pretrained(tmp_path / "other")
    assert PeftConfig.from_pretrained(tmp_path, subfolder="other").r == 4


def test_from_pretrained_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        PeftConfig.from_pretrained(tmp_path)


def test_from_pretrained_bad_json_raises(tmp_path):
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        PeftConfig.from_pretrained(tmp_path)


def test_dispatch_on_peft_type():
    assert type(PeftConfig.from_dict({"peft_type": "LORA", "r": 4})) is LoraConfig
    assert type(PeftConfig.from_dict({"peft_type": PeftType.LORA})) is LoraConfig


def test_missing_peft_type_raises():
    with pytest.raises(ValueError, match="peft_type"):
        PeftConfig.from_dict({"r": 4})


def test_unknown_peft_type_raises_naming_it():
    with pytest.raises(ValueError, match="NOT_A_METHOD"):
        PeftConfig.from_dict({"peft_type": "NOT_A_METHOD"})


def test_from_dict_on_lora_rejects_another_peft_type():
    with pytest.raises(ValueError, match="peft_type"):
        LoraConfig.from_dict({"peft_type": "IA3"})


def test_unknown_keys_are_tolerated_with_a_warning():
    with pytest.warns(UserWarning, match="some_future_field"):
        config = PeftConfig.from_dict({"peft_type": "LORA", "r": 4, "some_future_field": 1})
    assert config.r == 4 and not hasattr(config, "some_future_field")


@pytest.mark.parametrize(
    "key, value",
    [("use_dora", True), ("use_qalora", True), ("lora_bias", True), ("layer_replication", [[0, 2]]),
     ("trainable_token_indices", [0, 1]), ("target_parameters", ["experts.down_proj"]),
     ("astra_config", {"verbose": True})],
)
def test_peft_only_features_raise_not_implemented(key, value):
    with pytest.raises(NotImplementedError, match=key):
        PeftConfig.from_dict({"peft_type": "LORA", key: value})


@pytest.mark.parametrize("key, value", [("use_dora", True), ("layer_replication", [[0, 2]])])
def test_peft_only_features_raise_in_the_constructor(key, value):
    with pytest.raises(NotImplementedError, match=key):
        LoraConfig(**{key: value})


def test_peft_only_features_are_accepted_at_their_defaults():
    config = LoraConfig(r=4, use_dora=False, layer_replication=None, lora_bias=False)
    assert config.r == 4


def test_peft_only_features_raise_from_a_peft_file(tmp_path):
    peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True).save_pretrained(tmp_path)
    with pytest.raises(NotImplementedError, match="use_dora"):
        PeftConfig.from_pretrained(tmp_path)


# ---- interoperability with PEFT's files -------------------------------------------------------------

_SHARED = [f.name for f in dataclasses.fields(LoraConfig)]


def _normalise(value):
    if isinstance(value, (set, frozenset, list, tuple)):
        return sorted(value)
    return str(value.value) if hasattr(value, "value") else value


def test_reads_a_config_written_by_peft(tmp_path):
    theirs = peft.LoraConfig(
        r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
        use_rslora=True, modules_to_save=["lm_head"], rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 4},
        layers_to_transform=[1], layers_pattern="layers", bias="lora_only", init_lora_weights="gaussian",
    )
    theirs.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key PEFT writes is known: no "unknown key" warning
        ours = PeftConfig.from_pretrained(tmp_path)
    assert type(ours) is LoraConfig
    for name in _SHARED:
        assert _normalise(getattr(ours, name)) == _normalise(getattr(theirs, name)), name


def test_peft_reads_a_config_written_by_fastlora(tmp_path):
    ours = fastlora.LoraConfig(
        r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM",
        exclude_modules=["lm_head"], fan_in_fan_out=True, bias="all", rank_pattern={"q": 2},
        alpha_pattern={"v": 4}, modules_to_save=["classifier"],
    )
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(theirs, peft.LoraConfig)
    for name in _SHARED:
        assert _normalise(getattr(theirs, name)) == _normalise(getattr(ours, name)), name


def test_pattern_order_survives_the_file(tmp_path):
    """The first rank_pattern / alpha_pattern key that matches wins, so the file keeps their order (the
    other keys are sorted, as PEFT writes them) and both libraries read it back in that order."""
    patterns = dict(rank_pattern={"v_proj": 2, "layers.0.v_proj": 6}, alpha_pattern={"z_proj": 1, "a_proj": 3})
    LoraConfig(r=4, target_modules=["v_proj"], **patterns).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text(encoding="utf-8"))
    assert list(written) == sorted(written)
    for config in (PeftConfig.from_pretrained(tmp_path), peft.PeftConfig.from_pretrained(str(tmp_path))):
        for name, pattern in patterns.items():
            assert list(getattr(config, name).items()) == list(pattern.items()), name


def test_regex_target_modules_survive_both_ways(tmp_path):
    LoraConfig(target_modules=r".*\.(q|v)_proj").save_pretrained(tmp_path / "ours")
    assert peft.PeftConfig.from_pretrained(str(tmp_path / "ours")).target_modules == r".*\.(q|v)_proj"
    peft.LoraConfig(target_modules=r".*\.(q|v)_proj").save_pretrained(tmp_path / "peft")
    assert PeftConfig.from_pretrained(tmp_path / "peft").target_modules == r".*\.(q|v)_proj"
