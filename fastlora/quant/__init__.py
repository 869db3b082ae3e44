"""4-bit NF4 quantization, byte-compatible with bitsandbytes: pure-PyTorch math and the state-dict format."""

from fastlora.quant.nf4 import (
    BLOCKSIZES,
    NF4_CODE,
    NF4State,
    dequantize_absmax,
    dequantize_nf4,
    dynamic_map,
    quantize_nf4,
)
from fastlora.quant.state_dict import QuantStateError, state_from_dict, state_to_dict

__all__ = [
    "BLOCKSIZES",
    "NF4_CODE",
    "NF4State",
    "QuantStateError",
    "dequantize_absmax",
    "dequantize_nf4",
    "dynamic_map",
    "quantize_nf4",
    "state_from_dict",
    "state_to_dict",
]
