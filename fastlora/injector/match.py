"""Which module names a config selects: PEFT's matching rules, without touching any module."""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["matches_target", "is_excluded", "layer_index", "pattern_value", "names_match"]


def names_match(key: str, names: str | Iterable[str]) -> bool:
    """A str is a regex that must match the whole key; a list matches exactly or as a dotted suffix."""
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return any(key == name or key.endswith("." + name) for name in names)


def layer_index(key: str, layers_pattern: str | list[str] | None) -> int | None:
    """The index of the repeated block ``key`` lives in (``model.layers.3.mlp`` -> 3), if any.

    The first numbered segment wins, as in PEFT (lazy ``.*?``): a greedy match would take a nested
    index instead (``decoder.block.0.layer.1.EncDecAttention.q`` -> 1, ``layers.1.experts.0`` -> 0).
    """
    if not layers_pattern:
        found = re.match(r".*?\.[^.]*\.(\d+)\.", key)
        return int(found.group(1)) if found else None
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    for pattern in patterns:
        found = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", key)
        if found:
            return int(found.group(1))
    return None


def matches_target(key: str, config) -> bool:
    """True when module ``key`` is a target of ``config`` (target_modules, layers_to_transform)."""
    if not names_match(key, config.target_modules):
        return False
    if config.layers_to_transform is None:
        return True
    if not isinstance(config.target_modules, str) and key in config.target_modules:
        return True  # a module named by its full path is taken whatever its layer, as PEFT does
    index = layer_index(key, config.layers_pattern)
    if index is None:
        return False
    wanted = config.layers_to_transform
    return index == wanted if isinstance(wanted, int) else index in wanted


def is_excluded(key: str, config) -> bool:
    return bool(config.exclude_modules) and names_match(key, config.exclude_modules)


def pattern_value(key: str, pattern: dict, default):
    """rank_pattern / alpha_pattern lookup: the first pattern that matches ``key`` as a suffix regex."""
    for name, value in pattern.items():
        if re.match(rf"(.*\.)?({name})$", key):
            return value
    return default
