"""(IA)^3 (Liu et al. 2022): a learned vector scales each targeted layer's output, or, for the
``feedforward_modules``, its input. PEFT's names and formats: ``ia3_l`` is ``[out, 1]`` (output scaling)
or ``[1, in]`` (input scaling) per adapter, saved as ``...<module>.ia3_l``.

The scaling rides on the base matmul through ``_IA3Linear``, which saves no more than PEFT's
``base(x) * l`` (the unscaled output, or x for input scaling) and keeps its temporaries in the input's
dtype; without gradients the vector is folded into the weight when that is the smaller tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fastlora._warn import warn
from fastlora.config import PeftConfig, PeftType, register_config
from fastlora.injector.inject import fit_fan_in_fan_out
from fastlora.injector.targets import IA3_FEEDFORWARD_MODULES, IA3_TARGET_MODULES
from fastlora.injector.tuner import AdapterTuner, register_tuner
from fastlora.layers import AdapterLayer

__all__ = ["IA3Config", "IA3Linear", "IA3Model"]


@register_config
@dataclass
class IA3Config(PeftConfig):
    """PEFT's ``IA3Config``. ``feedforward_modules`` (names matched as suffixes, or a full-match regex) must
    lie within ``target_modules``; they get their input scaled, the other targets their output. None takes
    PEFT's defaults for the model type."""

    PEFT_TYPE: ClassVar[PeftType] = PeftType.IA3

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    def __post_init__(self):
        super().__post_init__()
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple, set)):
                setattr(self, name, sorted(set(value)))
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            outside = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if outside:
                raise ValueError(f"feedforward_modules must be a subset of target_modules; {outside} are not targets")
        if not isinstance(self.init_ia3_weights, bool):
            raise ValueError(f"init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")


