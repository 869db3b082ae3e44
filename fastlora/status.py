"""``get_layer_status`` and ``get_model_status``: PEFT's report of what each adapted layer holds and runs.

The same dataclasses and fields as PEFT's, so code that reads them (``status.requires_grad["default"]``,
``status.active_adapters == "irregular"``) works unchanged. A value that differs between layers is
``"irregular"``: a model left half-switched (say, one layer's adapter frozen by hand) shows up there.
``module_type`` names fastlora's class (``LoraLinear``), where PEFT names its own (``lora.Linear``).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Literal

from torch import nn

from fastlora.layers import LinearNF4, ModulesToSaveWrapper
from fastlora.layers.adapter import AdapterLayer

__all__ = ["TunerLayerStatus", "TunerModelStatus", "get_layer_status", "get_model_status"]

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular


def _same(values):
    """The one value all of ``values`` share, else "irregular" (None when there are none)."""
    values = list(values)
    if not values:
        return None
    first = values[0]
    return first if all(v == first for v in values[1:]) else "irregular"


def _tables(module: nn.Module, names: tuple[str, ...]) -> dict[str, list]:
    """adapter name -> its parameters, over the per-adapter dicts ``names`` of ``module``."""
    out: dict[str, list] = collections.defaultdict(list)
    for table_name in names:
        table = getattr(module, table_name, None)
        if isinstance(table, nn.ModuleDict):
            for key, sub in table.items():
                out[key].extend(sub.parameters())
        elif isinstance(table, nn.ParameterDict):
            for key, param in table.items():
                out[key].append(param)
    return out


def _layer_status(name: str, module: nn.Module) -> TunerLayerStatus:
    if isinstance(module, ModulesToSaveWrapper):
        grads = devices = _tables(module, ("modules_to_save",))
        enabled, active, merged = not module._disable_adapters, [module.active_adapter], []
        available, backend = list(module.modules_to_save), None
    else:
        grads = _tables(module, module.adapter_layer_names)
        devices = _tables(module, module.adapter_layer_names + module.other_param_names)
        enabled, active, merged = not module.disable_adapters, module.active_adapters, list(module.merged_adapters)
        available = module.adapters
        backend = "fastlora nf4" if isinstance(module.base_layer, LinearNF4) else None
    return TunerLayerStatus(
        name=name,
        module_type=type(module).__name__,
        enabled=enabled,
        active_adapters=active,
        merged_adapters=merged,
        requires_grad={key: _same(p.requires_grad for p in params) for key, params in grads.items()},
        available_adapters=sorted(available),
        devices={key: sorted({p.device.type for p in params}) for key, params in devices.items()},
        quantization_backend=backend,
    )


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One ``TunerLayerStatus`` per adapter layer and modules_to_save copy of ``model`` (a ``PeftModel``, or
    any model fastlora injected adapters into)."""
    from fastlora.peft_model import PeftModel

    tuner = model._layer_tuner("get_layer_status") if isinstance(model, PeftModel) else model
    status = [_layer_status(name, module) for name, module in tuner.named_modules()
              if isinstance(module, (AdapterLayer, ModulesToSaveWrapper))]
    if not status:
        raise ValueError("no adapter layers found in the model: is it a PeftModel, or a model with adapters injected?")
    return status


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The layers' statuses summed up for the whole model (``"irregular"`` where layers disagree)."""
    from fastlora.peft_model import PeftModel

    layers = get_layer_status(model)
    if isinstance(model, PeftModel):
        base_model_type = type(model.get_base_model()).__name__
        adapter_model_type = type(model.base_model).__name__
        peft_types = {key: str(getattr(c.peft_type, "value", c.peft_type)) for key, c in model.peft_config.items()}
        trainable, total = model.get_nb_trainable_parameters()
    else:
        from transformers import PreTrainedModel

        base_model_type = type(model).__name__ if isinstance(model, PreTrainedModel) else "other"
        adapter_model_type, peft_types = "None", {}
        trainable, total = PeftModel.get_nb_trainable_parameters(model)
    merged_somewhere = set().union(*(s.merged_adapters for s in layers))
    merged: list[str] | Irregular = sorted(merged_somewhere)
    if any((set(s.available_adapters) - set(s.merged_adapters)) & merged_somewhere for s in layers):
        merged = "irregular"  # merged in one layer, not in another that holds it
    grads: dict[str, list] = collections.defaultdict(list)
    devices: dict[str, set[str]] = collections.defaultdict(set)
    for s in layers:
        for key, value in s.requires_grad.items():
            grads[key].append(value)
        for key, types in s.devices.items():
            devices[key].update(types)
    active = _same(tuple(s.active_adapters) for s in layers)
    return TunerModelStatus(
        base_model_type=base_model_type,
        adapter_model_type=adapter_model_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=_same(s.enabled for s in layers),
        active_adapters=list(active) if active != "irregular" else active,
        merged_adapters=merged,
        requires_grad={key: _same(values) for key, values in grads.items()},
        available_adapters=sorted(set().union(*(s.available_adapters for s in layers))),
        devices={key: sorted(types) for key, types in devices.items()},
        quantization_backend=_same(s.quantization_backend for s in layers),
    )
