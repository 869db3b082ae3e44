"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form, ``dW = B diag(E) A * lora_alpha / ranknum``, whose rank
budget a ``RankAllocator`` prunes from ``init_r`` towards ``target_r`` per layer during training.

PEFT's names and formats: ``lora_A`` ``[r, in]``, ``lora_B`` ``[out, r]``, ``lora_E`` ``[r, 1]`` and the
frozen ``ranknum`` (``init_r``) per adapter; saved as ``...lora_A`` etc. with only the ranks the allocator
kept (``rank_pattern`` in the config: one keep-flag per rank, keys without the adapter name); ``ranknum``
is not saved. The forward is a LoRA update with ``A' = E * A``, so it runs through
``fastlora.ops.lora_linear`` (the fused kernels on GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from fastlora._warn import warn
from fastlora.config import LoraConfig, PeftType, register_config
from fastlora.injector.inject import fit_fan_in_fan_out, iter_modules
from fastlora.injector.targets import ADALORA_TARGET_MODULES
from fastlora.injector.tuner import AdapterTuner, register_tuner
from fastlora.layers import AdapterLayer
from fastlora.ops import lora_linear

__all__ = ["AdaLoraConfig", "SVDLinear", "RankAllocator", "AdaLoraModel"]

# PEFT divides by ``ranknum + 1e-5``; the same constant keeps outputs equal.
_RANKNUM_EPS = 1e-5


@register_config
@dataclass
class AdaLoraConfig(LoraConfig):
    """PEFT's ``AdaLoraConfig``: LoraConfig's fields (``r`` unused: ``init_r`` is the starting rank) plus the
    budget schedule. Ranks stay at ``init_r`` for ``tinit`` steps, fall (cubically) to an average of
    ``target_r`` per layer until step ``total_step - tfinal``, reallocated every ``deltaT`` steps, and
    stay fixed for the last ``tfinal`` steps."""

    PEFT_TYPE: ClassVar[PeftType] = PeftType.ADALORA

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None

    def __post_init__(self):
        rank_pattern, self.rank_pattern = self.rank_pattern, {}  # LoRA's rank_pattern is ints; this one is masks
        super().__post_init__()
        self.rank_pattern = None if rank_pattern is None else _check_rank_pattern(rank_pattern)
        for name in ("init_r", "target_r", "deltaT"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r}): AdaLoRA only prunes")
        if self.total_step is None or isinstance(self.total_step, bool) or not isinstance(self.total_step, int) \
                or self.total_step <= 0:
            raise ValueError(f"AdaLoRA needs total_step, the number of training steps (> 0), got {self.total_step!r}")
        if self.tinit < 0 or self.tfinal < 0:
            raise ValueError(f"tinit and tfinal must be >= 0, got {self.tinit} and {self.tfinal}")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"the schedule leaves no budgeting phase: tinit ({self.tinit}) must be < total_step - tfinal "
                f"({self.total_step} - {self.tfinal}); decrease tinit/tfinal or increase total_step"
            )
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if self.r != 8:
            warn("AdaLoRA does not use r (its starting rank is init_r); r is ignored")
        if self.alpha_pattern:
            warn("AdaLoRA does not use alpha_pattern (as in PEFT); it is ignored")


def _check_rank_pattern(pattern: dict) -> dict[str, list[bool]]:
    if not isinstance(pattern, dict):
        raise ValueError(f"AdaLoRA's rank_pattern maps layer names to keep-flags per rank, got {pattern!r}")
    checked = {}
    for key, flags in pattern.items():
        if isinstance(flags, torch.Tensor):
            flags = flags.reshape(-1).tolist()
        if not isinstance(flags, (list, tuple)) or not all(isinstance(f, (bool, int)) for f in flags):
            raise ValueError(f"rank_pattern[{key!r}] must be a list of keep-flags (bools), got {flags!r}")
        checked[key] = [bool(f) for f in flags]
    return checked


