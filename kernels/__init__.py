"""fastlora's Triton kernels, installed as ``fastlora.kernels``.

Imports torch and triton only, never ``fastlora``. ``fastlora.ops`` calls:

- ``lora_linear_fwd(x2, weight, bias, lora_A, lora_B, scaling, dropout_p, seed) -> (y, S)``
- ``lora_linear_bwd(dy2, x2, weight, lora_A, lora_B, S, seed, scaling, dropout_p, needs_dx, needs_dw,
  needs_db, needs_da, needs_dbB) -> (dx, dW, db, dA, dB)``
- ``unsupported_reason(x2, weight, bias, lora_A, lora_B, dropout_p) -> str | None``
- ``dropout_keep_mask(seed, M, K, p, device)``: the mask the kernels draw (tests and oracles)
- ``nf4_linear_fwd / nf4_linear_bwd / nf4_unsupported_reason``: the same for a frozen NF4 weight
  (QLoRA), and ``nf4_quantize / nf4_dequantize / nf4_matmul`` underneath (bitsandbytes' bytes)
- ``multi_lora_add(y, x, lora_A, lora_B, ranks, scalings, token_slots, sorted_tokens, blocks, block_m)``:
  a mixed batch's LoRA updates, each token with its own adapter of a stacked bank, added into the base
  output (``sgmv_shrink`` / ``sgmv_expand`` underneath); ``multi_lora_unsupported_reason`` says when not

The kernels run compiled on CUDA, or on CPU tensors under the Triton interpreter when
``TRITON_INTERPRET=1`` was set before triton was imported. ``FASTLORA_AUTOTUNE=1`` (read at import)
autotunes the fused GEMM instead of using the heuristic tiles.
"""

if __name__ == "kernels":
    # This folder was imported as the top-level ``kernels``: only a checkout's root on sys.path does that
    # (``python -m pytest`` and ``python -m bench`` put it first). That name is Hugging Face's ``kernels``
    # package, which transformers >= 5.25 imports when it is imported itself; hand the name over to the
    # installed package, or fail as if this folder were not there, instead of posing as it.
    from ._shadowed import hand_over as _hand_over

    _hand_over(__file__)
else:
    from .dropout import dropout_keep_mask
    from .lora_linear import lora_linear_bwd, lora_linear_fwd, unsupported_reason
    from .nf4 import nf4_dequantize, nf4_matmul, nf4_quantize
    from .nf4_linear import nf4_linear_bwd, nf4_linear_fwd, nf4_unsupported_reason, nf4_workspace_clear
    from .sgmv import multi_lora_add, multi_lora_unsupported_reason, sgmv_expand, sgmv_shrink

__all__ = [
    "lora_linear_fwd",
    "lora_linear_bwd",
    "unsupported_reason",
    "dropout_keep_mask",
    "nf4_quantize",
    "nf4_dequantize",
    "nf4_matmul",
    "nf4_linear_fwd",
    "nf4_linear_bwd",
    "nf4_unsupported_reason",
    "nf4_workspace_clear",
    "sgmv_shrink",
    "sgmv_expand",
    "multi_lora_add",
    "multi_lora_unsupported_reason",
]
