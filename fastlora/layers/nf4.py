"""``LinearNF4``: a frozen 4-bit NF4 linear layer with ``bitsandbytes.nn.Linear4bit``'s state dict.

The packed weight is the ``weight`` parameter (uint8 ``[(n + 1) // 2, 1]``, never trainable); the
quantization state lives beside it, outside ``_parameters`` and ``_buffers``, so ``model.half()`` or
``model.to(torch.bfloat16)`` can never touch the absmax values (they move with ``.to(device)``). The
state dict holds bitsandbytes' keys (``weight``, ``weight.absmax``, ``weight.quant_map``,
``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``, ``bias``),
with the weight viewed as ``quant_storage`` the way bitsandbytes saves it.

Loading checks the whole quantization state first and raises ``QuantStateError`` naming the layer,
leaving the layer as it was. A float ``[out, in]`` weight with no quantization entries is quantized
on load (a 16-bit checkpoint into a 4-bit model).
"""

from __future__ import annotations

import torch
from torch import nn

from fastlora.ops import nf4_linear
from fastlora.quant import NF4State, QuantStateError, dequantize_nf4, quantize_nf4, state_from_dict, state_to_dict
from fastlora.quant.state_dict import QUANT_KEYS

__all__ = ["LinearNF4", "quantize_weight", "check_nf4_entries"]


def quantize_weight(weight: torch.Tensor, blocksize: int, double_quant: bool) -> tuple[torch.Tensor, NF4State]:
    """NF4-quantize a float ``[out, in]`` weight on its device: the Triton kernel on CUDA, else the
    reference (the bytes are the same)."""
    from fastlora.ops.dispatch import resolve_backend

    kernels = resolve_backend("nf4_linear", weight.device) if weight.device.type == "cuda" else None
    if kernels is None:
        return quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant)
    from fastlora.quant.nf4 import NF4_CODE, _midpoints, quantize_blockwise_8bit

    code = NF4_CODE.to(weight.device)
    packed, absmax = kernels.nf4_quantize(weight.detach(), _midpoints(code), blocksize)
    state = NF4State(absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize, code=code)
    if double_quant:
        from fastlora.quant.nf4 import _DYNAMIC

        offset = absmax.mean()
        q_absmax, nested_absmax = quantize_blockwise_8bit(absmax - offset)
        state.absmax, state.nested_absmax, state.offset = q_absmax, nested_absmax, float(offset)
        state.nested_code = _DYNAMIC.to(weight.device)
    return packed, state


def _entries(state_dict: dict, prefix: str) -> dict[str, torch.Tensor]:
    head = prefix + "weight."
    return {key[len(head):]: value for key, value in state_dict.items() if key.startswith(head)}


def check_nf4_entries(state_dict: dict, prefix: str, layer: str, out_features: int, in_features: int,
                      device: torch.device) -> NF4State | None:
    """The NF4 state the entries under ``prefix`` describe (None for a float weight to quantize), or a
    ``QuantStateError`` naming ``layer``. Reads nothing but ``state_dict``."""
    weight = state_dict.get(prefix + "weight")
    entries = _entries(state_dict, prefix)
    if weight is None:
        raise QuantStateError(f"{layer}: the state dict has no {prefix}weight")
    if not entries and weight.dtype.is_floating_point and tuple(weight.shape) == (out_features, in_features):
        return None
    if not entries:
        raise QuantStateError(f"{layer}: {prefix}weight has no quantization state ({prefix}weight.absmax, ...)")
    state = state_from_dict(entries, weight, layer, device=device)
    if tuple(state.shape) != (out_features, in_features):
        raise QuantStateError(
            f"{layer}: the quantized weight is {list(state.shape)}, the layer is [{out_features}, {in_features}]"
        )
    return state


