"""Match + swap + undo: the one generic module swap that turns a transformers model into a LoRA model.

This package is the only code in fastlora that knows about transformers (GPT-2's ``Conv1D``, output
heads, ``model_type``); the layers it installs know nothing of it.
"""

from __future__ import annotations

import types
from collections.abc import Iterator

import torch
from torch import nn

from fastlora._warn import warn
from fastlora.injector.match import is_excluded, matches_target, names_match
from fastlora.injector.targets import LORA_TARGET_MODULES, SEQ_CLS_HEAD_NAMES
from fastlora.layers import LinearNF4, LoraLinear, ModulesToSaveWrapper

__all__ = [
    "ADAPTER_LAYERS",
    "register_adapter_layer",
    "conv1d_class",
    "iter_modules",
    "resolve_target_modules",
    "select_targets",
    "wrap_modules_to_save",
    "replace_module",
    "unload_modules",
]

# Layers that hold adapters: the walk does not descend into them and undo swaps them back. Methods
# beside LoRA (fastlora.methods) add their layers with ``register_adapter_layer``.
ADAPTER_LAYERS: tuple[type[nn.Module], ...] = (LoraLinear, ModulesToSaveWrapper)


def register_adapter_layer(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: ``cls`` wraps a ``base_layer`` and holds adapters. The walk does not descend into it,
    and ``unload_modules`` merges it (``cls.merge``) and puts its ``base_layer`` back."""
    global ADAPTER_LAYERS
    if cls not in ADAPTER_LAYERS:
        ADAPTER_LAYERS = (*ADAPTER_LAYERS, cls)
    return cls


def conv1d_class() -> type[nn.Module] | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _linear_classes() -> tuple[type[nn.Module], ...]:
    conv1d = conv1d_class()
    return (nn.Linear, LinearNF4) if conv1d is None else (nn.Linear, LinearNF4, conv1d)


def iter_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` that yields adapter layers but does not descend into them."""
    for name, child in model.named_children():
        key = f"{prefix}.{name}" if prefix else name
        yield key, child
        if not isinstance(child, ADAPTER_LAYERS):
            yield from iter_modules(child, key)


def replace_module(model: nn.Module, key: str, new: nn.Module) -> None:
    parent_key, _, child = key.rpartition(".")
    parent = model.get_submodule(parent_key) if parent_key else model
    setattr(parent, child, new)


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _head_names(model: nn.Module, config) -> set[str]:
    """The output head (``lm_head``) or, for sequence classification, the classifier: left out of all-linear."""
    heads = []
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is not None:
        heads.append(output)
    elif str(getattr(config, "task_type", None)) == "SEQ_CLS":
        heads += [getattr(model, name) for name in SEQ_CLS_HEAD_NAMES if getattr(model, name, None) is not None][:1]
    return {key for key, module in model.named_modules() if any(module is head for head in heads)}


def resolve_target_modules(model: nn.Module, config, defaults: dict[str, list[str]] = LORA_TARGET_MODULES,
                           adapter_layer: type[nn.Module] = LoraLinear) -> list[str] | str:
    """``config.target_modules``, or the method's ``defaults`` for the model type, with "all-linear" expanded
    to names (layers already holding the method's adapters, ``adapter_layer``, included)."""
    targets = config.target_modules
    if targets is None:
        model_type = _model_type(model)
        if model_type not in defaults:
            raise ValueError(
                f"target_modules is not set and model_type {model_type!r} has no default targets; "
                f"pass target_modules (models with defaults: {', '.join(sorted(defaults))})"
            )
        return list(defaults[model_type])
    if isinstance(targets, str) and targets.lower() == "all-linear":
        linear = _linear_classes()
        heads = _head_names(model, config)
        names = {key for key, module in iter_modules(model) if isinstance(module, linear) and key not in heads}
        names |= {key for key, module in iter_modules(model) if isinstance(module, adapter_layer)}
        return sorted(names)
    return targets


def _within(key: str, names: list[str]) -> bool:
    """True when ``key`` is a module named in ``names`` or lies inside one."""
    parts = key.split(".")
    return any(names_match(".".join(parts[:i]), names) for i in range(1, len(parts) + 1))


def fit_fan_in_fan_out(module: nn.Module, config, key: str) -> bool:
    """Whether ``module`` stores its weight ``[in, out]`` (GPT-2's Conv1D); warns when ``config.fan_in_fan_out``
    says otherwise, and the module's layout wins (as in PEFT)."""
    conv1d = conv1d_class()
    is_conv1d = conv1d is not None and isinstance(module, conv1d)
    if is_conv1d and not config.fan_in_fan_out:
        warn(f"{key} is a Conv1D (weight stored [in, out]): using fan_in_fan_out=True for it")
    elif not is_conv1d and config.fan_in_fan_out:
        warn(f"{key} is an nn.Linear: using fan_in_fan_out=False for it")
    return is_conv1d


def select_targets(model: nn.Module, config, *, defaults: dict[str, list[str]] = LORA_TARGET_MODULES,
                   adapter_layer: type[nn.Module] = LoraLinear, wrappable: tuple[type[nn.Module], ...] | None = None,
                   method: str = "LoRA", wraps: str = "nn.Linear and Conv1D layers") -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs ``config`` targets for a method whose layer is ``adapter_layer``: modules
    of the ``wrappable`` types (default: the linear layers) or ``adapter_layer``s already there. Raises,
    naming ``method`` and what it ``wraps``, when the targets match nothing or a module it cannot wrap.
    Reads ``config``'s target_modules, exclude_modules, layers_to_transform, layers_pattern and
    modules_to_save (absent fields count as None); changes nothing.
    """
    targets = resolve_target_modules(model, config, defaults, adapter_layer)
    linear = _linear_classes()
    wrappable = linear if wrappable is None else wrappable
    layers_to_transform = getattr(config, "layers_to_transform", None)
    exclude_modules = getattr(config, "exclude_modules", None)
    modules_to_save = getattr(config, "modules_to_save", None)
    resolved = types.SimpleNamespace(target_modules=targets, exclude_modules=exclude_modules,
                                     layers_to_transform=layers_to_transform,
                                     layers_pattern=getattr(config, "layers_pattern", None))
    selected, unsupported = [], []
    for key, module in iter_modules(model):
        if isinstance(module, ModulesToSaveWrapper) or is_excluded(key, resolved) or not matches_target(key, resolved):
            continue
        if modules_to_save and _within(key, modules_to_save):
            continue  # trained whole as a modules_to_save copy, as in PEFT
        (selected if isinstance(module, (adapter_layer, *wrappable)) else unsupported).append((key, module))
    if unsupported:
        kinds = ", ".join(f"{key} ({type(module).__name__})" for key, module in unsupported[:5])
        raise ValueError(f"target modules {kinds} are not supported: {method} wraps {wraps}")
    if not selected:
        candidates = sorted({key.rpartition(".")[2] for key, m in iter_modules(model) if isinstance(m, linear)})
        raise ValueError(
            f"target_modules {targets!r} matched no module of the model (model_type={_model_type(model)!r}, "
            f"layers_to_transform={layers_to_transform!r}, exclude_modules={exclude_modules!r}); "
            f"its linear layers are named: {', '.join(candidates) or 'none'}"
        )
    return selected


def upcast_dtype(dtype: torch.dtype) -> torch.dtype:
    # PEFT's autocast_adapter_dtype: 16-bit bases get fp32 adapters (stable optimizer updates).
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def wrap_modules_to_save(model: nn.Module, names: list[str], adapter_name: str) -> list[str]:
    """Wrap each module named (exactly or as a dotted suffix) in ``names`` in a ``ModulesToSaveWrapper``."""
    wrapped = []
    for key, module in list(iter_modules(model)):
        if not names_match(key, names):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            module.update(adapter_name)
            module.set_adapter(module.active_adapter)
        elif isinstance(module, LoraLinear):
            raise ValueError(f"{key} is both a LoRA target and in modules_to_save")
        else:
            replace_module(model, key, ModulesToSaveWrapper(module, adapter_name))
        wrapped.append(key)
    return wrapped


def unload_modules(model: nn.Module, merge: bool, safe_merge: bool = False, adapter_names=None,
                   requantize: bool = False) -> nn.Module:
    """Put every base layer back (merged first when ``merge``); a modules_to_save wrapper becomes its
    active trained copy. Returns ``model`` with no fastlora module left in it.

    With ``safe_merge`` every merge is checked before any base weight changes. A 4-bit base merges into
    a 16-bit ``nn.Linear`` (dequantized, merged in fp32), or back into 4 bits with ``requantize``.
    """
    layers = [(key, module) for key, module in iter_modules(model) if isinstance(module, ADAPTER_LAYERS)]
    if merge and safe_merge:
        for key, module in layers:
            if not isinstance(module, ModulesToSaveWrapper):  # each method's layer knows its own merge
                module.check_merge(key, adapter_names)
    for key, module in layers:
        if isinstance(module, LoraLinear):
            if merge and isinstance(module.base_layer, LinearNF4) and not requantize:
                replace_module(model, key, module.dequantized_base(adapter_names))
                continue
            if merge:
                module.merge(adapter_names=adapter_names)
            replace_module(model, key, module.base_layer)
        elif isinstance(module, ModulesToSaveWrapper):
            replace_module(model, key, module._current())
        else:
            if merge:
                module.merge(adapter_names=adapter_names)
            replace_module(model, key, module.base_layer)
    return model
