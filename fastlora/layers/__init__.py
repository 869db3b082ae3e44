"""Drop-in ``nn.Module`` replacements; they never import transformers."""

from fastlora.layers.adapter import AdapterLayer
from fastlora.layers.bank import AdapterBank, MixedBatch
from fastlora.layers.lora import LoraLinear
from fastlora.layers.modules_to_save import ModulesToSaveWrapper
from fastlora.layers.nf4 import LinearNF4

__all__ = ["AdapterBank", "AdapterLayer", "LinearNF4", "LoraLinear", "MixedBatch", "ModulesToSaveWrapper"]
