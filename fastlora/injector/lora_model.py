"""``LoraModel``: the injected transformers model plus its adapters (PEFT's ``LoraModel``).

``PeftModel.base_model`` is one of these and ``.model`` is the transformers model, so parameter
names read ``base_model.model.<module path>`` exactly as in PEFT.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from fastlora.config import LoraConfig
from fastlora.injector.inject import (
    _check_finite_merge,
    inject_lora,
    iter_modules,
    replace_module,
    unload_modules,
    wrap_modules_to_save,
)
from fastlora.injector.mixed_batch import mixed_adapter_batch
from fastlora.layers import LoraLinear, ModulesToSaveWrapper

__all__ = ["LoraModel"]


class LoraModel(nn.Module):
    prefix = "lora_"

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapter: str | list[str] = adapter_name
        self.inject_adapter(config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        adapter_names = kwargs.pop("adapter_names", None)  # PEFT's mixed-adapter batch: one name per sequence
        if adapter_names is None:
            return self.model(*args, **kwargs)
        with mixed_adapter_batch(self, adapter_names):
            return self.model(*args, **kwargs)

    # ---- adapters ---------------------------------------------------------------------------------
    def _layers(self) -> list[nn.Module]:
        return [m for _, m in iter_modules(self.model) if isinstance(m, (LoraLinear, ModulesToSaveWrapper))]

    def inject_adapter(self, config: LoraConfig, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Add ``adapter_name``; on any error the model is left as it was."""
        if not isinstance(config, LoraConfig):
            raise TypeError(f"LoraModel takes a LoraConfig, got {type(config).__name__}")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        try:
            inject_lora(self.model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
            if config.modules_to_save:
                wrap_modules_to_save(self.model, list(config.modules_to_save), adapter_name)
        except Exception:
            self._remove_adapter(adapter_name)
            raise
        self.peft_config[adapter_name] = config
        self.set_adapter(self.active_adapters)
        self._mark_only_adapters_as_trainable()
        if config.inference_mode:
            self._freeze_adapter(adapter_name)

    def _mark_only_adapters_as_trainable(self) -> None:
        """Freeze everything but adapter weights, the biases ``bias`` asks for and modules_to_save copies."""
        for name, param in self.model.named_parameters():
            if self.prefix not in name and ".modules_to_save." not in name:
                param.requires_grad_(False)
        for adapter in self.active_adapters:
            config = self.peft_config.get(adapter)
            if config is None or config.bias == "none":
                continue
            if config.bias == "all":
                for name, param in self.model.named_parameters():
                    # a wrapped head's original stays frozen, as in PEFT: only its copy is used and saved
                    if name.endswith("bias") and ".original_module." not in name:
                        param.requires_grad_(True)
            else:  # lora_only
                for layer in self._layers():
                    if isinstance(layer, LoraLinear) and adapter in layer.lora_A and layer.base_layer.bias is not None:
                        layer.base_layer.bias.requires_grad_(True)

    def _freeze_adapter(self, adapter_name: str) -> None:
        for name, param in self.model.named_parameters():
            if f".{adapter_name}." in name and (self.prefix in name or ".modules_to_save." in name):
                param.requires_grad_(False)

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    def set_adapter(self, adapter_name: str | Iterable[str]) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter {unknown[0]!r}; adapters: {sorted(self.peft_config)}")
        for layer in self._layers():
            if isinstance(layer, ModulesToSaveWrapper):
                layer.set_adapter([n for n in names if n in layer.modules_to_save] or layer.active_adapter)
            else:
                if layer.merged:
                    layer.unmerge()
                layer.set_adapter(names)
        self.active_adapter = names[0] if len(names) == 1 else names

    def _set_adapter_layers(self, enabled: bool) -> None:
        for layer in self._layers():
            layer.enable_adapters(enabled)

    def enable_adapter_layers(self) -> None:
        self._set_adapter_layers(True)

    def disable_adapter_layers(self) -> None:
        self._set_adapter_layers(False)

    def _remove_adapter(self, adapter_name: str) -> None:
        """Drop ``adapter_name`` from every layer; layers left with no adapter become their base again."""
        for key, layer in list(iter_modules(self.model)):
            if isinstance(layer, LoraLinear) and adapter_name in layer.lora_A:
                layer.delete_adapter(adapter_name)
                if not layer.lora_A:
                    replace_module(self.model, key, layer.base_layer)
            elif isinstance(layer, ModulesToSaveWrapper) and adapter_name in layer.modules_to_save:
                layer.delete_adapter(adapter_name)
                if not layer.modules_to_save:
                    replace_module(self.model, key, layer.original_module)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {sorted(self.peft_config)}")
        merged = [key for key, layer in iter_modules(self.model)
                  if isinstance(layer, LoraLinear) and adapter_name in layer.merged_adapters]
        if merged:
            raise ValueError(f"adapter {adapter_name!r} is merged into {merged[0]} (and maybe more); unmerge it first")
        self._remove_adapter(adapter_name)
        del self.peft_config[adapter_name]
        remaining = [n for n in self.active_adapters if n != adapter_name] or sorted(self.peft_config)[:1]
        if remaining:  # every layer, also those that never held the deleted adapter, runs the remaining ones
            self.set_adapter(remaining)
        else:
            self.active_adapter = []

    # ---- merging ----------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self._check_names(adapter_names)
        layers = [(key, m) for key, m in iter_modules(self.model) if isinstance(m, LoraLinear)]
        if safe_merge:  # every layer is checked before any base weight changes
            for key, layer in layers:
                _check_finite_merge(key, layer, adapter_names)
        for _, layer in layers:
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        for layer in self._layers():
            if isinstance(layer, LoraLinear):
                layer.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None, requantize: bool = False) -> nn.Module:
        """Fold the adapters into the base weights and return the plain transformers model.

        4-bit (NF4) base layers become 16-bit ``nn.Linear`` layers in the dtype they were quantized from,
        merged in fp32 without rounding; ``requantize=True`` keeps them 4-bit instead (with a warning:
        re-quantizing rounds the merged weights).
        """
        self._check_names(adapter_names)
        return unload_modules(self.model, merge=True, safe_merge=safe_merge, adapter_names=adapter_names,
                              requantize=requantize)

    def unload(self) -> nn.Module:
        """Take every adapter out (unmerged) and return the plain transformers model."""
        for layer in self._layers():
            if isinstance(layer, LoraLinear):
                layer.unmerge()
        return unload_modules(self.model, merge=False)

    def _check_names(self, adapter_names) -> None:
        for name in adapter_names or []:
            if name not in self.peft_config:
                raise ValueError(f"unknown adapter {name!r}; adapters: {sorted(self.peft_config)}")
