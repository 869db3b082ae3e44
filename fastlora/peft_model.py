"""``PeftModel`` and its task classes: PEFT's model wrapper, API and checkpoint behaviour.

``peft_model.base_model`` is the tuner (``LoraModel``) and ``peft_model.base_model.model`` the
transformers model, so names, state dicts and saved keys are PEFT's. For prompt learning (as in PEFT)
``base_model`` is the transformers model itself and the encoders sit in ``peft_model.prompt_encoder``.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager

from torch import nn

from fastlora.checkpoint import (
    adapter_folder,
    get_peft_model_state_dict,
    load_adapter_weights,
    save_adapter,
    set_peft_model_state_dict,
    strict_mode,
)
from fastlora.config import PeftConfig, PeftType, TaskType
from fastlora.injector import LoraModel
from fastlora.injector.mixed_batch import mixed_adapter_batch
from fastlora.layers import LinearNF4
from fastlora.methods import PROMPT_ENCODERS, TUNERS, AdaptionPromptModel, PromptLearner
from fastlora.status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status

__all__ = [
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftModelForQuestionAnswering",
    "PeftModelForFeatureExtraction",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
]

# peft_type -> tuner class that injects and manages that method's layers.
PEFT_TYPE_TO_TUNER_MAPPING: dict[PeftType, type[nn.Module]] = {PeftType.LORA: LoraModel}
PEFT_TYPE_TO_TUNER_MAPPING[PeftType.ADAPTION_PROMPT] = AdaptionPromptModel
# Prompt learning keeps PEFT's layout: base_model is the transformers model itself and the encoders
# sit beside it in ``prompt_encoder`` (a PromptLearner, which also plays the tuner's part).
PEFT_TYPE_TO_TUNER_MAPPING.update(dict.fromkeys(PROMPT_ENCODERS, PromptLearner))
# IA3, LoHa, AdaLoRA, ...: each method registers its tuner (fastlora.injector.tuner.register_tuner).
PEFT_TYPE_TO_TUNER_MAPPING.update(TUNERS)


class PeftModel(nn.Module):
    """A transformers model with adapters injected; everything not defined here is the tuner's or the model's."""

    # Heads trained whole and saved beside the adapter for this task (PEFT's behaviour).
    HEAD_MODULES: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True):
        super().__init__()
        self._check_config(peft_config)
        self._add_head_modules(peft_config)
        tuner = PEFT_TYPE_TO_TUNER_MAPPING[PeftType(peft_config.peft_type)]
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
        self._is_prompt_learning = peft_config.is_prompt_learning
        if self._is_prompt_learning:
            self.base_model = model
            self.prompt_encoder = tuner(model, peft_config, adapter_name)
            self.word_embeddings = self.prompt_encoder.word_embeddings
        else:
            self.base_model = tuner(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        if _is_checkpointing(model) and hasattr(model, "enable_input_require_grads"):
            # Reentrant checkpointing needs an input that requires grad, or the frozen base cuts the graph.
            model.enable_input_require_grads()

    def _check_config(self, peft_config) -> None:
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(f"expected a fastlora PeftConfig (e.g. LoraConfig), got {type(peft_config).__name__}")
        if PeftType(peft_config.peft_type) not in PEFT_TYPE_TO_TUNER_MAPPING:
            raise ValueError(f"peft_type {peft_config.peft_type} is not supported by this fastlora")

    def _add_head_modules(self, peft_config) -> None:
        # As PEFT 0.22: names already listed are not added twice, and the list is a new one, so a config
        # reused for another model (cross-validation folds) is not changed.
        if self.HEAD_MODULES and hasattr(peft_config, "modules_to_save"):
            listed = list(peft_config.modules_to_save or [])
            peft_config.modules_to_save = listed + [name for name in self.HEAD_MODULES if name not in listed]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ---- what PEFT users call -----------------------------------------------------------------------
    @property
    def _tuner(self) -> nn.Module:
        """What manages the adapters: the tuner (``base_model``), or ``prompt_encoder`` for prompt learning."""
        return self.prompt_encoder if self._is_prompt_learning else self.base_model

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self._tuner.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        return self._tuner.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self._tuner.active_adapters

    @property
    def active_peft_config(self) -> PeftConfig:
        """The config of the active adapter (the first, when several are active)."""
        return self.peft_config[self.active_adapters[0]]

    @property
    def peft_type(self) -> PeftType:
        return PeftType(self.active_peft_config.peft_type)

    @property
    def modules_to_save(self) -> set[str] | None:
        names = {m for config in self.peft_config.values() for m in (getattr(config, "modules_to_save", None) or [])}
        return names or None

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model if self._is_prompt_learning else self.base_model.model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        # A 4-bit weight counts as the number of weights it packs (two per byte), as PEFT counts
        # bitsandbytes' Params4bit.
        packed = {id(m.weight) for m in self.modules() if isinstance(m, LinearNF4)}
        trainable, total = 0, 0
        for param in self.parameters():
            count = param.numel() * 2 if id(param) in packed else param.numel()
            total += count
            if param.requires_grad:
                trainable += count
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    @contextmanager
    def disable_adapter(self):
        """Run the base model alone inside the ``with`` block (merged adapters are unmerged first)."""
        self._tuner.disable_adapter_layers()
        try:
            yield
        finally:
            self._tuner.enable_adapter_layers()

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False) -> None:
        """Inject a further adapter; it is created frozen and inactive until ``set_adapter``."""
        self._check_config(peft_config)
        if PeftType(peft_config.peft_type) != self.peft_type:
            raise ValueError(
                f"cannot add a {peft_config.peft_type} adapter to a model with {self.peft_type} adapters"
            )
        self._add_head_modules(peft_config)
        if peft_config.base_model_name_or_path is None:
            first = next(iter(self.peft_config.values()))
            peft_config.base_model_name_or_path = first.base_model_name_or_path
        self._tuner.inject_adapter(peft_config, adapter_name)

    def set_adapter(self, adapter_name: str) -> None:
        self._tuner.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self._tuner.delete_adapter(adapter_name)

    def _layer_tuner(self, what: str) -> nn.Module:
        """The tuner whose adapters live in per-layer tensors; TypeError (as PEFT raises) for prompt learning
        and adaption prompt, which have none, naming ``what`` was asked."""
        if self._is_prompt_learning or self.peft_type == PeftType.ADAPTION_PROMPT:
            raise TypeError(f"{what} is not supported for {self.peft_type.value} (as in PEFT): its adapters are "
                            f"not per-layer tensors")
        return self.base_model

    def get_layer_status(self) -> list[TunerLayerStatus]:
        """What each adapter layer holds, runs and trains (``fastlora.status``)."""
        return get_layer_status(self)

    def get_model_status(self) -> TunerModelStatus:
        """The layers' statuses summed up, ``"irregular"`` where they disagree (``fastlora.status``)."""
        return get_model_status(self)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Turn gradients of ``adapter_names`` on (default) or off, whether they are active or not; what is
        active does not change. Not for prompt learning (as in PEFT)."""
        self._layer_tuner("set_requires_grad").set_requires_grad(adapter_names, requires_grad)

    # ---- checkpoints ----------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, is_main_process: bool = True, **kwargs) -> None:
        """Write each adapter in PEFT's format: the default one at the root, others in sub-folders."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {os.fspath(save_directory)!r} is a file, not a folder")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter {unknown[0]!r}; adapters: {sorted(self.peft_config)}")
        if not is_main_process:
            return
        for name in names:
            config = copy.deepcopy(self.peft_config[name])
            config.inference_mode = True  # as PEFT writes it: a saved adapter loads frozen unless asked
            state = get_peft_model_state_dict(self, adapter_name=name, prefix=self._tuner.prefix)
            save_adapter(adapter_folder(save_directory, name), state, config, safe_serialization)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None,
                        autocast_adapter_dtype: bool = True, strict_adapter_check: str | None = None,
                        **kwargs) -> PeftModel:
        """Load the adapter saved in folder ``model_id`` onto ``model``. ``is_trainable=False`` (the default)
        loads it frozen for inference, as PEFT does. ``strict_adapter_check`` ("error", "warn" or "ignore", as
        in PEFT 0.22): what happens when the checkpoint's tensor names do not match the adapter's; fastlora's
        default is "error" (PEFT's is "warn"), and then nothing is loaded.
        """
        strict_mode(strict_adapter_check)
        config = PeftConfig.from_pretrained(model_id, subfolder=kwargs.get("subfolder")) if config is None else config
        config.inference_mode = not is_trainable
        weights = load_adapter_weights(_subfolder(model_id, kwargs))  # read (and fail) before touching the model
        if cls is PeftModel and config.task_type is not None:
            cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING[TaskType(config.task_type)]
        requires_grad = {name: param.requires_grad for name, param in model.named_parameters()}
        peft_model = cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            set_peft_model_state_dict(peft_model, weights, adapter_name, prefix=peft_model._tuner.prefix,
                                      strict_adapter_check=strict_adapter_check)
        except Exception:
            peft_model._tuner.delete_adapter(adapter_name)  # puts the original modules back
            for name, param in model.named_parameters():  # and unfreezes what injection froze
                param.requires_grad_(requires_grad[name])
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     torch_device: str | None = None, autocast_adapter_dtype: bool = True,
                     strict_adapter_check: str | None = None, **kwargs) -> None:
        """Add the adapter saved in ``model_id`` under ``adapter_name``; on any error nothing changes.
        ``strict_adapter_check``: as in ``from_pretrained``."""
        strict_mode(strict_adapter_check)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete it first or choose another name")
        config = PeftConfig.from_pretrained(model_id, subfolder=kwargs.get("subfolder"))
        config.inference_mode = not is_trainable
        weights = load_adapter_weights(_subfolder(model_id, kwargs), device=torch_device or "cpu")
        self._check_config(config)
        self._add_head_modules(config)
        self._tuner.inject_adapter(config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            set_peft_model_state_dict(self, weights, adapter_name, prefix=self._tuner.prefix,
                                      strict_adapter_check=strict_adapter_check)
        except Exception:
            self._tuner.delete_adapter(adapter_name)
            raise
        if is_trainable:  # trainable even while inactive, as in PEFT
            for name, param in self.named_parameters():
                # ``....lora_A.<name>.weight``, or ``....ia3_l.<name>`` for a tensor held in a ParameterDict
                if f".{adapter_name}." in name or (name.endswith(f".{adapter_name}") and ".ranknum." not in name):
                    param.requires_grad_(True)
        else:
            self.eval()


def _is_checkpointing(model: nn.Module) -> bool:
    flag = getattr(model, "is_activation_checkpointing", None)
    if flag is None:
        flag = getattr(model, "is_gradient_checkpointing", False)
    return bool(flag)


def _subfolder(model_id, kwargs) -> str:
    sub = kwargs.get("subfolder")
    return os.path.join(model_id, sub) if sub else os.fspath(model_id)


class PeftModelForCausalLM(PeftModel):
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        if self._is_prompt_learning:
            return self.prompt_encoder.forward_causal_lm(
                input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
                output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                return_dict=return_dict, task_ids=task_ids, **kwargs)
        return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               labels=labels, output_attentions=output_attentions,
                               output_hidden_states=output_hidden_states, return_dict=return_dict, **kwargs)

    def generate(self, *args, **kwargs):
        if self._is_prompt_learning:
            return self.prompt_encoder.generate(*args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)  # one per sequence, PEFT's mixed-adapter batch
        with mixed_adapter_batch(self.base_model, adapter_names, num_beams=kwargs.get("num_beams")):
            return self.base_model.model.generate(*args, **kwargs)


