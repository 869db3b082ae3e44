"""Adaption prompt (LLaMA-Adapter, Zhang et al. 2023) for the llama and mistral families.

The top ``adapter_layers`` attention modules are swapped for ``AdaptedAttention``, which holds the
original module (as ``.model``, PEFT's name) and ``adapter_len`` learned prompt vectors
(``adaption_prompt: [1, adapter_len, hidden]``) with a zero-initialised gate (``adaption_gate: [1]``).
Each query also attends, through the layer's own k/v projections, to the prompt alone::

    out = attn(x) + o_proj(gate * softmax(q k_p^T / sqrt(d)) v_p),   k_p = k_proj(prompt), v_p = v_proj(prompt)

with the rotary-embedded query q of the attention itself. The wrapper does not recompute q or call
o_proj again (PEFT does both): for the length of the wrapped forward, a hook on ``q_proj`` keeps its
output and a pre-hook on ``o_proj`` adds the adapter's attention output to o_proj's input, so the
sum goes through o_proj once. (With an o_proj bias PEFT adds the bias twice; that is reproduced.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from fastlora.config import PeftConfig, PeftType, register_config
from fastlora.injector.inject import replace_module

__all__ = ["AdaptionPromptConfig", "AdaptedAttention", "AdaptionPromptModel"]

# model_type -> the attention module's attribute name in each decoder layer (PEFT's defaults)
SUPPORTED_MODEL_TYPES = {"llama": "self_attn", "mistral": "self_attn"}


@register_config
@dataclass
class AdaptionPromptConfig(PeftConfig):
    """PEFT's ``AdaptionPromptConfig``: ``target_modules`` (the attention's attribute name; None takes
    the model type's), ``adapter_len`` prompt vectors in each of the top ``adapter_layers`` layers."""

    PEFT_TYPE: ClassVar[PeftType] = PeftType.ADAPTION_PROMPT

    target_modules: str | None = None
    adapter_len: int | None = None
    adapter_layers: int | None = None

    def __post_init__(self):
        super().__post_init__()
        for name in ("adapter_len", "adapter_layers"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")

    @property
    def is_adaption_prompt(self) -> bool:
        return True


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class AdaptedAttention(nn.Module):
    """A llama/mistral attention module plus an adaption prompt (see the module docstring)."""

    def __init__(self, attention: nn.Module, adapter_len: int, hidden_size: int):
        super().__init__()
        if isinstance(attention, AdaptedAttention):
            raise TypeError("an attention module can hold one adaption prompt at a time")
        self.model = attention
        weight = attention.q_proj.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self.adaption_prompt = nn.Parameter(torch.empty(1, adapter_len, hidden_size, device=weight.device,
                                                        dtype=dtype).normal_())
        self.adaption_gate = nn.Parameter(torch.zeros(1, device=weight.device, dtype=dtype))

    def forward(self, *args, **kwargs):
        position_embeddings = kwargs.get("position_embeddings")
        if position_embeddings is None:
            raise ValueError("AdaptedAttention needs the rotary position_embeddings the decoder layer passes")
        queries: list[torch.Tensor] = []
        q_handle = self.model.q_proj.register_forward_hook(lambda module, inputs, output: queries.append(output))

        def add_prompt_attention(module, inputs):
            (attn_output, *rest) = inputs  # [B, q, heads * head_dim]
            return (attn_output + self._prompt_attention(queries[-1], position_embeddings).to(attn_output.dtype),
                    *rest)

        o_handle = self.model.o_proj.register_forward_pre_hook(add_prompt_attention)
        try:
            output, *rest = self.model(*args, **kwargs)
        finally:
            q_handle.remove()
            o_handle.remove()
        if self.model.o_proj.bias is not None:
            output = output + self.model.o_proj.bias
        return (output, *rest)

    def _prompt_attention(self, query: torch.Tensor, position_embeddings) -> torch.Tensor:
        """query: [B, q, heads * d] (q_proj's output) -> [B, q, heads * d], the gated attention to the prompt."""
        attn = self.model
        head_dim = attn.head_dim
        heads = attn.config.num_attention_heads
        kv_heads = attn.config.num_key_value_heads
        groups = heads // kv_heads
        batch, q_len, _ = query.shape
        cos, sin = position_embeddings  # [B, q, d]
        q = query.view(batch, q_len, heads, head_dim)
        q = q * cos.unsqueeze(2) + _rotate_half(q) * sin.unsqueeze(2)
        q = q.view(batch, q_len, kv_heads, groups, head_dim).permute(0, 2, 3, 1, 4)  # [B, kv, g, q, d]
        prompt_len = self.adaption_prompt.shape[1]
        # [1, L, kv * d] -> keys [kv, 1, d, L], values [kv, 1, L, d]: broadcast over batch and group
        key = attn.k_proj(self.adaption_prompt).view(prompt_len, kv_heads, head_dim).permute(1, 2, 0).unsqueeze(1)
        value = attn.v_proj(self.adaption_prompt).view(prompt_len, kv_heads, head_dim).permute(1, 0, 2).unsqueeze(1)
        scores = torch.matmul(q, key.to(q.dtype)) / math.sqrt(head_dim)  # [B, kv, g, q, L]
        probs = self.adaption_gate * torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, value.to(probs.dtype))  # [B, kv, g, q, d]
        return out.permute(0, 3, 1, 2, 4).reshape(batch, q_len, heads * head_dim)


