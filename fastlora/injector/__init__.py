"""The injector: target tables (data) plus one generic match-and-swap; the only code that knows transformers."""

from fastlora.injector.inject import resolve_target_modules, select_targets, unload_modules
from fastlora.injector.lora_model import LoraModel
from fastlora.injector.mixed_batch import BASE_ADAPTER, adapter_slots, mixed_adapter_batch
from fastlora.injector.quantize import prepare_model_for_kbit_training, quantize_model
from fastlora.injector.targets import LORA_TARGET_MODULES

__all__ = [
    "BASE_ADAPTER",
    "LORA_TARGET_MODULES",
    "LoraModel",
    "adapter_slots",
    "select_targets",
    "mixed_adapter_batch",
    "prepare_model_for_kbit_training",
    "quantize_model",
    "resolve_target_modules",
    "unload_modules",
]