class _IA3Linear(torch.autograd.Function):
    """``y = (x * l) W^T + b`` (``feedforward``, l: [K]) or ``y = (x W^T + b) * l`` (l: [N]), W and b frozen.

    Backward, with ``dY``: [M, N]:
      input scaling:  ``G = dY W`` [M, K], ``dx = G * l``, ``dl = sum_rows(G * x)``  (saves x)
      output scaling: ``dx = (dY * l) W``, ``dl = sum_rows(dY * y0)`` with ``y0 = x W^T + b`` (saves y0)
    which is what PEFT's ``base(x) * l`` saves too, without its fp32 copies of x-sized tensors.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, feedforward: bool):
        s = scale.to(x.dtype)
        if feedforward:
            rows = x.numel() // x.shape[-1]
            # (x * l) W^T == x (W * l)^T: scale whichever of x [M, K] and W [N, K] is smaller.
            y = F.linear(x, weight * s, bias) if weight.shape[0] < rows else F.linear(x * s, weight, bias)
            ctx.save_for_backward(x, weight, scale)
        else:
            y0 = F.linear(x, weight, bias)
            y = y0 * s
            ctx.save_for_backward(y0, weight, scale)
        ctx.feedforward = feedforward
        return y

    @staticmethod
    def backward(ctx, dy):
        saved, weight, scale = ctx.saved_tensors
        s = scale.to(dy.dtype)
        dx = dscale = None
        if ctx.feedforward:
            g = dy @ weight  # [..., N] @ [N, K] -> [..., K]
            if ctx.needs_input_grad[0]:
                dx = g * s
            if ctx.needs_input_grad[3]:
                dscale = (g * saved).reshape(-1, g.shape[-1]).sum(0, dtype=torch.float32)
        else:
            if ctx.needs_input_grad[0]:
                dx = (dy * s) @ weight
            if ctx.needs_input_grad[3]:
                dscale = (dy * saved).reshape(-1, dy.shape[-1]).sum(0, dtype=torch.float32)
        if dscale is not None:
            dscale = dscale.to(scale.dtype)
        return dx, None, None, dscale, None


@torch.no_grad()
def _ia3_linear_nograd(x, weight, bias, scale, feedforward: bool) -> torch.Tensor:
    s = scale.to(x.dtype)
    rows = x.numel() // x.shape[-1]
    if feedforward:
        return F.linear(x, weight * s, bias) if weight.shape[0] < rows else F.linear(x * s, weight, bias)
    # (x W^T + b) * l == x (l W)^T + l b: fold into W [N, K] when it is smaller than y [M, N].
    if weight.shape[1] < rows:
        return F.linear(x, weight * s[:, None], None if bias is None else bias * s)
    return F.linear(x, weight, bias) * s


class IA3Linear(AdapterLayer):
    """IA3 around a linear ``base_layer`` (``nn.Linear``, or a ``[in, out]`` weight with ``fan_in_fan_out``).
    Whether it scales the input (``is_feedforward``) is fixed by the first adapter, as in PEFT."""

    adapter_layer_names = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, adapter_name: str = "default", is_feedforward: bool = False,
                 init_ia3_weights: bool = True, fan_in_fan_out: bool = False,
                 adapter_dtype: torch.dtype | None = torch.float32):
        super().__init__(base_layer, adapter_name, fan_in_fan_out)
        self.is_feedforward = is_feedforward
        self.ia3_l = nn.ParameterDict()
        self.update_layer(adapter_name, init_ia3_weights, adapter_dtype)

    def update_layer(self, adapter_name: str, init_ia3_weights: bool = True,
                     adapter_dtype: torch.dtype | None = torch.float32) -> None:
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        weight = self.base_layer.weight
        dtype = self._adapter_dtype(adapter_dtype)
        init = torch.ones if init_ia3_weights else torch.randn  # random only for tests, as in PEFT
        self.ia3_l[adapter_name] = nn.Parameter(init(shape, device=weight.device, dtype=dtype))
        self.set_adapter(self._active_adapters)

    def _scale(self, names: list[str]) -> torch.Tensor:
        """The product of the adapters' vectors, flat: [in] or [out]."""
        scale = self.ia3_l[names[0]].flatten()
        for name in names[1:]:
            scale = scale * self.ia3_l[name].flatten()
        return scale

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = self._active()
        if self._disable_adapters or self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        scale = self._scale(active)
        weight, bias = self._base_weight(), self.base_layer.bias
        if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
            # A base being trained as well (rare): plain autograd, PEFT's formula.
            if self.is_feedforward:
                return F.linear(x * scale.to(x.dtype), weight, bias)
            return F.linear(x, weight, bias) * scale.to(x.dtype)
        if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
            return _IA3Linear.apply(x, weight, bias, scale, self.is_feedforward)
        return _ia3_linear_nograd(x, weight, bias, scale, self.is_feedforward)

    # ---- merging: the vectors multiply the weight (and, for output scaling, the bias) ------------------
    def _weight_factor(self, name: str) -> torch.Tensor:
        """``ia3_l[name]`` shaped to multiply the stored weight ([out, in], or [in, out] for fan_in_fan_out)."""
        factor = self.ia3_l[name].float()
        return factor.t() if self.fan_in_fan_out else factor

    def merged_weight(self, adapter_names=None) -> torch.Tensor:
        weight = self.base_layer.weight.float()
        for name in self._to_merge(adapter_names):
            weight = weight * self._weight_factor(name)
        return weight

    def check_merge(self, key: str, adapter_names=None) -> None:
        super().check_merge(key, adapter_names)
        bias = self.base_layer.bias
        if bias is not None and not self.is_feedforward:
            for name in self._to_merge(adapter_names):
                bias = bias.float() * self.ia3_l[name].flatten().float()
            if not torch.isfinite(bias.to(self.base_layer.bias.dtype)).all():
                raise ValueError(f"merging into {key} would put NaN or Inf into its bias; nothing was merged")

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        names = self._to_merge(adapter_names)
        if safe_merge:
            self.check_merge(type(self).__name__, names)
        weight, bias = self.base_layer.weight, self.base_layer.bias
        for name in names:
            weight.copy_((weight.float() * self._weight_factor(name)).to(weight.dtype))
            if bias is not None and not self.is_feedforward:
                bias.copy_((bias.float() * self.ia3_l[name].flatten().float()).to(bias.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        weight, bias = self.base_layer.weight, self.base_layer.bias
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            factor = self._weight_factor(name)
            if not bool((factor != 0).all()):
                warn(f"IA3 adapter {name!r} has zero scales: the weights they zeroed cannot be restored")
            factor = torch.where(factor == 0, torch.ones_like(factor), factor)
            weight.copy_((weight.float() / factor).to(weight.dtype))
            if bias is not None and not self.is_feedforward:
                flat = self.ia3_l[name].flatten().float()
                bias.copy_((bias.float() / torch.where(flat == 0, torch.ones_like(flat), flat)).to(bias.dtype))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", is_feedforward={self.is_feedforward}"


def _is_feedforward(key: str, feedforward_modules: list[str] | str) -> bool:
    """PEFT's rule: a str is a full-match regex, a list matches as a plain suffix of the module name."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, key) is not None
    return any(key.endswith(name) for name in feedforward_modules)


@register_tuner
class IA3Model(AdapterTuner):
    prefix = "ia3_"
    config_cls = IA3Config
    layer_cls = IA3Linear
    default_targets = IA3_TARGET_MODULES
    method = "IA3"

    def _prepare_config(self, config: IA3Config) -> dict[str, Any]:
        feedforward = config.feedforward_modules
        if feedforward is None:
            model_type = getattr(getattr(self.model, "config", None), "model_type", None)
            if model_type not in IA3_FEEDFORWARD_MODULES:
                raise ValueError(
                    f"feedforward_modules is not set and model_type {model_type!r} has no default; pass "
                    f"feedforward_modules (a subset of target_modules, possibly [])"
                )
            feedforward = list(IA3_FEEDFORWARD_MODULES[model_type])
        return {"feedforward_modules": feedforward}

    def _create(self, key, module, config: IA3Config, adapter_name, adapter_dtype, prepared) -> IA3Linear:
        return IA3Linear(module, adapter_name, is_feedforward=_is_feedforward(key, prepared["feedforward_modules"]),
                         init_ia3_weights=config.init_ia3_weights,
                         fan_in_fan_out=fit_fan_in_fan_out(module, config, key), adapter_dtype=adapter_dtype)

    def _update(self, key, layer: IA3Linear, config: IA3Config, adapter_name, prepared) -> None:
        dtype = layer.ia3_l[layer.adapters[0]].dtype
        layer.update_layer(adapter_name, config.init_ia3_weights, dtype)
