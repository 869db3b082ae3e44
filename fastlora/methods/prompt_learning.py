"""What prompt tuning, p-tuning, prefix tuning and multitask prompt tuning share (PEFT's prompt learning).

These methods leave the transformers model untouched and learn virtual tokens instead: an encoder per
adapter produces ``num_virtual_tokens`` embeddings that are put in front of the input embeddings
(prompt tuning, p-tuning, multitask) or in front of every layer's keys and values (prefix tuning).

As in PEFT, ``peft_model.base_model`` is the transformers model itself and the encoders live in
``peft_model.prompt_encoder[adapter_name]``, so parameter names (``prompt_encoder.default.embedding.weight``)
and the saved tensor (``prompt_embeddings``: the encoder's output, one row per virtual token) are PEFT's.

``PromptLearner`` is that ``prompt_encoder`` ModuleDict; it also plays the tuner's part for
``PeftModel`` (adapters, enable/disable, checkpoint hooks) and runs the forward and ``generate`` of
each task with the virtual tokens added.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from fastlora._warn import warn
from fastlora.config import PeftConfig, PeftType, TaskType
from fastlora.injector.inject import replace_module, wrap_modules_to_save
from fastlora.layers import ModulesToSaveWrapper

__all__ = ["PROMPT_ENCODERS", "PromptLearningConfig", "PromptLearner", "VirtualTokenEncoder", "prepare_config"]

# peft_type -> encoder class; each method module registers its own.
PROMPT_ENCODERS: dict[PeftType, type[VirtualTokenEncoder]] = {}

IGNORE_INDEX = -100  # label of a virtual token: no loss


@dataclass
class PromptLearningConfig(PeftConfig):
    """PEFT's ``PromptLearningConfig``. The model-shape fields (``token_dim``, ``num_layers``,
    ``num_attention_heads``, ``num_transformer_submodules``) are filled from the model when left None."""

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self):
        super().__post_init__()
        _check_positive("num_virtual_tokens", self.num_virtual_tokens)
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            _check_positive(name, getattr(self, name))
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ValueError(f"num_transformer_submodules must be 1 or 2, got {self.num_transformer_submodules!r}")

    @property
    def is_prompt_learning(self) -> bool:
        return True

    @property
    def total_virtual_tokens(self) -> int:
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)


def _check_positive(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _first_attr(config, names: Iterable[str]):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def prepare_config(config: PromptLearningConfig, model: nn.Module) -> PromptLearningConfig:
    """Fill the shape fields PEFT fills from the model config (in place, as PEFT does) and check them."""
    if config.num_virtual_tokens is None:
        raise ValueError(f"{type(config).__name__} needs num_virtual_tokens (a positive int)")
    text = _text_config(model)
    if config.num_layers is None:
        config.num_layers = _first_attr(text, ("num_hidden_layers", "num_layers", "n_layer"))
    if config.token_dim is None:
        config.token_dim = _first_attr(text, ("hidden_size", "n_embd", "d_model"))
    if config.num_attention_heads is None:
        config.num_attention_heads = _first_attr(
            text, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"))
    for name in ("num_layers", "token_dim", "num_attention_heads"):
        if getattr(config, name) is None:
            raise ValueError(f"cannot read {name} from the model's config; set {name} in the {type(config).__name__}")
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1
    if getattr(config, "encoder_hidden_size", "absent") is None:
        config.encoder_hidden_size = config.token_dim
    return config


def find_word_embeddings(model: nn.Module) -> nn.Module:
    """The model's input token embedding (what the virtual tokens live beside)."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if embeddings is None:
        vocab = getattr(_text_config(model), "vocab_size", None)
        embeddings = next((m for m in model.modules() if isinstance(m, nn.Embedding) and m.num_embeddings == vocab),
                          None)
    if embeddings is None:
        raise ValueError("prompt learning needs the model's input embeddings; none found (no get_input_embeddings)")
    return embeddings


