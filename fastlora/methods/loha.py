"""LoHa (Hyeon-Woo et al. 2022, FedPara; LyCORIS): the update is the Hadamard product of two low-rank
products, ``dW = scaling * (w1_a w1_b) * (w2_a w2_b)``, under PEFT's names ``hada_w1_a`` ``[out, r]``,
``hada_w1_b`` ``[r, in]``, ``hada_w2_a``, ``hada_w2_b`` and ``scaling = alpha / r``.

PEFT builds ``dW`` ([out, in]) every step and runs a second full matmul with it. Here the product is
written as one low-rank matrix pair instead (a Khatri-Rao product: row ``o`` of ``U`` is
``w1_a[o] (x) w2_a[o]``, column ``k`` of ``V`` is ``w1_b[:, k] (x) w2_b[:, k]``, rank r^2), which rides on
``fastlora.ops.lora_linear`` as an ordinary LoRA update. When r^2 is too large for that to pay, ``dW``
is added to the base weight and one matmul does both (saving x and the factors for the backward, not
PEFT's [out, in] ``dW``). Linear layers only: PEFT's LoHa has no Conv1D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fastlora.config import PeftConfig, PeftType, register_config
from fastlora.injector.match import pattern_value
from fastlora.injector.targets import LOHA_TARGET_MODULES
from fastlora.injector.tuner import AdapterTuner, register_tuner
from fastlora.layers import AdapterLayer
from fastlora.ops import lora_linear

__all__ = ["LoHaConfig", "LoHaLinear", "LoHaModel"]


@register_config
@dataclass
class LoHaConfig(PeftConfig):
    """PEFT's ``LoHaConfig`` (same fields and defaults). ``rank_dropout`` drops rows of the update per step,
    ``module_dropout`` the whole adapter; both only in training."""

    PEFT_TYPE: ClassVar[PeftType] = PeftType.LOHA

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False  # PEFT's option for Conv2d layers, which fastlora does not wrap
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None

    def __post_init__(self):
        super().__post_init__()
        _check_rank("r", self.r)
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        for key, rank in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", rank)
        for name in ("rank_dropout", "module_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"init_weights must be True or False, got {self.init_weights!r}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple, set)):
                setattr(self, name, sorted(set(value)))
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform")


def _check_rank(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _khatri_rao(w1a, w1b, w2a, w2b) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U [out, r1*r2], V [r1*r2, in])`` with ``U @ V == (w1a @ w1b) * (w2a @ w2b)``."""
    u = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], -1)
    v = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, w1b.shape[1])
    return u, v


def _low_rank_pays(rows: int, r: int, in_features: int, out_features: int, training: bool) -> bool:
    """Whether the rank r^2 form costs fewer multiply-adds than a materialized ``dW``.

    Per step the low-rank form costs ``rows * r^2 * (in + out)`` in the forward and twice that in the
    backward; ``dW`` costs ``2 r in out`` to build and, with gradients, a full ``[out, in]`` weight
    gradient (``rows * in * out``) in the backward.
    """
    low_rank = r * r * (in_features + out_features)
    if training:
        return 3 * low_rank <= in_features * out_features
    return rows * low_rank <= 2 * r * in_features * out_features


