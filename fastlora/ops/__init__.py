"""fastlora's ops: ``torch.library`` registrations with autograd, dispatching to the reference or kernels."""

from fastlora.ops.dispatch import get_backend
from fastlora.ops.lora_linear import lora_linear
from fastlora.ops.multi_lora import AdapterBatch, adapter_batch, multi_lora_add_
from fastlora.ops.nf4_linear import nf4_linear

__all__ = ["get_backend", "lora_linear", "nf4_linear", "AdapterBatch", "adapter_batch", "multi_lora_add_"]
