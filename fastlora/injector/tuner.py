"""``AdapterTuner``: PEFT's ``BaseTuner``, the model-level side every weight-adapting method shares
(LoRA, IA3, LoHa, AdaLoRA): inject through the generic ``select_targets``, and PEFT's adapter API
(``set_adapter``, ``delete_adapter``, ``merge_and_unload``, ...) over the method's layers.

A method defines its config, its layer (a subclass of ``fastlora.layers.AdapterLayer``) and its tuner
(a subclass of ``AdapterTuner`` naming the config, the layer, the default-target table and how to build
and update a layer). Methods beside LoRA register their tuner with ``register_tuner``; ``PeftModel``
finds them in ``TUNERS``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from torch import nn

from fastlora.config import PeftConfig, PeftType
from fastlora.injector.inject import (
    conv1d_class,
    iter_modules,
    register_adapter_layer,
    replace_module,
    select_targets,
    unload_modules,
    upcast_dtype,
    wrap_modules_to_save,
)
from fastlora.layers import AdapterLayer, ModulesToSaveWrapper

__all__ = ["AdapterTuner", "TUNERS", "names_adapter", "register_tuner"]

# peft_type -> tuner class, filled by ``register_tuner``; peft_model.py merges it into its mapping.
TUNERS: dict[PeftType, type[AdapterTuner]] = {}


def register_tuner(cls: type[AdapterTuner]) -> type[AdapterTuner]:
    """Class decorator: make ``cls`` the tuner of its config's peft_type, and its layer known to the injector."""
    TUNERS[cls.config_cls.PEFT_TYPE] = cls
    register_adapter_layer(cls.layer_cls)
    return cls


def names_adapter(param_name: str, adapter_name: str) -> bool:
    """Whether a parameter name belongs to ``adapter_name`` (``...ia3_l.<name>`` or ``...lora_A.<name>.weight``)."""
    return f".{adapter_name}." in param_name or param_name.endswith(f".{adapter_name}")


