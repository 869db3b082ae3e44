"""fastlora's Triton kernels, installed as ``fastlora.kernels``.

Imports torch and triton only, never ``fastlora``. The fused LoRA kernels (``lora_linear_fwd``,
``lora_linear_bwd``) arrive with the kernels issue; until then ``fastlora.ops`` finds none here and
runs the reference, saying so once when ``FASTLORA_BACKEND=triton`` asks for kernels.
"""
