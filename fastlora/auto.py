"""``AutoPeftModel*``: load base model and adapter from an adapter folder in one call.

The base model comes from the adapter config's ``base_model_name_or_path`` (a hub id or a local
folder) through the matching transformers Auto class.
"""

from __future__ import annotations

import os

from fastlora.checkpoint import strict_mode
from fastlora.config import PeftConfig, TaskType
from fastlora.peft_model import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

__all__ = [
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForFeatureExtraction",
]

_TASK_TO_AUTO_CLASS = {
    TaskType.CAUSAL_LM: "AutoModelForCausalLM",
    TaskType.SEQ_2_SEQ_LM: "AutoModelForSeq2SeqLM",
    TaskType.SEQ_CLS: "AutoModelForSequenceClassification",
    TaskType.TOKEN_CLS: "AutoModelForTokenClassification",
    TaskType.QUESTION_ANS: "AutoModelForQuestionAnswering",
    TaskType.FEATURE_EXTRACTION: "AutoModel",
}


class AutoPeftModel:
    """Picks the transformers Auto class from the adapter's ``task_type`` (``AutoModel`` when it has none)."""

    _target_task: TaskType | None = None
    _target_peft_class: type[PeftModel] = PeftModel

    def __init__(self, *args, **kwargs):
        raise OSError(f"{type(self).__name__} is created with {type(self).__name__}.from_pretrained(path)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None,
                        strict_adapter_check: str | None = None, **kwargs) -> PeftModel:
        """``kwargs`` go to the base model's ``from_pretrained`` (``torch_dtype``, ``device_map``, ...);
        ``strict_adapter_check`` to ``PeftModel.from_pretrained``."""
        import transformers

        strict_mode(strict_adapter_check)  # a bad value fails before the base model loads

        peft_config = config or PeftConfig.from_pretrained(pretrained_model_name_or_path)
        base_path = peft_config.base_model_name_or_path
        if not base_path:
            raise ValueError(
                f"the adapter in {os.fspath(pretrained_model_name_or_path)!r} has no base_model_name_or_path; "
                "load the base model yourself and use PeftModel.from_pretrained(model, path)"
            )
        task_type = TaskType(peft_config.task_type) if peft_config.task_type is not None else None
        if cls._target_task is not None and task_type not in (None, cls._target_task):
            raise ValueError(
                f"{cls.__name__} loads {cls._target_task.value} adapters, but this adapter's task_type is "
                f"{task_type.value}; use {_auto_peft_name(task_type)}"
            )
        task = cls._target_task or task_type
        auto_class = getattr(transformers, _TASK_TO_AUTO_CLASS[task] if task is not None else "AutoModel")
        base_model = auto_class.from_pretrained(base_path, revision=peft_config.revision, **kwargs)
        peft_class = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task, cls._target_peft_class) if task else PeftModel
        return peft_class.from_pretrained(base_model, pretrained_model_name_or_path, adapter_name=adapter_name,
                                          is_trainable=is_trainable, config=peft_config,
                                          strict_adapter_check=strict_adapter_check)


def _auto_peft_name(task: TaskType) -> str:
    return next(c.__name__ for c in AutoPeftModel.__subclasses__() if c._target_task == task)


class AutoPeftModelForCausalLM(AutoPeftModel):
    _target_task = TaskType.CAUSAL_LM
    _target_peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(AutoPeftModel):
    _target_task = TaskType.SEQ_2_SEQ_LM
    _target_peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(AutoPeftModel):
    _target_task = TaskType.SEQ_CLS
    _target_peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(AutoPeftModel):
    _target_task = TaskType.TOKEN_CLS
    _target_peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(AutoPeftModel):
    _target_task = TaskType.QUESTION_ANS
    _target_peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(AutoPeftModel):
    _target_task = TaskType.FEATURE_EXTRACTION
    _target_peft_class = PeftModelForFeatureExtraction