class AdaptionPromptModel(nn.Module):
    """The tuner (``peft_model.base_model``): ``.model`` is the transformers model. One adapter is in the
    model at a time; the others' wrappers wait outside it (PEFT's design, so names carry no adapter)."""

    prefix = "adaption_"

    def __init__(self, model: nn.Module, config: AdaptionPromptConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, AdaptionPromptConfig] = {}
        # adapter -> [(module key of the attention, its wrapper)]
        self._wrappers: dict[str, list[tuple[str, AdaptedAttention]]] = {}
        self.active_adapter: str | None = None
        self.enabled = True
        self.inject_adapter(config, adapter_name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @property
    def active_adapters(self) -> list[str]:
        return [] if self.active_adapter is None else [self.active_adapter]

    def _targets(self, config: AdaptionPromptConfig) -> list[tuple[str, nn.Module]]:
        model_type = getattr(self.model.config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"adaption prompt supports model types {sorted(SUPPORTED_MODEL_TYPES)}, "
                             f"not {model_type!r}")
        if config.adapter_len is None or config.adapter_layers is None:
            raise ValueError("AdaptionPromptConfig needs adapter_len and adapter_layers")
        target = config.target_modules or SUPPORTED_MODEL_TYPES[model_type]
        found = [(key, module) for key, module in self.model.named_modules()
                 if key.endswith(f".{target}") and not isinstance(module, AdaptedAttention)]
        found += [(key, m.model) for key, m in self.model.named_modules() if isinstance(m, AdaptedAttention)]
        found.sort(key=lambda item: _layer_order(self.model, item[0]))
        if len(found) < config.adapter_layers:
            raise ValueError(f"adapter_layers={config.adapter_layers}, but the model has {len(found)} "
                             f"'{target}' modules")
        config.target_modules = target
        return found[-config.adapter_layers:]

    def inject_adapter(self, config: AdaptionPromptConfig, adapter_name: str,
                       autocast_adapter_dtype: bool = True) -> None:
        """Build ``adapter_name``'s wrappers; the first adapter goes into the model, later ones wait."""
        if not isinstance(config, AdaptionPromptConfig):
            raise TypeError(f"AdaptionPromptModel takes an AdaptionPromptConfig, got {type(config).__name__}")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        targets = self._targets(config)  # raises before anything changes
        hidden = self.model.config.hidden_size
        wrappers = [(key, AdaptedAttention(attention, config.adapter_len, hidden)) for key, attention in targets]
        if config.inference_mode:  # a loaded adapter without is_trainable: frozen, as in PEFT from 0.22 on
            for _, wrapper in wrappers:
                wrapper.adaption_prompt.requires_grad_(False)
                wrapper.adaption_gate.requires_grad_(False)
        self.peft_config[adapter_name] = config
        self._wrappers[adapter_name] = wrappers
        for name, param in self.model.named_parameters():
            if not name.rpartition(".")[2].startswith(self.prefix):
                param.requires_grad_(False)
        if self.active_adapter is None:
            self.active_adapter = adapter_name
            if self.enabled:
                self._install(adapter_name)

    def _install(self, adapter_name: str) -> None:
        for key, wrapper in self._wrappers[adapter_name]:
            replace_module(self.model, key, wrapper)

    def _uninstall(self, adapter_name: str) -> None:
        for key, wrapper in self._wrappers[adapter_name]:
            replace_module(self.model, key, wrapper.model)

    def set_adapter(self, adapter_name: str | Iterable[str]) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) != 1 or names[0] not in self.peft_config:
            raise ValueError(f"set_adapter takes one of {sorted(self.peft_config)}, got {adapter_name!r}")
        if names[0] == self.active_adapter:
            return
        if self.enabled:
            self._uninstall(self.active_adapter)
            self._install(names[0])
        self.active_adapter = names[0]

    def enable_adapter_layers(self) -> None:
        if not self.enabled and self.active_adapter is not None:
            self._install(self.active_adapter)
        self.enabled = True

    def disable_adapter_layers(self) -> None:
        if self.enabled and self.active_adapter is not None:
            self._uninstall(self.active_adapter)
        self.enabled = False

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {sorted(self.peft_config)}")
        if adapter_name == self.active_adapter:
            if self.enabled:
                self._uninstall(adapter_name)
            remaining = [n for n in self.peft_config if n != adapter_name]
            self.active_adapter = remaining[0] if remaining else None
            if self.active_adapter is not None and self.enabled:
                self._install(self.active_adapter)
        del self.peft_config[adapter_name]
        del self._wrappers[adapter_name]

    # ---- checkpoints (hooks called by fastlora.checkpoint) -----------------------------------------
    def _saved_params(self, adapter_name: str) -> dict[str, nn.Parameter]:
        # keys as PEFT writes them: the parameter's name in the PeftModel with the adapter in the model
        out = {}
        for key, wrapper in self._wrappers[adapter_name]:
            for name in ("adaption_prompt", "adaption_gate"):
                out[f"base_model.model.{key}.{name}"] = getattr(wrapper, name)
        return out

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {key: param.detach() for key, param in self._saved_params(adapter_name).items()}

    def adapter_state_loader(self, state: dict[str, torch.Tensor], adapter_name: str) -> Callable[[], None]:
        params = self._saved_params(adapter_name)
        unexpected, missing = sorted(set(state) - set(params)), sorted(set(params) - set(state))
        if unexpected or missing:
            raise ValueError(f"adapter {adapter_name!r}: the checkpoint does not fit this model's adaption prompt "
                             f"(unexpected {unexpected[:4]}, missing {missing[:4]})")
        for key, param in params.items():
            if tuple(state[key].shape) != tuple(param.shape):
                raise ValueError(f"adapter {adapter_name!r} does not fit the base model: {key} should be "
                                 f"{tuple(param.shape)} but the checkpoint has {tuple(state[key].shape)}")

        @torch.no_grad()
        def load() -> None:
            for key, param in params.items():
                param.copy_(state[key].to(param.dtype))

        return load


def _layer_order(model: nn.Module, key: str) -> tuple:
    return tuple(int(part) if part.isdigit() else -1 for part in key.split("."))
