"""``LoraModel.add_weighted_adapter``: a new LoRA adapter made from weighted existing ones (PEFT's).

Every one of PEFT's combinations, computed as PEFT computes them so that the same adapters (and, for the
random ``dare`` ones, the same ``torch.manual_seed``) give the same new adapter. With s_i adapter i's
scaling and w_i its weight:
- ``"cat"``: the A_i (times w_i s_i) stacked and the B_i side by side: exactly the weighted sum of the
  updates, at the sum of the ranks.
- ``"svd"`` (default): the weighted sum of the updates B_i A_i s_i, truncated to ``svd_rank`` (default: the
  largest rank) by a singular value decomposition; ``svd_clamp`` clips the factors at that quantile of
  their entries.
- ``"linear"`` (equal ranks): A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i, B = sum_i sqrt|w_i s_i| B_i. Not
  the weighted sum of the updates (that is ``"svd"``), but cheap and of the same rank.
- ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``: like ``"linear"``, on the A_i and on
  the B_i, after pruning each to a fraction ``density`` of its entries, by magnitude (ties, magnitude_prune)
  or at random, rescaled by 1 / density (dare). The ties variants then keep, entry by entry, only the
  sources whose sign agrees with the majority (``majority_sign_method``: "total", the sign of the sum, or
  "frequency", the commoner sign) and average those.
- ``"<one of those>_svd"``: the same rule on the updates B_i A_i s_i, then truncated as ``"svd"`` is.

The new adapter has ``lora_alpha = r`` (scaling 1), targets what any of its sources targets, starts
frozen and inactive, and saves and loads like any other. Where a layer lacks some sources, only those it
holds contribute there.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from fastlora.layers import LoraLinear, ModulesToSaveWrapper

__all__ = ["COMBINATIONS", "add_weighted_adapter"]

# rule -> (pruning, sign election)
_RULES = {"linear": (None, False), "magnitude_prune": ("magnitude", False), "ties": ("magnitude", True),
          "dare_linear": ("random", False), "dare_ties": ("random", True)}
COMBINATIONS = ("svd", "cat", *_RULES, *(f"{rule}_svd" for rule in _RULES if rule != "linear"))


def _rule(combination: str) -> tuple[str, bool]:
    """(the mixing rule, whether the result is factored by SVD) of a combination other than "cat"."""
    if combination == "svd":
        return "linear", True
    if combination.endswith("_svd"):
        return combination.removesuffix("_svd"), True
    return combination, False


def _max_rank(config) -> int:
    return max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r


def _new_config(tuner, adapters: list[str], combination: str, svd_rank: int | None):
    """The combined adapter's config (every check before anything changes)."""
    configs = [tuner.peft_config[name] for name in adapters]
    ranks = [_max_rank(config) for config in configs]
    if combination == "cat":
        rank = sum(ranks)
    elif not _rule(combination)[1]:
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type={combination!r} needs adapters of one rank, got ranks {ranks}; "
                             f"'cat' or an svd combination combine different ranks")
        rank = ranks[0]
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
    if combination_type not in COMBINATIONS:
        raise ValueError(f"unknown combination_type {combination_type!r}; one of {', '.join(COMBINATIONS)}")
    if combination_type != "cat" and _RULES[_rule(combination_type)[0]][0] is not None:
        if density is None or not 0.0 <= density <= 1.0:
            raise ValueError(f"combination_type={combination_type!r} prunes: give density, the fraction of entries "
                             f"kept, in [0, 1] (got {density!r})")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
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
                        _combine(module, adapter_name, held, combination, density, majority_sign_method,
                                 svd_clamp, svd_full_matrices, svd_driver)
                    else:  # targeted only by the union of targets (say, other layers_to_transform): no update
                        module.lora_A[adapter_name].weight.zero_()
                        module.lora_B[adapter_name].weight.zero_()
    except BaseException:  # an SVD that fails, an interrupt: no half-made adapter stays behind
        tuner.delete_adapter(adapter_name)
        raise


def _combine(layer: LoraLinear, new: str, held: list[tuple[str, float]], combination: str, density, sign_method,
             clamp, full_matrices, driver) -> None:
    a_new, b_new = layer.lora_A[new].weight, layer.lora_B[new].weight
    if combination == "cat":
        a = torch.cat([layer.lora_A[name].weight * w * layer.scaling[name] for name, w in held], dim=0)
        b = torch.cat([layer.lora_B[name].weight for name, w in held], dim=1)
    else:
        rule, factored = _rule(combination)
        mix = lambda tensors, weights: _mix(tensors, weights, rule, density, sign_method)  # noqa: E731
        if factored:
            delta = mix([layer.get_delta_weight(name) for name, _ in held], [w for _, w in held])
            b, a = _factor(delta.t() if layer.fan_in_fan_out else delta, a_new.shape[0], clamp, full_matrices, driver)
        else:
            scaled = [w * layer.scaling[name] for name, w in held]
            a = mix([layer.lora_A[name].weight for name, _ in held],
                    [math.sqrt(abs(s)) * (1 if s >= 0 else -1) for s in scaled])
            b = mix([layer.lora_B[name].weight for name, _ in held], [math.sqrt(abs(s)) for s in scaled])
    a_new.zero_()
    b_new.zero_()
    a_new[: a.shape[0]].copy_(a)
    b_new[:, : b.shape[1]].copy_(b)


def _factor(delta: torch.Tensor, rank: int, clamp, full_matrices, driver) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of rank ``rank`` from ``delta`` [out, in]: B = U S, A = V^T, clipped at the ``clamp`` quantile."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    b, a = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    return b, a


def _mix(tensors: list[torch.Tensor], weights: list[float], rule: str, density, sign_method) -> torch.Tensor:
    """The weighted combination of ``tensors`` by ``rule`` (module docstring), in PEFT's order of operations
    (one stacked multiply and sum, fp32 weights; pruned tensors drawn in order)."""
    pruning, elect = _RULES[rule]
    if pruning is not None and density < 1.0:  # density 1 keeps everything (PEFT: with a warning)
        tensors = [_keep_largest(t, density) if pruning == "magnitude" else _keep_random(t, density)
                   for t in tensors]
    stacked = torch.stack(tensors, dim=0)
    w = torch.tensor(weights, device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    weighted = stacked * w
    if not elect:
        return weighted.sum(dim=0).to(tensors[0].dtype)
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if sign_method == "total" else signs.sum(dim=0)
    agree = signs == torch.where(votes >= 0, 1, -1)
    return ((weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1.0)).to(tensors[0].dtype)


def _keep_largest(t: torch.Tensor, density: float) -> torch.Tensor:
    """``t`` with all but its ``int(density * numel)`` largest-magnitude entries zeroed."""
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True).indices] = 1
    return t * keep.view(t.shape)


def _keep_random(t: torch.Tensor, density: float) -> torch.Tensor:
    """``t`` with each entry kept with probability ``density`` (torch's generator), rescaled by 1 / density."""
    return t * torch.bernoulli(torch.full_like(t, density)) / density