class SVDLinear(AdapterLayer):
    """AdaLoRA around a linear ``base_layer`` (``nn.Linear``, or ``[in, out]`` with ``fan_in_fan_out``)."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_E")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "ranknum")

    def __init__(self, base_layer: nn.Module, adapter_name: str = "default", r: int = 12, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, init_lora_weights: bool | str = True, fan_in_fan_out: bool = False,
                 adapter_dtype: torch.dtype | None = torch.float32):
        super().__init__(base_layer, adapter_name, fan_in_fan_out)
        # Registration order gives PEFT's state-dict order: lora_A, lora_B, lora_E, ranknum.
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_E = nn.ParameterDict()
        self.ranknum = nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self._rank_scale: dict[str, tuple[tuple[int, int], float]] = {}
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, adapter_dtype)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights: bool | str = True, adapter_dtype: torch.dtype | None = torch.float32,
                     ranknum: float | None = None) -> None:
        """Add (or replace) ``adapter_name`` with rank ``r`` (0 allowed: a layer pruned to nothing)."""
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"r must be an int >= 0, got {r!r}")
        weight = self.base_layer.weight
        kwargs = dict(device=weight.device, dtype=self._adapter_dtype(adapter_dtype))
        self.lora_A[adapter_name] = nn.Parameter(torch.randn(r, self.in_features, **kwargs))
        self.lora_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r, **kwargs))
        self.lora_E[adapter_name] = nn.Parameter(torch.randn(r, 1, **kwargs))
        # Frozen, not saved: scaling divides by it, and it stays init_r when a pruned adapter is loaded.
        self.ranknum[adapter_name] = nn.Parameter(
            torch.full((1,), float(r if ranknum is None else ranknum), **kwargs), requires_grad=False)
        dropout = nn.Dropout(lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self.lora_dropout[adapter_name] = dropout.train(self.training)  # the layer's mode (see LoraLinear)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha if lora_alpha > 0 else float(r)
        if init_lora_weights:
            with torch.no_grad():  # PEFT's: E = 0 (no update at first), A and B small Gaussians
                nn.init.zeros_(self.lora_E[adapter_name])
                nn.init.normal_(self.lora_A[adapter_name], mean=0.0, std=0.02)
                nn.init.normal_(self.lora_B[adapter_name], mean=0.0, std=0.02)
        self.set_adapter(self._active_adapters)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._rank_scale.pop(adapter_name, None)

    def _scale(self, name: str) -> float:
        """``scaling / (ranknum + eps)`` as a Python float, read from ``ranknum`` again only when it changed
        (its version counter moves on every in-place write, e.g. a checkpoint load): no device sync per call."""
        ranknum = self.ranknum[name]
        key = (ranknum.data_ptr(), ranknum._version)
        cached = self._rank_scale.get(name)
        if cached is None or cached[0] != key:
            cached = (key, self.scaling[name] / (float(ranknum) + _RANKNUM_EPS))
            self._rank_scale[name] = cached
        return cached[1]

    def _dropout_p(self, name: str) -> float:
        module = self.lora_dropout[name]
        return module.p if isinstance(module, nn.Dropout) else 0.0

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = [name for name in self._active() if self.r[name] > 0]
        if self._disable_adapters or self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        first, *rest = active
        a = self.lora_A[first] * self.lora_E[first]  # [r, in] * [r, 1]: E folded into A
        y = lora_linear(x, self._base_weight(), self.base_layer.bias, a, self.lora_B[first], self._scale(first),
                        self._dropout_p(first), self.lora_dropout[first].training)  # its own mode, as in PEFT
        for name in rest:  # several adapters at once: rare, plain PyTorch
            a = self.lora_A[name] * self.lora_E[name]
            xd = self.lora_dropout[name](x).to(a.dtype)
            y = y + (self._scale(name) * (xd @ a.t() @ self.lora_B[name].t())).to(y.dtype)
        return y

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        a = self.lora_A[adapter_name].float() * self.lora_E[adapter_name].float()
        return (self.lora_B[adapter_name].float() @ a) * self._scale(adapter_name)  # [out, in]

    @torch.no_grad()
    def keep_ranks(self, adapter_name: str, keep: list[bool]) -> None:
        """Shrink ``adapter_name`` to the ranks flagged in ``keep`` (``ranknum`` and so the scaling unchanged)."""
        index = torch.tensor(keep, dtype=torch.bool, device=self.lora_A[adapter_name].device)
        a, b, e = (t.detach().clone() for t in (self.lora_A[adapter_name], self.lora_B[adapter_name],
                                                   self.lora_E[adapter_name]))
        ranknum = float(self.ranknum[adapter_name])
        trainable = self.lora_A[adapter_name].requires_grad
        self.update_layer(adapter_name, int(index.sum()), self.lora_alpha[adapter_name], self._dropout_p(adapter_name),
                          False, a.dtype, ranknum=ranknum)
        self.lora_A[adapter_name].copy_(a[index])
        self.lora_B[adapter_name].copy_(b[:, index])
        self.lora_E[adapter_name].copy_(e[index])
        for table in self.adapter_layer_names:
            getattr(self, table)[adapter_name].requires_grad_(trainable)

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{name}: r={r}" for name, r in self.r.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, {ranks}"


class RankAllocator:
    """AdaLoRA's budget: importance of each singular triplet ``(A[i], E[i], B[:, i])`` from smoothed
    sensitivity ``|p * grad|`` (EMA ``beta1``) times its uncertainty (EMA ``beta2``); the least important
    triplets beyond the step's budget get ``E[i] = 0``."""

    def __init__(self, layers: dict[str, SVDLinear], config: AdaLoraConfig, adapter_name: str):
        self.config = config
        self.adapter_name = adapter_name
        self.layers = layers  # layer key (relative to the transformers model) -> SVDLinear
        self.init_budget = sum(layer.r[adapter_name] for layer in layers.values())
        self.target_budget = config.target_r * len(layers)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """``(budget, whether to mask this step)``."""
        c = self.config
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        remaining = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * remaining ** 3 + self.target_budget)
        return budget, step % c.deltaT == 0

    @torch.no_grad()
    def update_ipt(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for key, layer in self.layers.items():
            for table in SVDLinear.adapter_layer_names:
                param = getattr(layer, table)[self.adapter_name]
                if param.grad is None:
                    raise RuntimeError(
                        f"update_and_allocate needs the gradients of {key}.{table}: call it after loss.backward() "
                        f"and before optimizer.zero_grad()"
                    )
                ipt = (param * param.grad).abs()
                avg = self.exp_avg_ipt.get((key, table))
                if avg is None:
                    avg, unc = torch.zeros_like(ipt), torch.zeros_like(ipt)
                else:
                    unc = self.exp_avg_unc[(key, table)]
                avg = b1 * avg + (1 - b1) * ipt
                self.exp_avg_ipt[(key, table)] = avg
                self.exp_avg_unc[(key, table)] = b2 * unc + (1 - b2) * (ipt - avg).abs()

    def _triplet_scores(self) -> dict[str, torch.Tensor]:
        """Per layer, one score per rank: E's own plus the mean over A's row and over B's column."""
        scores = {}
        for key in self.layers:
            s = {t: self.exp_avg_ipt[(key, t)] * self.exp_avg_unc[(key, t)] for t in SVDLinear.adapter_layer_names}
            scores[key] = s["lora_E"].reshape(-1) + s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)
        return scores

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        scores = self._triplet_scores()
        pruned = self.init_budget - budget
        everything = torch.cat([s for s in scores.values()])
        threshold = torch.kthvalue(everything, k=pruned).values if pruned > 0 else None
        pattern = {}
        for key, score in scores.items():
            keep = score > threshold if threshold is not None else torch.ones_like(score, dtype=torch.bool)
            self.layers[key].lora_E[self.adapter_name].masked_fill_(~keep[:, None], 0.0)
            pattern[f"{key}.lora_E"] = keep.tolist()
        return pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self, rank_pattern: dict[str, list[bool]]) -> None:
        for key, layer in self.layers.items():
            keep = _pattern_for(rank_pattern, key, self.adapter_name)
            if keep is not None:
                e = layer.lora_E[self.adapter_name]
                e.masked_fill_(~torch.tensor(keep, dtype=torch.bool, device=e.device)[:, None], 0.0)

    def update_and_allocate(self, step: int, force_mask: bool = False) -> tuple[int, dict | None]:
        if step < self.config.total_step - self.config.tfinal:
            self.update_ipt()
        budget, mask = self.budget_schedule(step)
        return budget, (self.mask_to_budget(budget) if mask or force_mask else None)


