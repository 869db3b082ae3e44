"""``LoraModel``: the injected transformers model plus its LoRA adapters (PEFT's ``LoraModel``).

``PeftModel.base_model`` is one of these and ``.model`` is the transformers model, so parameter
names read ``base_model.model.<module path>`` exactly as in PEFT. The adapter API is the one every
weight-adapting method shares (``AdapterTuner``); LoRA adds how its layers are built (rank and alpha
patterns, Conv1D's layout, 4-bit bases), mixed-adapter batches and the 16-bit merge of 4-bit bases.
"""

from __future__ import annotations

from torch import nn

from fastlora.config import LoraConfig
from fastlora.injector.inject import fit_fan_in_fan_out, unload_modules
from fastlora.injector.match import pattern_value
from fastlora.injector.mixed_batch import mixed_adapter_batch
from fastlora.injector.targets import LORA_TARGET_MODULES
from fastlora.injector.tuner import AdapterTuner
from fastlora.injector.weighted import add_weighted_adapter
from fastlora.layers import LoraLinear

__all__ = ["LoraModel"]


class LoraModel(AdapterTuner):
    prefix = "lora_"
    config_cls = LoraConfig
    layer_cls = LoraLinear
    default_targets = LORA_TARGET_MODULES
    method = "LoRA"

    def forward(self, *args, **kwargs):
        adapter_names = kwargs.pop("adapter_names", None)  # PEFT's mixed-adapter batch: one name per sequence
        if adapter_names is None:
            return self.model(*args, **kwargs)
        with mixed_adapter_batch(self, adapter_names):
            return self.model(*args, **kwargs)

    def _wrappable(self) -> None:
        return None  # the injector's linear layers: nn.Linear, Conv1D and 4-bit LinearNF4

    def _create(self, key: str, module: nn.Module, config: LoraConfig, adapter_name: str, adapter_dtype,
                prepared) -> LoraLinear:
        return LoraLinear(
            module,
            adapter_name,
            r=pattern_value(key, config.rank_pattern, config.r),
            lora_alpha=pattern_value(key, config.alpha_pattern, config.lora_alpha),
            lora_dropout=config.lora_dropout,
            init_lora_weights=config.init_lora_weights,
            use_rslora=config.use_rslora,
            fan_in_fan_out=fit_fan_in_fan_out(module, config, key),
            adapter_dtype=adapter_dtype,
        )

    def _update(self, key: str, layer: LoraLinear, config: LoraConfig, adapter_name: str, prepared) -> None:
        # A further adapter takes the dtype of the layer's first one.
        dtype = layer.lora_A[next(iter(layer.lora_A))].weight.dtype if layer.lora_A else None
        layer.update_layer(
            adapter_name, pattern_value(key, config.rank_pattern, config.r),
            pattern_value(key, config.alpha_pattern, config.lora_alpha), config.lora_dropout,
            config.init_lora_weights, config.use_rslora, dtype,
        )

    add_weighted_adapter = add_weighted_adapter  # see fastlora.injector.weighted

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