class PeftModelForSeq2SeqLM(PeftModel):
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None,
                decoder_attention_mask=None, decoder_inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        if self._is_prompt_learning:
            return self.prompt_encoder.forward_seq2seq(
                input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                decoder_inputs_embeds=decoder_inputs_embeds, labels=labels, output_attentions=output_attentions,
                output_hidden_states=output_hidden_states, return_dict=return_dict, task_ids=task_ids, **kwargs)
        return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                               decoder_inputs_embeds=decoder_inputs_embeds, labels=labels,
                               output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                               return_dict=return_dict, **kwargs)

    def generate(self, *args, **kwargs):
        if self._is_prompt_learning:
            return self.prompt_encoder.generate(*args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)  # one per sequence, PEFT's mixed-adapter batch
        with mixed_adapter_batch(self.base_model, adapter_names, num_beams=kwargs.get("num_beams")):
            return self.base_model.model.generate(*args, **kwargs)


class _EncoderTaskModel(PeftModel):
    # token_type_ids / position_ids are named because transformers' Trainer drops every dataset column
    # the forward does not name (it looks through peft.PeftModel only); they come after PEFT's own
    # parameters so positional calls bind as in PEFT. Passed on only when given: not every encoder
    # takes them (DistilBERT has no token_type_ids).
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, token_type_ids=None, position_ids=None,
                **kwargs):
        given = dict(token_type_ids=token_type_ids, position_ids=position_ids, labels=labels)
        kwargs.update({key: value for key, value in given.items() if value is not None})
        if self._is_prompt_learning:
            return self.prompt_encoder.forward_classification(
                input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                return_dict=return_dict, task_ids=task_ids,
                token_level=isinstance(self, PeftModelForTokenClassification), **kwargs)
        return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                               return_dict=return_dict, **kwargs)