def _pattern_for(rank_pattern: dict, key: str, adapter_name: str) -> list[bool] | None:
    """The keep-flags for layer ``key``: keys are ``<layer>.lora_E``, or PEFT's in-memory ``<layer>.lora_E.<name>``."""
    return rank_pattern.get(f"{key}.lora_E", rank_pattern.get(f"{key}.lora_E.{adapter_name}"))


@register_tuner
class AdaLoraModel(AdapterTuner):
    """PEFT's ``AdaLoraModel``: call ``update_and_allocate(step)`` after each optimizer step (before
    ``zero_grad``); in training the orthogonality penalty on A and B is added to ``outputs.loss``."""

    prefix = "lora_"
    config_cls = AdaLoraConfig
    layer_cls = SVDLinear
    default_targets = ADALORA_TARGET_MODULES
    method = "AdaLoRA"

    def __init__(self, model: nn.Module, config: AdaLoraConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True):
        super().__init__(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        self.trainable_adapter_name: str | None = None
        self.rankallocator: RankAllocator | None = None
        if not config.inference_mode:
            self.trainable_adapter_name = adapter_name
            self.rankallocator = RankAllocator(self._svd_layers(adapter_name), config, adapter_name)

    def _check_new_adapter(self, config: AdaLoraConfig) -> None:
        super()._check_new_adapter(config)
        if not config.inference_mode and any(not c.inference_mode for c in self.peft_config.values()):
            raise ValueError(
                "AdaLoRA trains one adapter at a time: add further adapters with inference_mode=True"
            )

    def _svd_layers(self, adapter_name: str) -> dict[str, SVDLinear]:
        return {key: m for key, m in iter_modules(self.model) if isinstance(m, SVDLinear) and adapter_name in m.r}

    def _layer_args(self, config: AdaLoraConfig) -> dict[str, Any]:
        return dict(r=config.init_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                    init_lora_weights=config.init_lora_weights)

    def _create(self, key, module, config: AdaLoraConfig, adapter_name, adapter_dtype, prepared) -> SVDLinear:
        return SVDLinear(module, adapter_name, fan_in_fan_out=fit_fan_in_fan_out(module, config, key),
                         adapter_dtype=adapter_dtype, **self._layer_args(config))

    def _update(self, key, layer: SVDLinear, config: AdaLoraConfig, adapter_name, prepared) -> None:
        dtype = layer.lora_A[layer.adapters[0]].dtype
        layer.update_layer(adapter_name, adapter_dtype=dtype, **self._layer_args(config))

    # ---- training ---------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        outputs = super().forward(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        name = self.trainable_adapter_name
        config = self.peft_config.get(name) if name is not None else None
        if isinstance(loss, torch.Tensor) and config is not None and config.orth_reg_weight > 0:
            outputs.loss = loss + config.orth_reg_weight * self._orthogonal_penalty(name)
        return outputs

    def _orthogonal_penalty(self, adapter_name: str) -> torch.Tensor | float:
        """Mean over the adapter's A and B of ``||A A^T - I||_F`` and ``||B^T B - I||_F`` (PEFT's regulariser)."""
        terms = []
        for layer in self._svd_layers(adapter_name).values():
            a, b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
            for gram in (a @ a.t(), b.t() @ b):  # [r, r]
                eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
                terms.append(torch.linalg.matrix_norm(gram - eye))
        return torch.stack(terms).mean() if terms else 0.0

    def update_and_allocate(self, global_step: int) -> None:
        """Update the importance scores and, on the schedule's steps, prune ranks to the current budget;
        the last pattern is kept in ``peft_config[name].rank_pattern`` (and saved with the adapter)."""
        if self.rankallocator is None:
            raise ValueError("update_and_allocate needs a trainable AdaLoRA adapter (this one is inference_mode)")
        config = self.peft_config[self.trainable_adapter_name]
        final = config.total_step - config.tfinal
        if global_step < final:
            _, pattern = self.rankallocator.update_and_allocate(global_step)
            if pattern:
                config.rank_pattern = pattern
        elif global_step == final:
            _, config.rank_pattern = self.rankallocator.update_and_allocate(global_step, force_mask=True)
            self.rankallocator.reset_ipt()
        elif config.rank_pattern:
            self.rankallocator.mask_using_rank_pattern(config.rank_pattern)

    # ---- checkpoints: only the allocated ranks are saved ---------------------------------------------
    def _pattern_layers(self, adapter_name: str) -> list[tuple[str, SVDLinear, list[bool]]]:
        pattern = self.peft_config[adapter_name].rank_pattern or {}
        found = []
        for key, layer in self._svd_layers(adapter_name).items():
            keep = _pattern_for(pattern, key, adapter_name)
            if keep is not None:
                if len(keep) != layer.r[adapter_name] and layer.r[adapter_name] != sum(keep):
                    raise ValueError(f"rank_pattern for {key} has {len(keep)} flags but the layer has rank "
                                     f"{layer.r[adapter_name]}")
                found.append((key, layer, keep))
        return found

    def adapter_state_to_save(self, state: dict[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
        state = dict(state)
        for key, layer, keep in self._pattern_layers(adapter_name):
            if len(keep) != layer.r[adapter_name]:
                continue  # already shrunk (a loaded adapter)
            for saved_key in [k for k in state if _tensor_of(k, key)]:
                table = saved_key.rpartition(".")[2]
                index = torch.tensor(keep, dtype=torch.bool, device=state[saved_key].device)
                state[saved_key] = state[saved_key][:, index] if table == "lora_B" else state[saved_key][index]
        return state

    def adapter_state_to_load(self, state: dict[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
        # Older PEFT versions saved ranknum; it is init_r, which the layers already hold.
        state = {k: v for k, v in state.items() if k.rpartition(".")[2] != "ranknum"}
        config = self.peft_config[adapter_name]
        for _, layer, keep in self._pattern_layers(adapter_name):
            if len(keep) == layer.r[adapter_name] and sum(keep) != len(keep):
                layer.keep_ranks(adapter_name, keep)
                if config.inference_mode:
                    for table in SVDLinear.adapter_layer_names:
                        getattr(layer, table)[adapter_name].requires_grad_(False)
        return state


def _tensor_of(saved_key: str, layer_key: str) -> bool:
    """Whether on-disk key ``saved_key`` is lora_A/B/E of the layer at ``layer_key`` (under any wrapper prefix)."""
    module, _, table = saved_key.rpartition(".")
    return table in SVDLinear.adapter_layer_names and (module == layer_key or module.endswith("." + layer_key))
