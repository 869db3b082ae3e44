"""Prefix tuning (Li & Liang 2021): trainable keys and values in front of every attention layer's own.

``PrefixEncoder`` produces ``[num_virtual_tokens, num_layers x 2 x token_dim]``: for each layer a key
and a value row per virtual token, ``token_dim = kv_heads x head_dim`` (with grouped-query attention
the prefix is as narrow as the model's keys, as PEFT sizes it). With ``prefix_projection`` the rows
come out of a two-layer MLP over ``[num_virtual_tokens, token_dim]`` embeddings (what is saved is the
MLP's output). The prefix reaches the model as a transformers ``DynamicCache`` (``EncoderDecoderCache``
for encoder-decoder models) passed as ``past_key_values``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from fastlora.config import PeftType, register_config
from fastlora.methods.prompt_learning import (
    PROMPT_ENCODERS,
    PromptLearningConfig,
    VirtualTokenEncoder,
    _first_attr,
    _text_config,
)

__all__ = ["PrefixTuningConfig", "PrefixEncoder", "build_prefix_cache"]


@register_config
@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """PEFT's ``PrefixTuningConfig``."""

    PEFT_TYPE: ClassVar[PeftType] = PeftType.PREFIX_TUNING

    init_weights: Literal["zero"] | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {self.init_weights!r}")
        if self.encoder_hidden_size is not None and (not isinstance(self.encoder_hidden_size, int)
                                                     or self.encoder_hidden_size < 1):
            raise ValueError(f"encoder_hidden_size must be a positive int, got {self.encoder_hidden_size!r}")


def kv_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the model's attention, from its config."""
    text = _text_config(model)
    layers = _first_attr(text, ("num_hidden_layers", "num_layers", "n_layer"))
    heads = _first_attr(text, ("num_attention_heads", "n_head", "num_heads"))
    kv_heads = _first_attr(text, ("num_key_value_heads",)) or heads
    head_dim = _first_attr(text, ("head_dim", "d_kv"))
    if head_dim is None:
        head_dim = _first_attr(text, ("hidden_size", "n_embd", "d_model")) // heads
    return layers, kv_heads, head_dim


def fit_to_model(config: PrefixTuningConfig, model: nn.Module) -> None:
    """PEFT's sizing for grouped-query attention (the prefix is kv_heads x head_dim wide, whatever the
    config said), then a check that the sizes fit the model's attention, before anything is built."""
    text = _text_config(model)
    if getattr(text, "num_key_value_heads", None) is not None:
        _, kv_heads, head_dim = kv_shape(model)
        config.token_dim, config.num_attention_heads = kv_heads * head_dim, kv_heads
    if getattr(text, "model_type", None) in ("bloom", "gpt_bigcode"):
        raise NotImplementedError(f"prefix tuning for model_type {text.model_type!r} (a non-standard cache layout)")
    layers, kv_heads, head_dim = kv_shape(model)
    problems = []
    if config.token_dim % config.num_attention_heads:
        problems.append(f"token_dim={config.token_dim} is not a multiple of num_attention_heads="
                        f"{config.num_attention_heads}")
    elif (config.num_attention_heads, config.token_dim // config.num_attention_heads) != (kv_heads, head_dim):
        problems.append(f"num_attention_heads={config.num_attention_heads} with head size "
                        f"{config.token_dim // config.num_attention_heads} (token_dim={config.token_dim}), but the "
                        f"model's keys have {kv_heads} heads of size {head_dim}")
    if config.num_layers != layers:
        problems.append(f"num_layers={config.num_layers}, but the model has {layers} layers")
    if problems:
        raise ValueError("PrefixTuningConfig does not fit the model: " + "; ".join(problems))


class PrefixEncoder(VirtualTokenEncoder):
    """PEFT's ``PrefixEncoder``: ``embedding`` (and ``transform`` with ``prefix_projection``)."""

    HEAD_NAMES = ("transform",)

    def __init__(self, config: PrefixTuningConfig):
        super().__init__()
        width = config.num_layers * 2 * config.token_dim
        if config.prefix_projection and not config.inference_mode:
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(nn.Linear(config.token_dim, config.encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(config.encoder_hidden_size, width))
            last = self.transform[-1]
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)
            last = self.embedding
        if config.init_weights == "zero":
            with torch.no_grad():
                for param in last.parameters():
                    param.zero_()

    @classmethod
    def from_model(cls, config, model: nn.Module, word_embeddings: nn.Module) -> PrefixEncoder:
        if any(getattr(module, "gradient_checkpointing", False) for module in model.modules()):
            # a recomputed layer would append its keys to the prefix cache a second time (PEFT refuses too)
            raise ValueError("prefix tuning does not work with gradient checkpointing; disable it first")
        fit_to_model(config, model)
        return cls(config)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform(x)


def build_prefix_cache(encoder: PrefixEncoder, config: PrefixTuningConfig, batch_size: int,
                       dtype: torch.dtype | None, model_config, encoder_decoder: bool = False):
    """The prefix as a transformers cache for ``batch_size`` rows.

    The encoder runs once and the batch is a broadcast view of it (PEFT runs it for every row).
    Row ``r`` of ``[2 x num_layers, ...]`` is the key (even r) or the value (odd r) of layer r // 2.
    For encoder-decoder models PEFT lays the rows out for (self key, self value, cross key, cross
    value) per layer over two copies of the prefix and then drops the cross-attention part; so layer
    i's self-attention reads rows 4i and 4i + 1, modulo 2 x num_layers. We read the same rows, so a
    checkpoint means the same in both libraries.
    """
    from transformers import DynamicCache, EncoderDecoderCache

    virtual, layers, heads = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
    flat = encoder.prompts()  # [1, P, 2L * kv_heads * head_dim]
    if dtype is not None:
        flat = flat.to(dtype)
    # -> [2L, B, kv_heads, P, head_dim]
    kv = flat.view(1, virtual, 2 * layers, heads, -1).permute(2, 0, 3, 1, 4).expand(-1, batch_size, -1, -1, -1)
    if not encoder_decoder:
        return DynamicCache([(kv[2 * i], kv[2 * i + 1]) for i in range(layers)])
    rows = [((4 * i) % (2 * layers), (4 * i + 1) % (2 * layers)) for i in range(layers)]
    return EncoderDecoderCache(DynamicCache([(kv[k], kv[v]) for k, v in rows]), DynamicCache())


PROMPT_ENCODERS[PeftType.PREFIX_TUNING] = PrefixEncoder
