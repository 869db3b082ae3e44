"""``LoraModel.add_weighted_adapter``: a new LoRA adapter made from weighted existing ones (PEFT's).

Three of PEFT's combinations, computed as PEFT computes them so that the same adapters give the same new
one:
- ``"linear"`` (equal ranks): A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i, B = sum_i sqrt|w_i s_i| B_i, with
  s_i adapter i's scaling. Not the weighted sum of the updates B_i A_i (that is ``"svd"``), but cheap and
  of the same rank.
- ``"cat"``: the A_i (times w_i s_i) stacked and the B_i side by side: exactly the weighted sum of the
  updates, at the sum of the ranks.
- ``"svd"`` (default): the weighted sum of the updates, truncated to ``svd_rank`` (default: the largest
  rank) by a singular value decomposition; ``svd_clamp`` clips the factors at that quantile of their
  entries.

The new adapter has ``lora_alpha = r`` (scaling 1), targets what any of its sources targets, starts
frozen and inactive, and saves and loads like any other. Where a layer lacks some sources, only those it
holds contribute there. PEFT's pruning combinations (ties, dare, magnitude_prune) are not implemented.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from fastlora.layers import LoraLinear, ModulesToSaveWrapper

__all__ = ["COMBINATIONS", "add_weighted_adapter"]

COMBINATIONS = ("svd", "linear", "cat")
_NOT_IMPLEMENTED = ("ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
                    "magnitude_prune", "magnitude_prune_svd")


def _max_rank(config) -> int:
    return max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r


def _new_config(tuner, adapters: list[str], combination: str, svd_rank: int | None):
    """The combined adapter's config (every check before anything changes)."""
    configs = [tuner.peft_config[name] for name in adapters]
    ranks = [_max_rank(config) for config in configs]
    if combination == "linear":
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type='linear' needs adapters of one rank, got ranks {ranks}; "
                             f"'cat' or 'svd' combine different ranks")
        rank = ranks[0]
    elif combination == "cat":
        rank = sum(ranks)
    else:
        if svd_rank is not None and svd_rank <= 0:
            raise ValueError(f"svd_rank must be > 0, got {svd_rank}")
        rank = svd_rank or max(ranks)
    targets = [config.target_modules for config in configs]
    if any(t is None for t in targets) or len({isinstance(t, str) for t in targets}) > 1:
        raise ValueError("add_weighted_adapter needs target_modules given alike in every adapter, all as lists or "
                         "all as a regex string")
    if isinstance(targets[0], str):
        target_modules = "|".join(f"({t})" for t in targets)
    else:
        target_modules = sorted(set().union(*targets))
    return dataclasses.replace(configs[0], r=rank, lora_alpha=rank, use_rslora=False, target_modules=target_modules,
                               alpha_pattern={}, rank_pattern={})


def add_weighted_adapter(tuner, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                         svd_full_matrices: bool = True, svd_driver: str | None = None, density: float | None = None,
                         majority_sign_method: str = "total") -> None:
    """Add ``adapter_name`` to ``tuner`` (a ``LoraModel``) from ``adapters`` weighted by ``weights``."""
    if combination_type in _NOT_IMPLEMENTED:
        raise NotImplementedError(f"combination_type={combination_type!r} is not implemented in fastlora; "
                                  f"one of {', '.join(COMBINATIONS)}")
    if combination_type not in COMBINATIONS:
        raise ValueError(f"unknown combination_type {combination_type!r}; one of {', '.join(COMBINATIONS)}")
    adapters, weights = list(adapters), [float(w) for w in weights]
    if not adapters or len(adapters) != len(weights):
        raise ValueError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
    tuner._check_names(adapters)
    if adapter_name in tuner.peft_config:  # PEFT returns without a word
        raise ValueError(f"adapter {adapter_name!r} already exists")
    if svd_clamp is not None and not 0.0 < svd_clamp <= 1.0:
        raise ValueError(f"svd_clamp is a quantile in (0, 1], got {svd_clamp}")
    for key, wrapper in ((k, m) for k, m in tuner.model.named_modules() if isinstance(m, ModulesToSaveWrapper)):
        if sum(name in wrapper.modules_to_save for name in adapters) > 1:
            raise ValueError(f"cannot combine adapters that each keep their own copy of {key} (modules_to_save)")
    combination = "linear" if len(adapters) == 1 else combination_type
    tuner.inject_adapter(_new_config(tuner, adapters, combination, svd_rank), adapter_name)
    tuner._freeze_adapter(adapter_name)
    try:
        with torch.no_grad():
            for module in tuner.model.modules():
                if isinstance(module, LoraLinear) and adapter_name in module.lora_A:
                    held = [(name, w) for name, w in zip(adapters, weights) if name in module.lora_A]
                    if held:
                        _combine(module, adapter_name, held, combination, svd_clamp, svd_full_matrices, svd_driver)
    except BaseException:  # an SVD that fails, an interrupt: no half-made adapter stays behind
        tuner.delete_adapter(adapter_name)
        raise


def _combine(layer: LoraLinear, new: str, held: list[tuple[str, float]], combination: str, clamp, full_matrices,
             driver) -> None:
    a_new, b_new = layer.lora_A[new].weight, layer.lora_B[new].weight
    if combination == "cat":
        a = torch.cat([layer.lora_A[name].weight * w * layer.scaling[name] for name, w in held], dim=0)
        b = torch.cat([layer.lora_B[name].weight for name, w in held], dim=1)
    elif combination == "linear":
        scaled = [w * layer.scaling[name] for name, w in held]
        a = _weighted_sum([layer.lora_A[name].weight for name, _ in held],
                          [math.sqrt(abs(s)) * (1 if s >= 0 else -1) for s in scaled])
        b = _weighted_sum([layer.lora_B[name].weight for name, _ in held], [math.sqrt(abs(s)) for s in scaled])
    else:
        delta = _weighted_sum([layer.get_delta_weight(name) for name, _ in held], [w for _, w in held])
        if layer.fan_in_fan_out:
            delta = delta.t()  # back to [out, in]
        u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
        rank = a_new.shape[0]
        b, a = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank, :]
        if clamp is not None:
            high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
            b, a = b.clamp(-high, high), a.clamp(-high, high)
    a_new.zero_()
    b_new.zero_()
    a_new[: a.shape[0]].copy_(a)
    b_new[:, : b.shape[1]].copy_(b)


def _weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_i w_i t_i, as PEFT's task arithmetic computes it (one stacked multiply, one sum, fp32 weights)."""
    stacked = torch.stack(tensors, dim=0)
    w = torch.tensor(weights, device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    return (stacked * w).sum(dim=0).to(tensors[0].dtype)

