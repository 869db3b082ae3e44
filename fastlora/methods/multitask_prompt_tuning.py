"""Multitask prompt tuning (Wang et al. 2023): one shared prompt, scaled per task by a low-rank matrix.

The prompt of task t is ``embedding * (prefix_task_cols[t] @ prefix_task_rows[t])`` (elementwise), with
``prefix_task_cols: [num_tasks, T, num_ranks]`` and ``prefix_task_rows: [num_tasks, num_ranks, token_dim]``;
every forward and ``generate`` takes ``task_ids`` (one task index per row). Saved tensors, as PEFT's:
``prompt_embeddings`` (the shared prompt), ``prefix_task_cols``, ``prefix_task_rows``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fastlora.config import PeftType, register_config
from fastlora.methods.prompt_learning import PROMPT_ENCODERS
from fastlora.methods.prompt_tuning import PromptEmbedding, PromptTuningConfig

__all__ = ["MultitaskPromptTuningInit", "MultitaskPromptTuningConfig", "MultitaskPromptEmbedding"]


class MultitaskPromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    RANDOM = "RANDOM"
    AVERAGE_SOURCE_TASKS = "AVERAGE_SOURCE_TASKS"
    EXACT_SOURCE_TASK = "EXACT_SOURCE_TASK"
    ONLY_SOURCE_SHARED = "ONLY_SOURCE_SHARED"

    def __str__(self) -> str:
        return self.value


FROM_SOURCE = ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED")


@register_config
@dataclass
class MultitaskPromptTuningConfig(PromptTuningConfig):
    """PEFT's ``MultitaskPromptTuningConfig``. The source-task inits read a saved multitask adapter's
    tensors from ``prompt_tuning_init_state_dict_path`` (a ``.safetensors`` or torch file)."""

    PEFT_TYPE: ClassVar[PeftType] = PeftType.MULTITASK_PROMPT_TUNING
    INIT_ENUM: ClassVar[type[enum.Enum]] = MultitaskPromptTuningInit

    prompt_tuning_init: MultitaskPromptTuningInit | str = MultitaskPromptTuningInit.RANDOM
    prompt_tuning_init_state_dict_path: str | None = None
    prompt_tuning_init_task: int | None = 0
    num_ranks: int | None = 1
    num_tasks: int | None = 1

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_ranks", "num_tasks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.prompt_tuning_init.value in FROM_SOURCE and not self.prompt_tuning_init_state_dict_path:
            raise ValueError(f"prompt_tuning_init={self.prompt_tuning_init.value} needs "
                             "prompt_tuning_init_state_dict_path")


def _read_source(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


class MultitaskPromptEmbedding(PromptEmbedding):
    """PEFT's ``MultitaskPromptEmbedding``."""

    def __init__(self, config: MultitaskPromptTuningConfig, word_embeddings: nn.Module | None = None):
        super().__init__(config, word_embeddings)
        total = config.total_virtual_tokens
        self.num_tasks = config.num_tasks
        self.prefix_task_cols = nn.Parameter(torch.normal(0.0, 0.02, size=(config.num_tasks, total, config.num_ranks)))
        self.prefix_task_rows = nn.Parameter(
            torch.normal(0.0, 0.02, size=(config.num_tasks, config.num_ranks, config.token_dim)))
        init = config.prompt_tuning_init.value
        if init in FROM_SOURCE and not config.inference_mode:
            self._init_from_source(config, init)

    def _init_from_source(self, config: MultitaskPromptTuningConfig, init: str) -> None:
        source = _read_source(config.prompt_tuning_init_state_dict_path)
        state = {"embedding.weight": source["prompt_embeddings"]}
        if init != "ONLY_SOURCE_SHARED":
            cols, rows = source["prefix_task_cols"], source["prefix_task_rows"]
            if init == "AVERAGE_SOURCE_TASKS":
                cols, rows = cols.mean(0, keepdim=True), rows.mean(0, keepdim=True)
            else:
                task = config.prompt_tuning_init_task
                cols, rows = cols[task : task + 1], rows[task : task + 1]
            state.update(prefix_task_cols=cols, prefix_task_rows=rows)
        try:
            self.load_state_dict(state, strict=False)
        except RuntimeError as err:
            raise ValueError(f"prompt_tuning_init={init}: the source adapter does not fit: {err}") from None

    @classmethod
    def from_model(cls, config, model: nn.Module, word_embeddings: nn.Module) -> MultitaskPromptEmbedding:
        return cls(config, word_embeddings)

    def prompts(self, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, token_dim]: the shared prompt scaled by each row's task matrix."""
        if task_ids is None:
            raise ValueError("multitask prompt tuning needs task_ids (one task index per row)")
        task_ids = torch.as_tensor(task_ids, device=self.prefix_task_cols.device).long().view(-1)
        if task_ids.numel() and (task_ids.min() < 0 or task_ids.max() >= self.num_tasks):
            raise ValueError(f"task_ids must be in [0, {self.num_tasks}), got {task_ids.tolist()}")
        # [B, T, r] @ [B, r, d] -> [B, T, d]
        scale = torch.bmm(self.prefix_task_cols[task_ids], self.prefix_task_rows[task_ids])
        return self.embedding.weight.unsqueeze(0) * scale

    def saved_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"prompt_embeddings": tuple(self.embedding.weight.shape),
                "prefix_task_cols": tuple(self.prefix_task_cols.shape),
                "prefix_task_rows": tuple(self.prefix_task_rows.shape)}

    def state_to_save(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.embedding.weight.detach().cpu(),
                "prefix_task_cols": self.prefix_task_cols.detach().cpu(),
                "prefix_task_rows": self.prefix_task_rows.detach().cpu()}

    def load_saved(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.embedding.weight.copy_(state["prompt_embeddings"])
            self.prefix_task_cols.copy_(state["prefix_task_cols"])
            self.prefix_task_rows.copy_(state["prefix_task_rows"])


PROMPT_ENCODERS[PeftType.MULTITASK_PROMPT_TUNING] = MultitaskPromptEmbedding