# The heads transformers' classification models put on top; DistilBERT's pre_classifier is initialized at
# random too, so it trains and saves with the classifier (PEFT 0.22).
CLASSIFIER_HEADS = ("classifier", "score", "pre_classifier")


class PeftModelForSequenceClassification(_EncoderTaskModel):
    HEAD_MODULES = CLASSIFIER_HEADS


class PeftModelForTokenClassification(_EncoderTaskModel):
    HEAD_MODULES = CLASSIFIER_HEADS


class PeftModelForQuestionAnswering(_EncoderTaskModel):
    HEAD_MODULES = ("qa_outputs",)

    # start/end_positions are the labels; named (as in PEFT) so that Trainer keeps them and finds them.
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                start_positions=None, end_positions=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, task_ids=None, **kwargs):
        given = dict(start_positions=start_positions, end_positions=end_positions)
        kwargs.update({key: value for key, value in given.items() if value is not None})
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                               position_ids=position_ids, inputs_embeds=inputs_embeds,
                               output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                               return_dict=return_dict, **kwargs)


class PeftModelForFeatureExtraction(_EncoderTaskModel):
    # No labels: PEFT's parameter order, so positional calls bind the same way.
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, token_type_ids=None, position_ids=None,
                **kwargs):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                               return_dict=return_dict, token_type_ids=token_type_ids, position_ids=position_ids,
                               **kwargs)


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[TaskType, type[PeftModel]] = {
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: str | None = None,
                   low_cpu_mem_usage: bool = False) -> PeftModel:
    """Inject ``peft_config``'s adapter into ``model`` (in place) and wrap it in the task's PeftModel class."""
    if mixed:
        raise NotImplementedError("fastlora has no PeftMixedModel; use one adapter type per model")
    if revision is not None:
        peft_config.revision = revision
    task_type = getattr(peft_config, "task_type", None)
    cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING[TaskType(task_type)] if task_type is not None else PeftModel
    return cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
