"""bitsandbytes' state-dict keys for a 4-bit weight, read and written.

A ``bitsandbytes.nn.Linear4bit`` saves, beside ``weight`` (the packed bytes, ``[(n + 1) // 2, 1]``, uint8
or viewed as its ``quant_storage`` dtype) and ``bias``::

    weight.absmax                                 fp32 [blocks], or uint8 with double quantization
    weight.quant_map                              fp32 [16], the NF4 levels
    weight.nested_absmax, weight.nested_quant_map only with double quantization
    weight.quant_state.bitsandbytes__nf4          uint8: the UTF-8 bytes of a JSON object with
                                                  quant_type, blocksize, dtype, shape and, nested,
                                                  nested_blocksize, nested_dtype, nested_offset
"""

from __future__ import annotations

import json

import torch

from fastlora.quant.nf4 import BLOCKSIZES, NF4_CODE, NF4State, dynamic_map, packed_numel

__all__ = ["QUANT_KEYS", "state_to_dict", "state_from_dict", "QuantStateError"]

_PACKED_KEY = "quant_state.bitsandbytes__nf4"
QUANT_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", _PACKED_KEY)
_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class QuantStateError(ValueError):
    """A 4-bit weight's quantization state is missing, inconsistent or not NF4."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def state_to_dict(state: NF4State) -> dict[str, torch.Tensor]:
    """The ``weight.*`` entries (without the ``weight.`` prefix) bitsandbytes writes for ``state``."""
    meta = {
        "quant_type": "nf4",
        "blocksize": state.blocksize,
        "dtype": _dtype_name(state.dtype),
        "shape": list(state.shape),
    }
    # Every tensor is the layer's own: safetensors refuses tensors that share storage across layers.
    out = {"absmax": state.absmax, "quant_map": state.code.clone()}
    if state.nested:
        out["nested_absmax"] = state.nested_absmax
        out["nested_quant_map"] = state.nested_code.clone()
        meta.update(
            nested_blocksize=state.nested_blocksize, nested_dtype="float32", nested_offset=state.offset
        )
    out[_PACKED_KEY] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    return out


def _fail(layer: str, message: str) -> QuantStateError:
    return QuantStateError(f"{layer}: {message}")


def state_from_dict(
    entries: dict[str, torch.Tensor], packed: torch.Tensor, layer: str, device: torch.device | None = None
) -> NF4State:
    """Check and unpack the ``weight.*`` entries (prefix stripped) of one layer against its packed
    ``weight``; every problem raises ``QuantStateError`` naming ``layer``."""
    unknown = sorted(set(entries) - set(QUANT_KEYS) - {k for k in entries if k.startswith("quant_state.")})
    if unknown:
        raise _fail(layer, f"unexpected quantization entries {unknown}")
    packed_keys = [k for k in entries if k.startswith("quant_state.")]
    if packed_keys != [_PACKED_KEY]:
        if any(k.endswith("bitsandbytes__fp4") for k in packed_keys):
            raise _fail(layer, "the weight is FP4-quantized; fastlora reads NF4 only")
        raise _fail(layer, f"expected exactly one {_PACKED_KEY!r} entry, found {packed_keys or 'none'}")
    try:
        meta = json.loads(bytes(entries[_PACKED_KEY].cpu().to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(layer, f"{_PACKED_KEY} does not hold bitsandbytes' JSON metadata ({err})") from None
    if meta.get("quant_type") != "nf4":
        raise _fail(layer, f"quant_type is {meta.get('quant_type')!r}; fastlora reads NF4 only")
    for key in ("absmax", "quant_map"):
        if key not in entries:
            raise _fail(layer, f"missing weight.{key}")
    blocksize, shape, dtype_name = meta.get("blocksize"), meta.get("shape"), meta.get("dtype")
    if blocksize not in BLOCKSIZES:
        raise _fail(layer, f"blocksize {blocksize!r} is not one of {BLOCKSIZES}")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise _fail(layer, f"shape {shape!r} is not a 2-D weight shape")
    if dtype_name not in _FLOAT_DTYPES:
        raise _fail(layer, f"dtype {dtype_name!r} is not float32, float16 or bfloat16")
    code = entries["quant_map"]
    if code.shape != NF4_CODE.shape or not torch.equal(code.float().cpu(), NF4_CODE):
        raise _fail(layer, "weight.quant_map is not the NF4 codebook")
    n = shape[0] * shape[1]
    nbytes = packed.numel() * packed.element_size()
    if nbytes != packed_numel(n):
        raise _fail(layer, f"packed weight holds {nbytes} bytes, shape {shape} needs {packed_numel(n)}")
    blocks = -(-n // blocksize)
    absmax = entries["absmax"]
    nested = "nested_absmax" in entries or "nested_offset" in meta
    if absmax.numel() != blocks:
        raise _fail(layer, f"weight.absmax has {absmax.numel()} values, {blocks} blocks of {blocksize} need {blocks}")
    device = device if device is not None else packed.device
    state = NF4State(
        absmax=absmax.to(device), shape=torch.Size(shape), dtype=_FLOAT_DTYPES[dtype_name], blocksize=blocksize,
        code=NF4_CODE.to(device),
    )
    if not nested:
        if absmax.dtype != torch.float32:
            raise _fail(layer, f"weight.absmax is {absmax.dtype}, expected float32 without double quantization")
        return state
    missing = [k for k in ("nested_absmax", "nested_quant_map") if k not in entries]
    missing += [k for k in ("nested_offset", "nested_blocksize") if k not in meta]
    if missing:
        raise _fail(layer, f"double quantization entries missing: {missing}")
    if absmax.dtype != torch.uint8:
        raise _fail(layer, f"weight.absmax is {absmax.dtype}, expected uint8 with double quantization")
    nested_blocksize = meta["nested_blocksize"]
    nested_code = entries["nested_quant_map"]
    if not isinstance(nested_blocksize, int) or nested_blocksize <= 0:
        raise _fail(layer, f"nested_blocksize {nested_blocksize!r} is not a positive int")
    if nested_code.shape != (256,) or not torch.equal(nested_code.float().cpu(), dynamic_map()):
        raise _fail(layer, "weight.nested_quant_map is not bitsandbytes' 8-bit dynamic map")
    nested_absmax = entries["nested_absmax"]
    if nested_absmax.numel() != -(-blocks // nested_blocksize):
        raise _fail(layer, f"weight.nested_absmax has {nested_absmax.numel()} values for {blocks} absmax values")
    state.nested_absmax = nested_absmax.float().to(device)
    state.nested_code = nested_code.float().to(device)
    state.nested_blocksize = nested_blocksize
    state.offset = float(meta["nested_offset"])
    return state
