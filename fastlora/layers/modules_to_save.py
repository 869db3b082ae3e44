"""``ModulesToSaveWrapper``: a trainable copy of a whole module (e.g. a classifier head) per adapter.

Attribute names follow PEFT (``original_module``, ``modules_to_save[name]``) so state dicts match.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ModulesToSaveWrapper"]


class ModulesToSaveWrapper(nn.Module):
    def __init__(self, module_to_save: nn.Module, adapter_name: str = "default"):
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict()
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.update(adapter_name)
        self.original_module.requires_grad_(False)

    def update(self, adapter_name: str) -> None:
        # trainable only when it is the active copy, as in PEFT (a new, inactive adapter starts frozen)
        trainable = adapter_name == self._active_adapter
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module).requires_grad_(trainable)

    @property
    def active_adapter(self) -> str:
        return self._active_adapter

    @property
    def weight(self) -> torch.Tensor:  # some models read the head's weight directly
        return self._current().weight

    def _current(self) -> nn.Module:
        if self._disable_adapters or self._active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self._active_adapter]

    def forward(self, *args, **kwargs):
        return self._current()(*args, **kwargs)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        if not isinstance(adapter_name, str):
            names = [name for name in adapter_name if name in self.modules_to_save]
            if len(names) > 1:
                raise ValueError(f"only one modules_to_save adapter can be active at a time, got {names}")
            adapter_name = names[0] if names else self._active_adapter
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name == adapter_name)
        self._active_adapter = adapter_name

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for name, module in self.modules_to_save.items():
            if name in names:
                module.requires_grad_(requires_grad)

    def set_training(self, adapter_names: str | list[str], training: bool = True) -> None:
        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            if name in self.modules_to_save:
                self.modules_to_save[name].train(training)

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:  # nn.ModuleDict.pop takes no default
            del self.modules_to_save[adapter_name]
        if self._active_adapter == adapter_name:
            self._active_adapter = next(iter(self.modules_to_save), adapter_name)
