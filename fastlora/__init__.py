"""fastlora: fused LoRA kernels behind PEFT's API and checkpoint format.

``from fastlora import LoraConfig, get_peft_model, PeftModel`` works as it does with PEFT. Importing
fastlora never imports triton and never initialises CUDA.
"""

from fastlora.auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from fastlora.checkpoint import get_peft_model_state_dict, set_peft_model_state_dict
from fastlora.config import LoraConfig, PeftConfig, PeftType, TaskType
from fastlora.injector import (
    LoraModel,
    adapter_slots,
    mixed_adapter_batch,
    prepare_model_for_kbit_training,
    quantize_model,
)
from fastlora.layers import AdapterBank, LinearNF4, LoraLinear, ModulesToSaveWrapper
from fastlora.methods import (
    AdaLoraConfig,
    AdaLoraModel,
    AdaptionPromptConfig,
    IA3Config,
    IA3Model,
    LoHaConfig,
    LoHaModel,
    MultitaskPromptTuningConfig,
    MultitaskPromptTuningInit,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
)
from fastlora.ops import lora_linear, nf4_linear
from fastlora.peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)
from fastlora.status import get_layer_status, get_model_status

__version__ = "0.1.0"

__all__ = [
    # configuration
    "PeftConfig",
    "LoraConfig",
    "PeftType",
    "TaskType",
    # models
    "get_peft_model",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftModelForQuestionAnswering",
    "PeftModelForFeatureExtraction",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForFeatureExtraction",
    "LoraModel",
    "get_layer_status",
    "get_model_status",
    # prompt learning and adaption prompt
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PrefixTuningConfig",
    "MultitaskPromptTuningConfig",
    "MultitaskPromptTuningInit",
    "AdaptionPromptConfig",
    # IA3, LoHa and AdaLoRA
    "IA3Config",
    "IA3Model",
    "LoHaConfig",
    "LoHaModel",
    "AdaLoraConfig",
    "AdaLoraModel",
    # layers and ops
    "LoraLinear",
    "ModulesToSaveWrapper",
    "lora_linear",
    # multi-adapter batches
    "mixed_adapter_batch",
    "adapter_slots",
    "AdapterBank",
    # 4-bit (QLoRA)
    "LinearNF4",
    "quantize_model",
    "prepare_model_for_kbit_training",
    "nf4_linear",
    # checkpoints
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "__version__",
]
