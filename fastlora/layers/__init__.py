"""Drop-in ``nn.Module`` replacements; they never import transformers."""

from fastlora.layers.lora import LoraLinear
from fastlora.layers.modules_to_save import ModulesToSaveWrapper

__all__ = ["LoraLinear", "ModulesToSaveWrapper"]
