"""``fastlora.injector.match``: which module names a config selects, rule for rule PEFT's.

The matcher is pure string logic, so it is checked against PEFT's own ``check_target_module_exists``
and ``get_pattern_key`` over a grid of module names and configs, without building any model.
"""

from __future__ import annotations

import peft
import pytest
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

from fastlora import LoraConfig
from fastlora.injector.match import is_excluded, layer_index, matches_target, names_match, pattern_value

KEYS = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.self_attn.v_proj",
    "model.layers.12.mlp.down_proj",
    "model.layers.1.mlp.experts.0.w1",
    "model.layers.0.block_sparse_moe.experts.3.w2",
    "transformer.h.1.attn.c_attn",
    "transformer.h.0.mlp.c_fc",
    "encoder.block.1.layer.0.SelfAttention.q",
    "decoder.block.0.layer.1.EncDecAttention.q",
    "encoder.layer.0.attention.self.query",
    "layers.1.q_proj",
    "lm_head",
    "q_proj",
    "model.q_proj",
    "model.my_q_proj",
]

CONFIGS = {
    "list": dict(target_modules=["q_proj", "v_proj"]),
    "dotted-suffix": dict(target_modules=["self_attn.q_proj", "attn.c_attn"]),
    "full-path": dict(target_modules=["model.layers.1.self_attn.v_proj"]),
    "regex": dict(target_modules=r".*\.(q|v)_proj"),
    "regex-not-search": dict(target_modules=r"q_proj"),
    "regex-layers": dict(target_modules=r".*layers\.1\..*"),
    "layers-list": dict(target_modules=["q_proj", "v_proj", "w1", "q", "c_attn"], layers_to_transform=[1]),
    "layers-int": dict(target_modules=["q_proj", "down_proj", "w2", "q"], layers_to_transform=0),
    "layers-pattern": dict(target_modules=["q_proj", "v_proj", "c_attn", "w1"], layers_to_transform=[1],
                           layers_pattern="layers"),
    "layers-pattern-h": dict(target_modules=["c_attn", "c_fc"], layers_to_transform=[1], layers_pattern="h"),
    "layers-pattern-list": dict(target_modules=["q", "c_fc", "q_proj"], layers_to_transform=[0, 12],
                                layers_pattern=["block", "h", "layers"]),
    "exclude-list": dict(target_modules=["q_proj", "v_proj"], exclude_modules=["layers.0.self_attn.q_proj"]),
    "exclude-regex": dict(target_modules=r".*proj", exclude_modules=r".*mlp.*"),
    "modules-to-save": dict(target_modules=["q_proj", "v_proj"], modules_to_save=["self_attn"]),
}


def _fastlora_selects(key: str, config: LoraConfig) -> bool:
    # how inject_lora combines the pieces (modules_to_save is checked there with names_match on prefixes)
    if is_excluded(key, config):
        return False
    if config.modules_to_save:
        parts = key.split(".")
        if any(names_match(".".join(parts[:i]), config.modules_to_save) for i in range(1, len(parts) + 1)):
            return False
    return matches_target(key, config)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_selection_equals_peft(name):
    ours, theirs = LoraConfig(**CONFIGS[name]), peft.LoraConfig(**CONFIGS[name])
    got = {key for key in KEYS if _fastlora_selects(key, ours)}
    expected = {key for key in KEYS if bool(check_target_module_exists(theirs, key))}
    assert got == expected


def test_the_grid_is_not_trivial():
    # every config selects something and leaves something out, so the parity above has teeth
    for name, kwargs in CONFIGS.items():
        selected = [key for key in KEYS if _fastlora_selects(key, LoraConfig(**kwargs))]
        assert 0 < len(selected) < len(KEYS), name


@pytest.mark.parametrize(
    "key, pattern, expected",
    [
        ("model.layers.3.mlp.down_proj", None, 3),
        ("decoder.block.0.layer.1.EncDecAttention.q", None, 0),  # the first index, not the nested one
        ("model.layers.1.mlp.experts.0.w1", None, 1),
        ("model.layers.1.mlp.experts.0.w1", "layers", 1),
        ("layers.4.q_proj", "layers", 4),  # the pattern may start the key
        ("transformer.h.2.attn.c_attn", ["layers", "h"], 2),
        ("transformer.h.2.attn.c_attn", "layers", None),
        ("lm_head", None, None),
    ],
)
def test_layer_index(key, pattern, expected):
    assert layer_index(key, pattern) == expected


def test_names_match_list_is_exact_or_dotted_suffix_and_str_is_full_regex():
    assert names_match("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert names_match("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"])
    assert not names_match("model.layers.0.self_attn.my_q_proj", ["q_proj"])  # suffix on a dot boundary only
    assert not names_match("model.layers.0.self_attn.q_proj", "q_proj")  # a str must match the whole key
    assert names_match("model.layers.0.self_attn.q_proj", r".*q_proj")


PATTERNS = {"q_proj": 2, "model.layers.1.self_attn.v_proj": 3, r"^model\.layers\.0\.mlp\..*": 5, "w1": 7}


@pytest.mark.parametrize("key", KEYS)
def test_pattern_value_equals_peft(key):
    peft_key = get_pattern_key(PATTERNS.keys(), key)
    expected = PATTERNS.get(peft_key, 8)
    assert pattern_value(key, PATTERNS, 8) == expected


def test_pattern_grid_is_not_trivial():
    values = {pattern_value(key, PATTERNS, 8) for key in KEYS}
    assert {2, 3, 7, 8} <= values


@pytest.mark.parametrize("key", ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"])
def test_anchored_regex_pattern(key):
    assert pattern_value(key, PATTERNS, 8) == 5

