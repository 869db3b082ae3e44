"""PEFT methods beside LoRA (prompt tuning, IA3, LoHa, AdaLoRA, ...), one module each, sharing the
config, checkpoint and PeftModel machinery. LoRA itself lives in layers/ and injector/.
"""

from fastlora.methods.adalora import AdaLoraConfig, AdaLoraModel, RankAllocator, SVDLinear
from fastlora.methods.adaption_prompt import AdaptionPromptConfig, AdaptionPromptModel
from fastlora.methods.ia3 import IA3Config, IA3Linear, IA3Model
from fastlora.methods.loha import LoHaConfig, LoHaLinear, LoHaModel
from fastlora.methods.multitask_prompt_tuning import (
    MultitaskPromptEmbedding,
    MultitaskPromptTuningConfig,
    MultitaskPromptTuningInit,
)
from fastlora.methods.p_tuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
from fastlora.methods.prefix_tuning import PrefixEncoder, PrefixTuningConfig
from fastlora.methods.prompt_learning import PROMPT_ENCODERS, PromptLearner, PromptLearningConfig
from fastlora.methods.prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit
from fastlora.injector.tuner import TUNERS, AdapterTuner
from fastlora.layers import AdapterLayer

__all__ = [
    # prompt learning (shared machinery, then one module per method)
    "PROMPT_ENCODERS",
    "PromptLearner",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "PromptEmbedding",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptEncoder",
    "PrefixTuningConfig",
    "PrefixEncoder",
    "MultitaskPromptTuningConfig",
    "MultitaskPromptTuningInit",
    "MultitaskPromptEmbedding",
    # adaption prompt
    "AdaptionPromptConfig",
    "AdaptionPromptModel",
    # weight-adapting methods beside LoRA (shared tuner machinery, then one module per method)
    "TUNERS",
    "AdapterLayer",
    "AdapterTuner",
    "IA3Config",
    "IA3Linear",
    "IA3Model",
    "LoHaConfig",
    "LoHaLinear",
    "LoHaModel",
    "AdaLoraConfig",
    "AdaLoraModel",
    "RankAllocator",
    "SVDLinear",
]