class _LoHaMergedLinear(torch.autograd.Function):
    """``y = x (W + dW)^T + b`` with ``dW = scale * (w1a w1b) * (w2a w2b)`` (rows scaled by ``row_mask`` for
    rank dropout), W and b frozen. Saves x and the four small factors, never an [out, in] tensor: the
    backward rebuilds ``W1 = w1a w1b`` and ``W2 = w2a w2b`` (2 r in out multiply-adds) instead. With
    ``G = scale * mask * dY^T x`` ([out, in]):

        dx = dY (W + dW),   dw1a = (G * W2) w1b^T,   dw1b = w1a^T (G * W2),   likewise w2a, w2b with W1.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, w1a, w1b, w2a, w2b, scale: float, row_mask):
        delta = (w1a @ w1b) * (w2a @ w2b) * scale  # [out, in]
        if row_mask is not None:
            delta = delta * row_mask[:, None]
        ctx.save_for_backward(x, weight, w1a, w1b, w2a, w2b, row_mask)
        ctx.scale = scale
        return F.linear(x, weight + delta.to(weight.dtype), bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, w1a, w1b, w2a, w2b, row_mask = ctx.saved_tensors
        w1, w2 = w1a @ w1b, w2a @ w2b
        dx = None
        if ctx.needs_input_grad[0]:
            delta = w1 * w2 * ctx.scale
            if row_mask is not None:
                delta = delta * row_mask[:, None]
            dx = dy @ (weight + delta.to(weight.dtype))
            del delta
        g = dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])  # [out, M] @ [M, in]
        g = g.to(w1.dtype) * ctx.scale
        if row_mask is not None:
            g = g * row_mask[:, None]
        g1, g2 = g * w2, g * w1
        del g, w1, w2
        return (dx, None, None, g1 @ w1b.t(), w1a.t() @ g1, g2 @ w2b.t(), w2a.t() @ g2, None, None)


class LoHaLinear(AdapterLayer):
    """LoHa around an ``nn.Linear`` ``base_layer``, with PEFT's attribute names."""

    adapter_layer_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    other_param_names = ("r", "alpha", "scaling", "rank_dropout", "module_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str = "default", r: int = 8, alpha: float = 8,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, init_weights: bool = True,
                 adapter_dtype: torch.dtype | None = torch.float32):
        super().__init__(base_layer, adapter_name)
        self.hada_w1_a = nn.ParameterDict()
        self.hada_w1_b = nn.ParameterDict()
        self.hada_w2_a = nn.ParameterDict()
        self.hada_w2_b = nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}
        self.update_layer(adapter_name, r, alpha, rank_dropout, module_dropout, init_weights, adapter_dtype)

    def update_layer(self, adapter_name: str, r: int, alpha: float, rank_dropout: float = 0.0,
                     module_dropout: float = 0.0, init_weights: bool = True,
                     adapter_dtype: torch.dtype | None = torch.float32) -> None:
        _check_rank("r", r)
        weight = self.base_layer.weight
        kwargs = dict(device=weight.device, dtype=self._adapter_dtype(adapter_dtype))
        out_features, in_features = self.out_features, self.in_features
        self.hada_w1_a[adapter_name] = nn.Parameter(torch.empty(out_features, r, **kwargs))
        self.hada_w1_b[adapter_name] = nn.Parameter(torch.empty(r, in_features, **kwargs))
        self.hada_w2_a[adapter_name] = nn.Parameter(torch.empty(out_features, r, **kwargs))
        self.hada_w2_b[adapter_name] = nn.Parameter(torch.empty(r, in_features, **kwargs))
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / r
        self.rank_dropout[adapter_name] = rank_dropout
        self.module_dropout[adapter_name] = module_dropout
        self.reset_adapter_parameters(adapter_name, init_weights)
        self.set_adapter(self._active_adapters)

    @torch.no_grad()
    def reset_adapter_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """PEFT's initialisation: Kaiming-uniform factors with ``hada_w2_b = 0``, so the update starts at
        zero; ``init_weights=False`` draws ``hada_w2_b`` too (a non-zero update, for tests)."""
        for table in self.adapter_layer_names:
            nn.init.kaiming_uniform_(getattr(self, table)[adapter_name], a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.hada_w2_b[adapter_name])

    def _factors(self, name: str) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, table)[name] for table in self.adapter_layer_names)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        w1a, w1b, w2a, w2b = (f.float() for f in self._factors(adapter_name))
        return (w1a @ w1b) * (w2a @ w2b) * self.scaling[adapter_name]  # [out, in]

    def _row_mask(self, name: str, like: torch.Tensor) -> torch.Tensor | None:
        """Rank dropout: a kept/dropped flag per output row, rescaled to mean 1 (None: nothing to drop)."""
        p = self.rank_dropout[name]
        if not (self.training and p > 0.0):
            return None
        keep = (torch.rand(self.out_features, device=like.device) > p).to(like.dtype)
        mean = keep.mean()
        return keep / mean if mean > 0 else keep

    def _skipped(self, name: str) -> bool:
        # One draw per adapter per training forward, even at p = 0, as PEFT does: a seeded run then sees the
        # same random stream (the base model's dropout masks) in both libraries.
        return self.training and bool(torch.rand(1) <= self.module_dropout[name])

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = [name for name in self._active() if not self._skipped(name)]
        if self._disable_adapters or self.merged or not names:
            return self.base_layer(x, *args, **kwargs)
        weight, bias = self.base_layer.weight, self.base_layer.bias
        rows = x.numel() // x.shape[-1]
        grads = torch.is_grad_enabled()
        low_rank = [n for n in names if _low_rank_pays(rows, self.r[n], self.in_features, self.out_features, grads)]
        dense = [n for n in names if n not in low_rank]
        if len(dense) == 1 and not low_rank and not (weight.requires_grad or (bias is not None and bias.requires_grad)):
            # the usual case: one adapter, dW added to the base weight, one matmul for both
            name = dense[0]
            mask = self._row_mask(name, self.hada_w1_a[name])
            return _LoHaMergedLinear.apply(x, weight, bias, *self._factors(name), self.scaling[name], mask)
        for name in dense:  # several adapters, or a base being trained too: plain autograd
            w1a, w1b, w2a, w2b = self._factors(name)
            delta = (w1a @ w1b) * (w2a @ w2b) * self.scaling[name]
            mask = self._row_mask(name, delta)
            if mask is not None:
                delta = delta * mask[:, None]
            weight = weight + delta.to(weight.dtype)
        if not low_rank:
            return F.linear(x, weight, bias)
        first, *rest = low_rank
        u, v = self._update_factors(first)
        y = lora_linear(x, weight, bias, v, u, self.scaling[first], 0.0, self.training)
        for name in rest:  # several adapters at once: rare, plain PyTorch
            u, v = self._update_factors(name)
            y = y + (self.scaling[name] * ((x.to(v.dtype) @ v.t()) @ u.t())).to(y.dtype)
        return y

    def _update_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        u, v = _khatri_rao(*self._factors(name))
        mask = self._row_mask(name, u)
        return (u if mask is None else u * mask[:, None]), v

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{name}: r={r}" for name, r in self.r.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, {ranks}"


