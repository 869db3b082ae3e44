"""``LoraLinear``: a drop-in LoRA layer around a frozen linear base, with PEFT's attribute names.

The in-memory layout matches PEFT's ``lora.Linear`` (``base_layer``, ``lora_A[name]``, ``lora_B[name]``,
``lora_dropout[name]``, ``scaling[name]``, ...), so ``state_dict()`` keys are identical. The forward of
the first active adapter runs through the fused op ``fastlora.ops.lora_linear``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from fastlora._warn import warn
from fastlora.layers.adapter import AdapterLayer
from fastlora.layers.bank import AdapterBank, MixedBatch, mixed_batch_forward
from fastlora.layers.nf4 import LinearNF4
from fastlora.ops import lora_linear, nf4_linear

__all__ = ["LoraLinear"]


def _param(module: nn.Module, name: str):
    """``module.<name>``, from its parameter dict when it is there (what nn.Module.__getattr__ would return,
    without the Python call); through getattr otherwise (a parametrization, a plain attribute)."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


class LoraLinear(AdapterLayer):
    """LoRA around ``base_layer`` (``nn.Linear``, a ``[in, out]`` weight with ``fan_in_fan_out=True``, or a
    4-bit ``LinearNF4``: QLoRA, the LoRA update fused into the dequantize-matmul)."""

    adapter_layer_names = ("lora_A", "lora_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")
    # Set for the duration of a mixed-adapter forward (fastlora.mixed_adapter_batch): each token then takes
    # its own adapter through the stacked adapter_bank (fastlora.layers.bank) instead of the active one.
    mixed_batch: MixedBatch | None = None
    adapter_bank: AdapterBank | None = None

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str = "default",
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        fan_in_fan_out: bool = False,
        adapter_dtype: torch.dtype | None = torch.float32,
    ):
        super().__init__(base_layer, adapter_name, fan_in_fan_out)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, adapter_dtype)

    # ---- adapters -------------------------------------------------------------------------------
    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        adapter_dtype: torch.dtype | None = torch.float32,
    ) -> None:
        """Add (or replace) adapter ``adapter_name`` with its own rank, alpha and dropout."""
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        weight = self.base_layer.weight
        dtype = adapter_dtype or weight.dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, device=weight.device, dtype=dtype)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, device=weight.device, dtype=dtype)
        # in the layer's mode: the forward follows the dropout module's own (a new module starts in training)
        dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self.lora_dropout[adapter_name] = dropout.train(self.training)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.reset_lora_parameters(adapter_name, init_lora_weights)
        self.set_adapter(self._active_adapters)

    @torch.no_grad()
    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: bool | str) -> None:
        """PEFT's initialisation: B = 0 so the adapter starts as a no-op; A Kaiming-uniform or Gaussian.

        ``init_lora_weights=False`` keeps ``nn.Linear``'s random init for both (a non-zero update,
        for tests).
        """
        if init_lora_weights is False:
            return
        a = self.lora_A[adapter_name].weight
        if init_lora_weights == "gaussian":
            nn.init.normal_(a, std=1.0 / self.r[adapter_name])
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[adapter_name].weight)

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # The hot path of every adapted layer. Submodules and parameters are read from the modules' own
        # dicts: nn.Module.__getattr__ is a Python call per lookup, and a layer's Python costs about as
        # much as its whole LoRA update at one row (these lookups: 17 us of a 40 us call, 16 x 16, r 8).
        modules = self._modules
        base = modules["base_layer"]
        if self._disable_adapters:
            return base(x, *args, **kwargs)
        if self.mixed_batch is not None:
            return mixed_batch_forward(self, x, *args, **kwargs)
        lora_A = modules["lora_A"]._modules
        active = [name for name in self._active_adapters if name in lora_A]
        if self.merged_adapters or not active:
            return base(x, *args, **kwargs)
        first = active[0]
        lora_B, lora_dropout = modules["lora_B"]._modules, modules["lora_dropout"]._modules
        dropout = lora_dropout[first]
        # the dropout module's own mode, as PEFT's forward calls it (set_training can put it apart from the layer's)
        lora_args = (_param(lora_A[first], "weight"), _param(lora_B[first], "weight"), self.scaling[first],
                     dropout.p if isinstance(dropout, nn.Dropout) else 0.0, dropout.training)
        if isinstance(base, LinearNF4):
            dtype = x.dtype
            xc = x if base.compute_dtype is None else x.to(base.compute_dtype)
            y = nf4_linear(xc, base.weight, base.quant_state, base.bias, *lora_args).to(dtype)
        else:
            weight = _param(base, "weight")
            y = lora_linear(x, weight.t() if self.fan_in_fan_out else weight, _param(base, "bias"), *lora_args)
        for name in active[1:]:  # several adapters active at once: rare, plain PyTorch
            a, b = _param(lora_A[name], "weight"), _param(lora_B[name], "weight")
            xd = lora_dropout[name](x).to(a.dtype)
            y = y + (self.scaling[name] * (xd @ a.t() @ b.t())).to(y.dtype)
        return y

    # ---- merging ---------------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scaling * B A`` in fp32, laid out like the base weight (transposed for fan_in_fan_out)."""
        a = self.lora_A[adapter_name].weight.float()
        b = self.lora_B[adapter_name].weight.float()
        delta = (b @ a) * self.scaling[adapter_name]  # [out, r] @ [r, in] -> [out, in]
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Iterable[str] | None = None) -> None:
        """Fold adapters into the base weight (in fp32, then cast back to the weight's dtype).

        With ``safe_merge`` the result is checked for NaN/Inf before the base weight is touched.
        """
        names = self._active_adapters if adapter_names is None else list(adapter_names)
        names = [name for name in dict.fromkeys(names) if name in self.lora_A and name not in self.merged_adapters]
        if isinstance(self.base_layer, LinearNF4):
            if names:
                self._requantize(names, +1.0, safe_merge)
            return
        weight = self.base_layer.weight
        if safe_merge:  # every adapter is checked before the weight changes, so a failure merges none
            merged = weight.float()
            for name in names:
                merged = merged + self.get_delta_weight(name)
                # Checked in the weight's own dtype: a finite fp32 sum can still overflow fp16 on the way back.
                if not torch.isfinite(merged.to(weight.dtype)).all():
                    raise ValueError(
                        f"merging adapter {name!r} would put NaN or Inf into the base weights; nothing was merged"
                    )
        for name in names:
            weight.copy_((weight.float() + self.get_delta_weight(name)).to(weight.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        if isinstance(self.base_layer, LinearNF4):
            if self.merged_adapters:
                self._requantize(list(reversed(self.merged_adapters)), -1.0, safe_merge=False)
            return
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight.copy_((weight.float() - self.get_delta_weight(name)).to(weight.dtype))

    def check_merge(self, key: str, adapter_names: Iterable[str] | None = None) -> None:
        """Raise when merging ``adapter_names`` into ``key`` would put NaN or Inf into its weights, checked
        as ``merge`` computes it: in fp32, cast back to the weight's dtype after each adapter (a 4-bit
        base merges in fp32)."""
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        if isinstance(self.base_layer, LinearNF4):
            merged = self.merged_weight(names)
        else:
            merged = self.base_layer.weight
            for name in names:
                if name in self.lora_A and name not in self.merged_adapters:
                    merged = (merged.float() + self.get_delta_weight(name)).to(merged.dtype)
        if not torch.isfinite(merged).all():
            raise ValueError(f"merging {names} into {key} would put NaN or Inf into its weights; nothing was merged")

    def merged_weight(self, adapter_names: Iterable[str] | None = None) -> torch.Tensor:
        """The base weight plus the adapters' updates, in fp32 (a 4-bit base is dequantized first)."""
        names = self._active_adapters if adapter_names is None else list(adapter_names)
        base = self.base_layer
        weight = base.dequantize(torch.float32) if isinstance(base, LinearNF4) else base.weight.float()
        for name in dict.fromkeys(names):
            if name in self.lora_A and name not in self.merged_adapters:
                weight = weight + self.get_delta_weight(name)
        return weight

    @torch.no_grad()
    def dequantized_base(self, adapter_names: Iterable[str] | None = None) -> nn.Linear:
        """A 16-bit ``nn.Linear`` holding a 4-bit base with ``adapter_names`` merged in fp32 (no
        re-quantization), in the dtype the base was quantized from."""
        base = self.base_layer
        dtype = base.quant_state.dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=dtype)
        linear.weight.copy_(self.merged_weight(adapter_names).to(dtype))
        if base.bias is not None:
            linear.bias.copy_(base.bias)
        linear.train(base.training)
        return linear

    def _requantize(self, names: list[str], sign: float, safe_merge: bool) -> None:
        """Add (sign=+1) or remove (-1) adapters in a 4-bit base: dequantize, update in fp32, quantize."""
        warn("merging into a 4-bit NF4 base weight re-quantizes it, which rounds the merged weights (and "
             "unmerging rounds again); merge_and_unload() returns a 16-bit model without this rounding")
        weight = self.base_layer.dequantize(torch.float32)
        for name in names:
            weight = weight + sign * self.get_delta_weight(name)
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"merging adapters {names} would put NaN or Inf into the base weights; nothing was merged")
        self.base_layer.requantize(weight)
        if sign > 0:
            self.merged_adapters.extend(names)
        else:
            self.merged_adapters = [name for name in self.merged_adapters if name not in names]

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{name}: r={r}" for name, r in self.r.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, {ranks}"