class LinearNF4(nn.Module):
    """``y = x deq(W)^T + b`` with W stored as NF4 (bitsandbytes' format), computed in ``compute_dtype``
    (the input's dtype when None) and returned in the input's dtype."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype | None = None,
        blocksize: int = 64,
        double_quant: bool = False,
        quant_storage: torch.dtype = torch.uint8,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        """An all-zero 4-bit layer, to be filled by ``load_state_dict`` (use ``from_linear`` to quantize)."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.blocksize, self.double_quant, self.quant_storage = blocksize, double_quant, quant_storage
        packed, state = quantize_nf4(torch.zeros(out_features, in_features, device=device, dtype=dtype or torch.float32),
                                     blocksize=blocksize, double_quant=double_quant)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.quant_state = state
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        blocksize: int = 64,
        double_quant: bool = False,
        compute_dtype: torch.dtype | None = None,
        quant_storage: torch.dtype = torch.uint8,
        transpose: bool = False,
    ) -> LinearNF4:
        """Quantize an ``nn.Linear`` (or, with ``transpose``, a ``[in, out]`` Conv1D-style weight)."""
        weight = linear.weight.detach()
        if transpose:
            weight = weight.t()
        out_features, in_features = weight.shape
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = in_features, out_features
        layer.compute_dtype = compute_dtype
        layer.blocksize, layer.double_quant, layer.quant_storage = blocksize, double_quant, quant_storage
        packed, layer.quant_state = quantize_weight(weight.contiguous(), blocksize, double_quant)
        layer.weight = nn.Parameter(packed, requires_grad=False)
        bias = getattr(linear, "bias", None)
        layer.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        layer.train(linear.training)
        return layer

    # ---- compute ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        return nf4_linear(x, self.weight, self.quant_state, self.bias).to(dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``[out, in]`` weight in ``dtype`` (default: the dtype it was quantized from)."""
        return dequantize_nf4(self.weight, self.quant_state, dtype)

    @torch.no_grad()
    def requantize(self, weight: torch.Tensor) -> None:
        """Replace the 4-bit weight by the quantization of a float ``[out, in]`` ``weight`` (rounds)."""
        packed, state = quantize_weight(weight.to(self.weight.device), self.blocksize, self.double_quant)
        state.dtype = self.quant_state.dtype
        self.weight.data = packed
        self.quant_state = state

    # ---- the quantization state follows the module across devices, never across dtypes -------------
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        device = self.weight.device
        if self.quant_state.absmax.device != device:
            self.quant_state = self.quant_state.to(device)
        return self

    # ---- bitsandbytes' state dict ---------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        weight = destination[prefix + "weight"]
        if self.quant_storage != torch.uint8:
            destination[prefix + "weight"] = weight.reshape(-1).view(self.quant_storage).unsqueeze(1)
        for key, value in state_to_dict(self.quant_state).items():
            destination[prefix + "weight." + key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        layer = prefix.rstrip(".") or type(self).__name__
        if prefix + "weight" not in state_dict:
            missing_keys.append(prefix + "weight")
            if self.bias is not None and prefix + "bias" not in state_dict:
                missing_keys.append(prefix + "bias")
            return
        try:
            state = check_nf4_entries(state_dict, prefix, layer, self.out_features, self.in_features,
                                      self.weight.device)
        except QuantStateError as err:
            error_msgs.append(str(err))
            return
        bias = state_dict.get(prefix + "bias")
        if self.bias is not None and bias is not None and tuple(bias.shape) != (self.out_features,):
            error_msgs.append(f"{layer}: bias has shape {list(bias.shape)}, expected [{self.out_features}]")
            return
        weight = state_dict[prefix + "weight"]
        with torch.no_grad():
            if state is None:  # a float checkpoint: quantize it with this layer's settings
                packed, state = quantize_weight(weight.to(self.weight.device), self.blocksize, self.double_quant)
            else:
                packed = weight.reshape(-1).contiguous().view(torch.uint8).view(-1, 1).to(self.weight.device)
                self.quant_storage = weight.dtype
                self.blocksize, self.double_quant = state.blocksize, state.nested
            self.weight.data = packed
            self.quant_state = state
            if self.bias is not None and bias is not None:
                self.bias.copy_(bias)
        if self.bias is not None and bias is None:
            missing_keys.append(prefix + "bias")
        known = {prefix + "weight", prefix + "bias"} | {prefix + "weight." + k for k in QUANT_KEYS}
        unexpected_keys.extend(
            key for key in state_dict if key.startswith(prefix) and key not in known and "." not in key[len(prefix):]
        )

    def extra_repr(self) -> str:
        nested = ", double_quant=True" if self.quant_state.nested else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.quant_state.blocksize}{nested}")