@register_tuner
class LoHaModel(AdapterTuner):
    prefix = "hada_"
    config_cls = LoHaConfig
    layer_cls = LoHaLinear
    default_targets = LOHA_TARGET_MODULES
    method = "LoHa"
    wraps = "nn.Linear layers (as PEFT's LoHa: not GPT-2's Conv1D)"

    def _wrappable(self) -> tuple[type[nn.Module], ...]:
        return (nn.Linear,)

    def _layer_args(self, key: str, config: LoHaConfig) -> dict:
        return dict(r=pattern_value(key, config.rank_pattern, config.r),
                    alpha=pattern_value(key, config.alpha_pattern, config.alpha),
                    rank_dropout=config.rank_dropout, module_dropout=config.module_dropout,
                    init_weights=config.init_weights)

    def _create(self, key, module, config: LoHaConfig, adapter_name, adapter_dtype, prepared) -> LoHaLinear:
        return LoHaLinear(module, adapter_name, adapter_dtype=adapter_dtype, **self._layer_args(key, config))

    def _update(self, key, layer: LoHaLinear, config: LoHaConfig, adapter_name, prepared) -> None:
        dtype = layer.hada_w1_a[layer.adapters[0]].dtype
        layer.update_layer(adapter_name, adapter_dtype=dtype, **self._layer_args(key, config))
