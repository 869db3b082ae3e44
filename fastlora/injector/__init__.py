"""The injector: target tables (data) plus one generic match-and-swap; the only code that knows transformers."""

from fastlora.injector.inject import inject_lora, resolve_target_modules, unload_modules
from fastlora.injector.lora_model import LoraModel
from fastlora.injector.targets import LORA_TARGET_MODULES

__all__ = ["LORA_TARGET_MODULES", "LoraModel", "inject_lora", "resolve_target_modules", "unload_modules"]