class VirtualTokenEncoder(nn.Module):
    """Base of the prompt encoders: ``embedding`` holds one row per virtual token; subclasses may add a
    head that reparameterizes it (p-tuning's MLP/LSTM, prefix tuning's projection).

    What PEFT saves (``prompt_embeddings``) is the encoder's output, so a saved adapter loads into an
    encoder without the head: ``embedding`` then holds the output itself.
    """

    HEAD_NAMES: ClassVar[tuple[str, ...]] = ()

    embedding: nn.Embedding

    @property
    def has_head(self) -> bool:
        return any(name in self._modules for name in self.HEAD_NAMES)

    def head(self, x: torch.Tensor) -> torch.Tensor:  # x: [1, T, token_dim] -> [1, T, out]
        return x

    def prompts(self, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The virtual tokens' embeddings: [1, T, out] (shared by the batch) or [B, T, out] (per-row tasks)."""
        weight = self.embedding.weight.unsqueeze(0)
        return self.head(weight) if self.has_head else weight

    def saved_shapes(self) -> dict[str, tuple[int, ...]]:
        rows, _ = self.embedding.weight.shape
        with torch.no_grad():
            width = self.prompts().shape[-1] if self.has_head else self.embedding.weight.shape[1]
        return {"prompt_embeddings": (rows, width)}

    def state_to_save(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"prompt_embeddings": self.prompts()[0].detach().cpu()}

    def load_saved(self, state: dict[str, torch.Tensor]) -> None:
        saved = state["prompt_embeddings"]
        if self.has_head:  # the head's input cannot be recovered from its output: keep the output
            for name in self.HEAD_NAMES:
                self._modules.pop(name, None)
            weight = self.embedding.weight
            self.embedding = nn.Embedding(*saved.shape, device=weight.device, dtype=weight.dtype)
        self.embedding.weight.data.copy_(saved.to(self.embedding.weight.dtype))


class PromptLearner(nn.ModuleDict):
    """PEFT's ``peft_model.prompt_encoder``: one encoder per adapter, keyed by adapter name. It also keeps
    the adapters' configs and the active one, and adds the virtual tokens to each forward."""

    prefix = "prompt_encoder"

    def __init__(self, model: nn.Module, config: PromptLearningConfig, adapter_name: str = "default"):
        super().__init__()
        # Plain references, kept out of the module tree so that state dicts hold the model once.
        self.__dict__["base"] = model
        self.__dict__["word_embeddings"] = find_word_embeddings(model)
        self.peft_config: dict[str, PromptLearningConfig] = {}
        self.active_adapter: str = adapter_name
        self.enabled = True
        self.inject_adapter(config, adapter_name)

    # ---- adapters (the tuner interface PeftModel calls) ------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if self.active_adapter in self.peft_config else []

    @property
    def active_config(self) -> PromptLearningConfig:
        return self.peft_config[self.active_adapter]

    def inject_adapter(self, config: PromptLearningConfig, adapter_name: str,
                       autocast_adapter_dtype: bool = True) -> None:
        """Build ``adapter_name``'s encoder; everything is checked before the model is touched."""
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        peft_type = PeftType(config.peft_type)
        if peft_type not in PROMPT_ENCODERS:
            raise ValueError(f"{peft_type} is not a prompt-learning method")
        prepare_config(config, self.base)
        encoder = PROMPT_ENCODERS[peft_type].from_model(config, self.base, self.word_embeddings)
        encoder.to(self.word_embeddings.weight.device)
        self.base.requires_grad_(False)  # PEFT freezes the whole model for prompt learning
        self[adapter_name] = encoder
        self.peft_config[adapter_name] = config
        try:
            if config.modules_to_save:
                wrap_modules_to_save(self.base, list(config.modules_to_save), adapter_name)
        except Exception:
            self._remove(adapter_name)
            raise
        # inference_mode (a loaded adapter without is_trainable) freezes the prompt encoder, as PEFT does
        # from 0.22 on (0.21 left it trainable), and the adapter's modules_to_save copies.
        if config.inference_mode:
            encoder.requires_grad_(False)
            for wrapper in self._wrappers():
                if adapter_name in wrapper.modules_to_save:
                    wrapper.modules_to_save[adapter_name].requires_grad_(False)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) != 1:
            raise ValueError(f"prompt learning runs one adapter at a time, got {names}")
        if names[0] not in self.peft_config:
            raise ValueError(f"unknown adapter {names[0]!r}; adapters: {sorted(self.peft_config)}")
        self.active_adapter = names[0]
        for wrapper in self._wrappers():
            wrapper.set_adapter(names)

    def _wrappers(self) -> list[ModulesToSaveWrapper]:
        return [m for m in self.base.modules() if isinstance(m, ModulesToSaveWrapper)]

    def _remove(self, adapter_name: str) -> None:
        if adapter_name in self:  # nn.ModuleDict.pop takes no default
            del self[adapter_name]
        self.peft_config.pop(adapter_name, None)
        for key, wrapper in [(k, m) for k, m in self.base.named_modules() if isinstance(m, ModulesToSaveWrapper)]:
            if adapter_name in wrapper.modules_to_save:
                wrapper.delete_adapter(adapter_name)
                if not wrapper.modules_to_save:
                    replace_module(self.base, key, wrapper.original_module)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {sorted(self.peft_config)}")
        self._remove(adapter_name)
        if self.active_adapter == adapter_name and self.peft_config:
            self.set_adapter(next(iter(self.peft_config)))

    def enable_adapter_layers(self) -> None:
        self.enabled = True

    def disable_adapter_layers(self) -> None:
        self.enabled = False

    # ---- checkpoints (hooks called by fastlora.checkpoint) -----------------------------------------
    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return self[adapter_name].state_to_save()

    def adapter_state_loader(self, state: dict[str, torch.Tensor], adapter_name: str) -> Callable[[], None]:
        """Check ``state`` against ``adapter_name``'s encoder; return the function that loads it."""
        encoder = self[adapter_name]
        expected = encoder.saved_shapes()
        unexpected = sorted(set(state) - set(expected))
        missing = sorted(set(expected) - set(state))
        if unexpected or missing:
            kind = self.peft_config[adapter_name].peft_type
            raise ValueError(f"adapter {adapter_name!r}: the checkpoint does not fit a {kind} adapter "
                             f"(unexpected tensors {unexpected}, missing {missing})")
        for key, shape in expected.items():
            # an encoder with a head takes its output's shape (that is what is saved)
            if tuple(state[key].shape) != shape:
                raise ValueError(f"adapter {adapter_name!r} does not fit the base model: {key} should be {shape} "
                                 f"(num_virtual_tokens x width) but the checkpoint has {tuple(state[key].shape)}")

        def load() -> None:
            requires_grad = any(p.requires_grad for p in encoder.parameters())
            encoder.load_saved(state)
            encoder.requires_grad_(requires_grad)

        return load

    # ---- the virtual tokens in a forward -------------------------------------------------------------
    def _prompts(self, batch_size: int, dtype: torch.dtype, task_ids) -> torch.Tensor:
        """[B, T, token_dim] embeddings of the active adapter's virtual tokens."""
        prompts = self[self.active_adapter].prompts(task_ids)
        return prompts.to(dtype).expand(batch_size, -1, -1)

    def _extend_mask(self, mask: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
        if mask is None:
            return None
        if mask.dim() != 2:
            raise NotImplementedError("prompt learning takes a 2-D attention mask [batch, seq] (as PEFT's forward)")
        ones = torch.ones(batch_size, self.active_config.num_virtual_tokens, dtype=mask.dtype, device=mask.device)
        return torch.cat((ones, mask), dim=1)

    def _pad_labels(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        if labels is None:
            return None
        pad = torch.full((labels.shape[0], self.active_config.num_virtual_tokens), IGNORE_INDEX,
                         dtype=labels.dtype, device=labels.device)
        return torch.cat((pad, labels), dim=1)

    def _check_task_ids(self, task_ids) -> None:
        if self.active_config.peft_type == PeftType.MULTITASK_PROMPT_TUNING and task_ids is None:
            raise ValueError("multitask prompt tuning needs task_ids (one task index per row) in forward and generate")

    def _position_ids(self, kwargs: dict, say: bool = True) -> None:
        """PEFT's rule: position ids move by the prefix length under prefix tuning, and are dropped (the
        model numbers the virtual tokens too) under the other methods."""
        if kwargs.get("position_ids") is None:
            return
        if self.active_config.peft_type == PeftType.PREFIX_TUNING:
            kwargs["position_ids"] = kwargs["position_ids"] + self.active_config.num_virtual_tokens
        else:
            if say:
                warn("position_ids are ignored with prompt learning (as in PEFT)")
            kwargs["position_ids"] = None

    def _input_embeds(self, input_ids, inputs_embeds) -> torch.Tensor:
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.word_embeddings(input_ids)
        return inputs_embeds

    def prefix_cache(self, batch_size: int, dtype: torch.dtype | None, encoder_decoder: bool = False):
        from fastlora.methods.prefix_tuning import build_prefix_cache

        return build_prefix_cache(self[self.active_adapter], self.active_config, batch_size, dtype,
                                  self.base.config, encoder_decoder)

    def forward_causal_lm(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                          task_ids=None, **kwargs):
        """PEFT's ``PeftModelForCausalLM.forward`` for prompt learning."""
        if not self.enabled:
            return self.base(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                             labels=labels, **kwargs)
        self._check_task_ids(task_ids)
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        config = self.active_config
        attention_mask = self._extend_mask(attention_mask, batch_size)
        self._position_ids(kwargs)
        _drop_token_type_ids(kwargs)
        if config.peft_type == PeftType.PREFIX_TUNING:
            kwargs[_cache_name(self.base)] = self.prefix_cache(batch_size, self.base.dtype)
            return self.base(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                             labels=labels, **kwargs)
        inputs_embeds = self._input_embeds(input_ids, inputs_embeds)
        prompts = self._prompts(batch_size, inputs_embeds.dtype, task_ids)
        inputs_embeds = torch.cat((prompts, inputs_embeds), dim=1)
        return self.base(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=self._pad_labels(labels),
                         **kwargs)

    def forward_classification(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                               task_ids=None, token_level: bool = False, **kwargs):
        """PEFT's sequence / token classification forward. Token classification also pads ``labels``
        for the virtual tokens (PEFT passes them on unpadded, and the loss fails on the length)."""
        if not self.enabled:
            return self.base(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                             labels=labels, **kwargs)
        self._check_task_ids(task_ids)
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        config = self.active_config
        attention_mask = self._extend_mask(attention_mask, batch_size)
        self._position_ids(kwargs)
        if config.peft_type == PeftType.PREFIX_TUNING:
            cache = self.prefix_cache(batch_size, self.base.dtype)
            kwargs.update(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask)
            name = _cache_name(self.base, None)
            if name is not None:
                return self.base(labels=labels, **kwargs, **{name: cache})
            return self._prefix_through_backbone(labels, token_level, cache, kwargs)
        if kwargs.get("token_type_ids") is not None:
            token_type_ids = kwargs["token_type_ids"]
            zeros = torch.zeros(batch_size, config.num_virtual_tokens, dtype=torch.long, device=token_type_ids.device)
            kwargs["token_type_ids"] = torch.cat((zeros, token_type_ids.long()), dim=1)
        inputs_embeds = self._input_embeds(input_ids, inputs_embeds)
        prompts = self._prompts(batch_size, inputs_embeds.dtype, task_ids)
        inputs_embeds = torch.cat((prompts, inputs_embeds), dim=1)
        if token_level:
            labels = self._pad_labels(labels)
        return self.base(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    def _prefix_through_backbone(self, labels, token_level: bool, cache, kwargs: dict):
        """Classifiers whose forward takes no cache (BERT's): run the backbone with the prefix, then the
        head and the loss as the task model does (PEFT's route)."""
        from transformers.modeling_outputs import SequenceClassifierOutput, TokenClassifierOutput

        base = self.base
        backbone_name = next((name for name, child in base.named_children() if hasattr(child, "config")), None)
        backbone = getattr(base, backbone_name) if backbone_name else None
        name = None if backbone is None else _cache_name(backbone, None)
        if name is None:
            raise NotImplementedError(f"prefix tuning for {type(base).__name__}: no part of it takes a cache "
                                      f"(past_key_values or cache)")
        kwargs[name] = cache
        return_dict = kwargs.pop("return_dict", None)
        return_dict = getattr(base.config, "return_dict", True) if return_dict is None else return_dict
        outputs = backbone(**kwargs, return_dict=True)
        features = outputs[0] if token_level or len(outputs) < 2 else outputs[1]  # tokens, or the pooled output
        if "dropout" in base._modules:
            features = base.dropout(features)
        names = list(self.active_config.modules_to_save or ())
        head = next(child for name, child in base.named_children() if any(n in name for n in names))
        logits = head(features)
        loss = None if labels is None else _classification_loss(base, logits, labels, token_level)
        if not return_dict:
            out = (logits,) + tuple(v for k, v in outputs.items() if k in ("hidden_states", "attentions"))
            return ((loss,) + out) if loss is not None else out
        output_class = TokenClassifierOutput if token_level else SequenceClassifierOutput
        return output_class(loss=loss, logits=logits, hidden_states=outputs.get("hidden_states"),
                            attentions=outputs.get("attentions"))

    def forward_seq2seq(self, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None,
                        decoder_attention_mask=None, decoder_inputs_embeds=None, labels=None, task_ids=None, **kwargs):
        """PEFT's ``PeftModelForSeq2SeqLM.forward`` for prompt learning: the virtual tokens go in front of
        the encoder's input; the decoder gets a prefix under prefix tuning, and the second half of a
        multitask prompt with ``num_transformer_submodules=2``."""
        base_kwargs = dict(decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                           decoder_inputs_embeds=decoder_inputs_embeds, labels=labels, **kwargs)
        if not self.enabled:
            return self.base(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                             **base_kwargs)
        self._check_task_ids(task_ids)
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        config = self.active_config
        self._position_ids(base_kwargs)
        if config.peft_type == PeftType.PREFIX_TUNING:
            base_kwargs["decoder_attention_mask"] = self._extend_mask(decoder_attention_mask, batch_size)
            base_kwargs[_cache_name(self.base)] = self.prefix_cache(batch_size, self.base.dtype, encoder_decoder=True)
            return self.base(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                             **base_kwargs)
        inputs_embeds = self._input_embeds(input_ids, inputs_embeds)
        prompts = self._prompts(batch_size, inputs_embeds.dtype, task_ids)
        virtual = config.num_virtual_tokens
        inputs_embeds = torch.cat((prompts[:, :virtual], inputs_embeds), dim=1)
        attention_mask = self._extend_mask(attention_mask, batch_size)
        if config.peft_type != PeftType.MULTITASK_PROMPT_TUNING or config.num_transformer_submodules == 1:
            return self.base(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **base_kwargs)
        # multitask with two submodules: the decoder's input gets the second half of the prompt, and the
        # labels are padded to match (PEFT's layout).
        if decoder_inputs_embeds is None and decoder_input_ids is None:
            decoder_input_ids = self.base._shift_right(labels)
        if decoder_inputs_embeds is None:
            decoder_inputs_embeds = self.word_embeddings(decoder_input_ids)
        base_kwargs.update(decoder_input_ids=None, labels=self._pad_labels(labels),
                           decoder_inputs_embeds=torch.cat((prompts[:, virtual:], decoder_inputs_embeds), dim=1))
        return self.base(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **base_kwargs)

    # ---- generate -----------------------------------------------------------------------------------
    def generate(self, *args, task_ids=None, **kwargs):
        """``generate`` with the virtual tokens: a forward pre-hook on the model, held for this call only,
        adds them at the prefill (prompt embeddings in front of the input, or the prefix in the cache)
        and widens the attention mask by the virtual tokens at every step. Nothing in transformers is
        replaced."""
        if not self.enabled:
            return self.base.generate(*args, **kwargs)
        self._check_task_ids(task_ids)
        config = self.active_config
        self._position_ids(kwargs)
        if self.base.config.is_encoder_decoder and config.peft_type != PeftType.PREFIX_TUNING:
            # the encoder runs once, on the prompted input embeddings, as PEFT does
            input_ids = kwargs.pop("input_ids", args[0] if args else None)
            if input_ids is None:
                raise ValueError("generate needs input_ids with prompt learning")
            embeds = self.word_embeddings(input_ids)
            prompts = self._prompts(embeds.shape[0], embeds.dtype, task_ids)
            kwargs["inputs_embeds"] = torch.cat((prompts[:, : config.num_virtual_tokens], embeds), dim=1)
            mask = self._extend_mask(kwargs.pop("attention_mask", None), embeds.shape[0])
            if mask is not None:
                kwargs["attention_mask"] = mask
            return self.base.generate(**kwargs)

        def pre_hook(module, hook_args, hook_kwargs):
            return hook_args, self._generation_step(hook_kwargs, task_ids)

        handle = self.base.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            return self.base.generate(*args, **kwargs)
        finally:
            handle.remove()

    def _generation_step(self, kwargs: dict[str, Any], task_ids) -> dict[str, Any]:
        config = self.active_config
        encoder_decoder = self.base.config.is_encoder_decoder
        cache_key = _cache_name(self.base)
        cache = kwargs.get(cache_key)
        ids_key = "decoder_input_ids" if encoder_decoder else "input_ids"
        embeds_key = "decoder_inputs_embeds" if encoder_decoder else "inputs_embeds"
        mask_key = "decoder_attention_mask" if encoder_decoder else "attention_mask"
        self._position_ids(kwargs, say=False)  # generate numbers the real tokens only
        tokens = kwargs.get(ids_key) if kwargs.get(ids_key) is not None else kwargs[embeds_key]
        batch_size = tokens.shape[0]
        kwargs[mask_key] = self._extend_mask(kwargs.get(mask_key), batch_size)
        if cache is not None and cache.get_seq_length() > 0:
            return kwargs  # a decoding step: the virtual tokens are in the cache already
        if config.peft_type == PeftType.PREFIX_TUNING:
            prefix = self.prefix_cache(batch_size, self.base.dtype, encoder_decoder)
            if cache is None:
                kwargs[cache_key] = prefix
            else:
                _fill_cache(cache, prefix)
            return kwargs
        embeds = self._input_embeds(kwargs.get("input_ids"), kwargs.get("inputs_embeds"))
        prompts = self._prompts(batch_size, embeds.dtype, task_ids)
        kwargs["inputs_embeds"] = torch.cat((prompts, embeds), dim=1)
        kwargs["input_ids"] = None
        return kwargs


def _fill_cache(cache, prefix) -> None:
    """Write the prefix into the (empty) cache that ``generate`` created, layer by layer."""
    from transformers import EncoderDecoderCache

    if isinstance(cache, EncoderDecoderCache):
        cache, prefix = cache.self_attention_cache, prefix.self_attention_cache
    for layer_idx, layer in enumerate(prefix.layers):
        cache.update(layer.keys, layer.values, layer_idx)


def _classification_loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor, token_level: bool):
    """The loss transformers' classification heads compute (problem_type picked as they pick it)."""
    num_labels = model.num_labels
    if token_level:
        return nn.functional.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    config = model.config
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        if num_labels == 1:
            return nn.functional.mse_loss(logits.squeeze(), labels.squeeze())
        return nn.functional.mse_loss(logits, labels)
    if config.problem_type == "single_label_classification":
        return nn.functional.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    return nn.functional.binary_cross_entropy_with_logits(logits, labels)


def _drop_token_type_ids(kwargs: dict) -> None:
    if kwargs.get("token_type_ids") is not None:
        warn("token_type_ids are ignored with prompt learning (as in PEFT)")
        kwargs["token_type_ids"] = None


def _cache_name(model: nn.Module, default: str | None = "past_key_values") -> str | None:
    """What ``model.forward`` calls its key/value cache: ``cache`` from transformers 5.24 on (which still
    takes ``past_key_values`` through its kwargs, with a warning), ``past_key_values`` before."""
    import inspect

    parameters = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), default)
