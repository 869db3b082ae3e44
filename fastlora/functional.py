"""PEFT's ``peft.functional``: adapter switches that work on any model with adapter layers in it, a
``PeftModel`` or a transformers model fastlora injected into, for code that integrates PEFT without its
model wrapper.

``set_training`` puts named adapters' own submodules (their dropout, a modules_to_save copy) in training
or eval mode apart from the rest of the model, say one adapter's dropout off while the model trains; the
next ``model.train()`` or ``model.eval()`` sets every module again. ``set_requires_grad`` turns named
adapters' gradients on or off, whether they are active or not. An adapter name that no layer holds is
refused before anything changes (PEFT skips it).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from fastlora.checkpoint import get_peft_model_state_dict, set_peft_model_state_dict
from fastlora.layers import ModulesToSaveWrapper
from fastlora.layers.adapter import AdapterLayer

__all__ = ["get_peft_model_state_dict", "set_peft_model_state_dict", "set_requires_grad", "set_training"]


def _layers(model: nn.Module, adapter_names: str | Iterable[str]) -> tuple[list[nn.Module], list[str]]:
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    layers = [m for m in model.modules() if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))]
    held = set()
    for layer in layers:
        held.update(layer.modules_to_save if isinstance(layer, ModulesToSaveWrapper) else layer.adapters)
    unknown = [name for name in names if name not in held]
    if unknown:
        raise ValueError(f"unknown adapter {unknown[0]!r}; the model's layers hold {sorted(held) or 'none'}")
    return layers, names


def set_training(model: nn.Module, adapter_names: str | Iterable[str], training: bool = True) -> None:
    """Training (default) or eval mode for ``adapter_names``' own submodules in every layer of ``model``."""
    layers, names = _layers(model, adapter_names)
    for layer in layers:
        layer.set_training(names, training)


def set_requires_grad(model: nn.Module, adapter_names: str | Iterable[str], requires_grad: bool = True) -> None:
    """Gradients on (default) or off for ``adapter_names``' tensors in every layer of ``model``."""
    layers, names = _layers(model, adapter_names)
    for layer in layers:
        layer.set_requires_grad(names, requires_grad)
