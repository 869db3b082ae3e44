"""``AdapterLayer``: PEFT's per-layer adapter bookkeeping (``BaseTunerLayer``), shared by every method's layer.

A frozen ``base_layer`` plus adapters kept in dicts named by ``adapter_layer_names`` (``nn.ParameterDict``
for IA3, LoHa and AdaLoRA, ``nn.ModuleDict`` of ``nn.Linear`` for LoRA, as in PEFT, so state-dict keys
match): which adapters are active and trainable, disabling, deleting, and merging additive updates.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

from fastlora.layers.nf4 import LinearNF4

__all__ = ["AdapterLayer"]


class AdapterLayer(nn.Module):
    """A frozen linear ``base_layer`` plus adapters kept in ParameterDicts (``adapter_layer_names``).

    Subclasses implement ``update_layer``, ``forward`` and, for an additive update, ``get_delta_weight``
    (fp32, ``[out, in]``); merging, multiple adapters, disabling and deleting are handled here.
    """

    adapter_layer_names: ClassVar[tuple[str, ...]] = ()
    # Per-adapter plain dicts (or ParameterDicts of frozen tensors) that deleting an adapter also clears.
    other_param_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, fan_in_fan_out: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = fan_in_fan_out
        if isinstance(base_layer, LinearNF4):  # a packed 4-bit weight: its shape is the layer's
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        else:
            weight = base_layer.weight
            self.in_features, self.out_features = weight.shape if fan_in_fan_out else weight.shape[::-1]
        self.merged_adapters: list[str] = []
        self._active_adapters: list[str] = [adapter_name]
        self._disable_adapters = False

    # ---- adapters -------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return list(getattr(self, self.adapter_layer_names[0]))

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapters[0] if len(self._active_adapters) == 1 else list(self._active_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def _active(self) -> list[str]:
        """The active adapters this layer holds (a layer may lack an adapter that targets other modules)."""
        held = getattr(self, self.adapter_layer_names[0])
        return [name for name in self._active_adapters if name in held]

    def _adapter_dtype(self, adapter_dtype: torch.dtype | None) -> torch.dtype:
        dtype = adapter_dtype or self.base_layer.weight.dtype
        return dtype if dtype.is_floating_point else torch.float32

    def set_adapter(self, adapter_names: str | Iterable[str]) -> None:
        """Make ``adapter_names`` active and trainable; every other adapter is frozen."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for table in self.adapter_layer_names:
            for name, param in getattr(self, table).items():
                param.requires_grad_(name in names)
        self._active_adapters = names

    def set_requires_grad(self, adapter_names: str | Iterable[str], requires_grad: bool = True) -> None:
        """Turn gradients of ``adapter_names``' tensors on or off (PEFT 0.17's); which adapters are active does
        not change."""
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for table in self.adapter_layer_names:
            for name, item in getattr(self, table).items():
                if name in names:
                    item.requires_grad_(requires_grad)

    def set_training(self, adapter_names: str | Iterable[str], training: bool = True) -> None:
        """Put ``adapter_names``' own submodules (their dropout, say) in training or eval mode, apart from the
        layer's (PEFT 0.22's)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for table in self.adapter_layer_names + self.other_param_names:
            held = getattr(self, table, None)
            if isinstance(held, nn.ModuleDict):
                for name in names:
                    if name in held:
                        held[name].train(training)

    def enable_adapters(self, enabled: bool) -> None:
        if not enabled and self.merged:
            self.unmerge()
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into the base weights; unmerge it first")
        for table in self.adapter_layer_names + self.other_param_names:
            held = getattr(self, table)
            if adapter_name in held:
                del held[adapter_name]
        remaining = [name for name in self._active_adapters if name != adapter_name]
        if not remaining and self.adapters:
            remaining = [self.adapters[0]]
        self.set_adapter(remaining)

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    def _base_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        return weight.t() if self.fan_in_fan_out else weight  # Conv1D's [in, out] as a view, never a copy

    # ---- merging (additive updates; IA3 overrides) -----------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError

    def _to_merge(self, adapter_names: Iterable[str] | None) -> list[str]:
        names = self._active_adapters if adapter_names is None else list(adapter_names)
        held = getattr(self, self.adapter_layer_names[0])
        return [name for name in dict.fromkeys(names) if name in held and name not in self.merged_adapters]

    def _layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.t() if self.fan_in_fan_out else delta

    def merged_weight(self, adapter_names: Iterable[str] | None = None) -> torch.Tensor:
        """The base weight with ``adapter_names`` merged, in fp32, laid out like the base weight."""
        weight = self.base_layer.weight.float()
        for name in self._to_merge(adapter_names):
            weight = weight + self._layout(self.get_delta_weight(name))
        return weight

    def check_merge(self, key: str, adapter_names: Iterable[str] | None = None) -> None:
        """Raise when merging would put NaN or Inf into the base weights (checked in their own dtype: a
        finite fp32 sum can still overflow fp16; a 4-bit weight is merged in fp32)."""
        dtype = self.base_layer.weight.dtype
        dtype = dtype if dtype.is_floating_point else torch.float32
        if not torch.isfinite(self.merged_weight(adapter_names).to(dtype)).all():
            raise ValueError(f"merging into {key} would put NaN or Inf into its weights; nothing was merged")

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Iterable[str] | None = None) -> None:
        """Fold adapters into the base weight (in fp32, then cast back to the weight's dtype)."""
        names = self._to_merge(adapter_names)
        if safe_merge:
            self.check_merge(type(self).__name__, names)
        weight = self.base_layer.weight
        for name in names:
            weight.copy_((weight.float() + self._layout(self.get_delta_weight(name))).to(weight.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight.copy_((weight.float() - self._layout(self.get_delta_weight(name))).to(weight.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.adapters}"
