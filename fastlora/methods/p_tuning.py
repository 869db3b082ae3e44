"""P-tuning (Liu et al. 2021): virtual tokens reparameterized by a small MLP or a bidirectional LSTM.

``PromptEncoderConfig`` and ``PromptEncoder`` have PEFT's fields, defaults and module names
(``embedding``, ``mlp_head``, ``lstm_head``). What is saved is the encoder's output, one row per
virtual token; a saved adapter loads into an encoder without the head (as PEFT's inference mode).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fastlora._warn import warn
from fastlora.config import PeftType, register_config
from fastlora.methods.prompt_learning import PROMPT_ENCODERS, PromptLearningConfig, VirtualTokenEncoder

__all__ = ["PromptEncoderReparameterizationType", "PromptEncoderConfig", "PromptEncoder"]


class PromptEncoderReparameterizationType(str, enum.Enum):
    MLP = "MLP"
    LSTM = "LSTM"

    def __str__(self) -> str:
        return self.value


MLP_LAYERS = 2  # PEFT's MLP always has this many hidden layers, whatever encoder_num_layers says


@register_config
@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """PEFT's ``PromptEncoderConfig``; ``encoder_hidden_size`` defaults to the model's hidden size."""

    PEFT_TYPE: ClassVar[PeftType] = PeftType.P_TUNING

    encoder_reparameterization_type: PromptEncoderReparameterizationType | str = PromptEncoderReparameterizationType.MLP
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        kind = getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type)
        try:
            self.encoder_reparameterization_type = PromptEncoderReparameterizationType(kind)
        except ValueError:
            raise ValueError(f"encoder_reparameterization_type must be MLP or LSTM, got {kind!r}") from None
        if self.encoder_hidden_size is not None and (not isinstance(self.encoder_hidden_size, int)
                                                     or self.encoder_hidden_size < 1):
            raise ValueError(f"encoder_hidden_size must be a positive int, got {self.encoder_hidden_size!r}")
        if not isinstance(self.encoder_num_layers, int) or self.encoder_num_layers < 1:
            raise ValueError(f"encoder_num_layers must be a positive int, got {self.encoder_num_layers!r}")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout}")


class PromptEncoder(VirtualTokenEncoder):
    """PEFT's ``PromptEncoder``. MLP: Linear(d, h), ReLU, Linear(h, h), ReLU, Linear(h, d). LSTM: a
    bidirectional LSTM of hidden size h, then Linear(2h, 2h), ReLU, Linear(2h, d)."""

    HEAD_NAMES = ("lstm_head", "mlp_head")

    def __init__(self, config: PromptEncoderConfig):
        super().__init__()
        dim, hidden = config.token_dim, config.encoder_hidden_size
        self.encoder_type = config.encoder_reparameterization_type
        self.embedding = nn.Embedding(config.total_virtual_tokens, dim)
        if config.inference_mode:
            return  # a saved adapter: the output is loaded into ``embedding``
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(input_size=dim, hidden_size=hidden, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            if config.encoder_num_layers != MLP_LAYERS:
                warn(f"p-tuning MLP: encoder_num_layers={config.encoder_num_layers} is ignored; the MLP has "
                     f"{MLP_LAYERS} hidden layers (as in PEFT)")
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    @classmethod
    def from_model(cls, config, model: nn.Module, word_embeddings: nn.Module) -> PromptEncoder:
        return cls(config)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if "lstm_head" in self._modules:
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)


PROMPT_ENCODERS[PeftType.P_TUNING] = PromptEncoder
