"""Prompt tuning (Lester et al. 2021): ``num_virtual_tokens`` trainable embeddings in front of the input.

``PromptTuningConfig`` has PEFT's fields and defaults. The embeddings start at random (``RANDOM``), at the
embeddings of tokens drawn from the vocabulary (``SAMPLE_VOCAB``), or at those of a text, repeated or
cut to length (``TEXT``, with a tokenizer given by a local path or as a tokenizer object).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from fastlora.config import PeftType, register_config
from fastlora.methods.prompt_learning import PROMPT_ENCODERS, PromptLearningConfig, VirtualTokenEncoder

__all__ = ["PromptTuningInit", "PromptTuningConfig", "PromptEmbedding"]


class PromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"

    def __str__(self) -> str:
        return self.value


@register_config
@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """PEFT's ``PromptTuningConfig``. ``tokenizer_name_or_path`` may also be a tokenizer object (it is
    saved as its ``name_or_path``); the text init needs it and ``prompt_tuning_init_text``."""

    PEFT_TYPE: ClassVar[PeftType] = PeftType.PROMPT_TUNING
    INIT_ENUM: ClassVar[type[enum.Enum]] = PromptTuningInit

    prompt_tuning_init: PromptTuningInit | str = PromptTuningInit.RANDOM
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: Any = None
    tokenizer_kwargs: dict | None = None

    def __post_init__(self):
        super().__post_init__()
        try:
            self.prompt_tuning_init = self.INIT_ENUM(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init))
        except ValueError:
            valid = ", ".join(i.value for i in self.INIT_ENUM)
            raise ValueError(f"prompt_tuning_init must be one of {valid}, got {self.prompt_tuning_init!r}") from None
        text_init = self.prompt_tuning_init.value == "TEXT"
        if text_init and not self.tokenizer_name_or_path:
            raise ValueError("prompt_tuning_init=TEXT needs tokenizer_name_or_path (a local tokenizer folder, "
                             "a hub name, or a tokenizer object)")
        if text_init and not self.prompt_tuning_init_text:
            raise ValueError("prompt_tuning_init=TEXT needs prompt_tuning_init_text")
        if self.tokenizer_kwargs and not text_init:
            raise ValueError("tokenizer_kwargs are only used with prompt_tuning_init=TEXT")

    def to_dict(self) -> dict[str, Any]:
        tokenizer = self.tokenizer_name_or_path
        if tokenizer is None or isinstance(tokenizer, str):
            return super().to_dict()
        self.tokenizer_name_or_path = getattr(tokenizer, "name_or_path", None) or None
        try:
            return super().to_dict()
        finally:
            self.tokenizer_name_or_path = tokenizer


def load_tokenizer(config: PromptTuningConfig):
    tokenizer = config.tokenizer_name_or_path
    if not isinstance(tokenizer, str):
        return tokenizer
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # a saved adapter must not run code when it is loaded (PEFT's rule)
    try:
        return AutoTokenizer.from_pretrained(tokenizer, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"prompt_tuning_init=TEXT: cannot load tokenizer {tokenizer!r}: {err}") from None


def init_token_ids(config: PromptTuningConfig, total: int, vocab_size: int) -> torch.Tensor | None:
    """Token ids whose embeddings start the virtual tokens, or None for a random start. A saved adapter
    (``inference_mode``) skips this: its embeddings are about to be loaded."""
    init = config.prompt_tuning_init.value
    if config.inference_mode or init not in ("TEXT", "SAMPLE_VOCAB"):
        return None
    if init == "SAMPLE_VOCAB":
        return torch.randint(0, vocab_size, (total,))
    ids = list(load_tokenizer(config)(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ValueError(f"prompt_tuning_init_text {config.prompt_tuning_init_text!r} tokenizes to no tokens")
    ids = (ids * math.ceil(total / len(ids)))[:total]
    return torch.tensor(ids, dtype=torch.long)


class PromptEmbedding(VirtualTokenEncoder):
    """PEFT's ``PromptEmbedding``: ``embedding`` is ``[num_virtual_tokens x num_transformer_submodules,
    token_dim]``, in fp32."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Module | None = None):
        super().__init__()
        total = config.total_virtual_tokens
        self.embedding = nn.Embedding(total, config.token_dim)
        if word_embeddings is not None:
            ids = init_token_ids(config, total, word_embeddings.num_embeddings)
            if ids is not None:
                with torch.no_grad():
                    start = word_embeddings(ids.to(word_embeddings.weight.device)).float()
                self.embedding.weight = nn.Parameter(start)

    @classmethod
    def from_model(cls, config, model: nn.Module, word_embeddings: nn.Module) -> PromptEmbedding:
        return cls(config, word_embeddings)


PROMPT_ENCODERS[PeftType.PROMPT_TUNING] = PromptEmbedding