class AdapterTuner(nn.Module):
    """PEFT's tuner for one method: ``.model`` is the transformers model, ``.peft_config`` maps adapter
    names to configs, and the adapter API (``set_adapter``, ``merge_and_unload``, ...) is PEFT's."""

    prefix: ClassVar[str]
    config_cls: ClassVar[type[PeftConfig]]
    layer_cls: ClassVar[type[AdapterLayer]]
    default_targets: ClassVar[dict[str, list[str]]]
    method: ClassVar[str]
    wraps: ClassVar[str] = "nn.Linear and Conv1D layers"

    def __init__(self, model: nn.Module, config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, PeftConfig] = {}
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
        if kwargs.get("adapter_names") is not None:
            raise NotImplementedError(f"mixed-adapter batches (adapter_names) are not supported for {self.method}")
        kwargs.pop("adapter_names", None)
        return self.model(*args, **kwargs)

    # ---- what a method defines ---------------------------------------------------------------------
    def _wrappable(self) -> tuple[type[nn.Module], ...]:
        conv1d = conv1d_class()
        return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)

    def _prepare_config(self, config: PeftConfig) -> dict[str, Any]:
        """Checks of ``config`` against the model, before anything changes; returns what ``_create`` needs."""
        return {}

    def _create(self, key: str, module: nn.Module, config, adapter_name: str, adapter_dtype, prepared) -> AdapterLayer:
        raise NotImplementedError

    def _update(self, key: str, layer: AdapterLayer, config, adapter_name: str, prepared) -> None:
        raise NotImplementedError

    # ---- adapters ---------------------------------------------------------------------------------
    def _layers(self) -> list[nn.Module]:
        return [m for _, m in iter_modules(self.model) if isinstance(m, (self.layer_cls, ModulesToSaveWrapper))]

    def inject_adapter(self, config: PeftConfig, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Add ``adapter_name``; every check runs before the first module is swapped, and on any error
        the model is left as it was."""
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} takes a {self.config_cls.__name__}, got {type(config).__name__}")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        self._check_new_adapter(config)
        prepared = self._prepare_config(config)
        selected = select_targets(self.model, config, defaults=self.default_targets, adapter_layer=self.layer_cls,
                                  wrappable=self._wrappable(), method=self.method, wraps=self.wraps)
        try:
            for key, module in selected:
                if isinstance(module, self.layer_cls):
                    self._update(key, module, config, adapter_name, prepared)
                    continue
                dtype = upcast_dtype(module.weight.dtype) if autocast_adapter_dtype else None
                new = self._create(key, module, config, adapter_name, dtype, prepared)
                new.train(module.training)
                replace_module(self.model, key, new)
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

    def _check_new_adapter(self, config: PeftConfig) -> None:
        """Conflicts with the adapters already there (PEFT: one adapter with a trained bias at most)."""
        if getattr(config, "bias", "none") != "none" and any(
            getattr(c, "bias", "none") != "none" for c in self.peft_config.values()
        ):
            raise ValueError(f"{type(self).__name__} supports only 1 adapter with bias; set bias='none' for the others")

    def _mark_only_adapters_as_trainable(self) -> None:
        """Freeze everything but adapter tensors, the biases ``bias`` asks for and modules_to_save copies."""
        for name, param in self.model.named_parameters():
            if self.prefix not in name and ".modules_to_save." not in name:
                param.requires_grad_(False)
        for adapter in self.active_adapters:
            bias = getattr(self.peft_config.get(adapter), "bias", "none")
            if bias == "all":
                for name, param in self.model.named_parameters():
                    if name.endswith("bias") and ".original_module." not in name:
                        param.requires_grad_(True)
            elif bias != "none":  # "lora_only": the biases of the layers this adapter adapts
                for layer in self._layers():
                    if isinstance(layer, self.layer_cls) and adapter in layer.adapters \
                            and layer.base_layer.bias is not None:
                        layer.base_layer.bias.requires_grad_(True)

    def _freeze_adapter(self, adapter_name: str) -> None:
        for name, param in self.model.named_parameters():
            if names_adapter(name, adapter_name) and (self.prefix in name or ".modules_to_save." in name):
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

    def set_requires_grad(self, adapter_names: str | Iterable[str], requires_grad: bool = True) -> None:
        """Turn gradients of ``adapter_names`` (their adapter tensors and modules_to_save copies) on or off,
        active or not: PEFT 0.17's, for training an adapter that is not the active one, or freezing one."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_names(names)
        for layer in self._layers():
            layer.set_requires_grad(names, requires_grad)

    def enable_adapter_layers(self) -> None:
        for layer in self._layers():
            layer.enable_adapters(True)

    def disable_adapter_layers(self) -> None:
        for layer in self._layers():
            layer.enable_adapters(False)

    def _remove_adapter(self, adapter_name: str) -> None:
        """Drop ``adapter_name`` from every layer; layers left with no adapter become their base again."""
        for key, layer in list(iter_modules(self.model)):
            if isinstance(layer, self.layer_cls) and adapter_name in layer.adapters:
                layer.delete_adapter(adapter_name)
                if not layer.adapters:
                    replace_module(self.model, key, layer.base_layer)
            elif isinstance(layer, ModulesToSaveWrapper) and adapter_name in layer.modules_to_save:
                layer.delete_adapter(adapter_name)
                if not layer.modules_to_save:
                    replace_module(self.model, key, layer.original_module)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {sorted(self.peft_config)}")
        merged = [key for key, layer in iter_modules(self.model)
                  if isinstance(layer, self.layer_cls) and adapter_name in layer.merged_adapters]
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
    def _adapter_layers(self) -> list[tuple[str, AdapterLayer]]:
        return [(key, m) for key, m in iter_modules(self.model) if isinstance(m, self.layer_cls)]

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self._check_names(adapter_names)
        layers = self._adapter_layers()
        if safe_merge:  # every layer is checked before any base weight changes
            for key, layer in layers:
                layer.check_merge(key, adapter_names)
        for _, layer in layers:
            layer.merge(adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        for _, layer in self._adapter_layers():
            layer.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Fold the adapters into the base weights and return the plain transformers model."""
        self._check_names(adapter_names)
        return unload_modules(self.model, merge=True, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Take every adapter out (unmerged) and return the plain transformers model."""
        self.unmerge_adapter()
        return unload_modules(self.model, merge=False)

    def _check_names(self, adapter_names) -> None:
        for name in adapter_names or []:
            if name not in self.peft_config:
                raise ValueError(f"unknown adapter {name!r}; adapters: {sorted(self.peft_config)}")
