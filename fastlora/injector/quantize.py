"""Quantize a transformers model's linear layers to NF4 in place, and prepare it for QLoRA training.

``quantize_model`` swaps ``nn.Linear`` and GPT-2's ``Conv1D`` (weight transposed to ``[out, in]``, as
transformers' bitsandbytes integration does) for ``LinearNF4``; LoRA then wraps those like any linear.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from fastlora.injector.inject import conv1d_class, iter_modules, replace_module
from fastlora.injector.match import names_match
from fastlora.layers import LinearNF4, LoraLinear
from fastlora.layers.nf4 import check_nf4_entries
from fastlora.quant import BLOCKSIZES

__all__ = ["quantize_model", "prepare_model_for_kbit_training"]


def _skipped(key: str, skip) -> bool:
    """Whether module ``key`` or a module containing it is named in ``skip`` (exactly or as a dotted suffix)."""
    parts = key.split(".")
    return any(names_match(".".join(parts[:i]), list(skip)) for i in range(1, len(parts) + 1))


def _check_nf4_state_dict(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                          error_msgs) -> None:
    """Pre-load hook on a quantized model: every 4-bit layer's entries are checked before any tensor of
    the model is written, so a bad checkpoint raises with the layer's name and changes nothing."""
    for name, layer in module.named_modules():
        if isinstance(layer, LinearNF4) and prefix + name + ".weight" in state_dict:
            check_nf4_entries(state_dict, f"{prefix}{name}.", name, layer.out_features, layer.in_features,
                              layer.weight.device)


def quantize_model(
    model: nn.Module,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
    compute_dtype: torch.dtype | None = None,
    skip: tuple[str, ...] | list[str] = ("lm_head",),
    quant_storage: torch.dtype = torch.uint8,
) -> nn.Module:
    """Replace every linear layer of ``model`` (except those named in ``skip``) by a 4-bit ``LinearNF4``,
    quantized on the layer's device with bitsandbytes' format. Returns ``model``.

    ``compute_dtype``: the dtype the layers compute in (default: the input's). ``quant_storage``: the
    dtype the packed bytes are viewed as in the state dict (bitsandbytes' ``bnb_4bit_quant_storage``).
    On any error the model is left as it was.
    """
    if quant_type != "nf4":
        raise ValueError(f"quant_type {quant_type!r} is not supported: fastlora quantizes to 'nf4'")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if isinstance(skip, str):
        skip = (skip,)
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise ValueError("the model already has LoRA layers: quantize the base model before adding adapters")
    conv1d = conv1d_class()
    selected = [
        (key, module) for key, module in iter_modules(model)
        if (type(module) is nn.Linear or (conv1d is not None and isinstance(module, conv1d)))
        and not _skipped(key, skip)
    ]
    if not selected:
        raise ValueError(f"no linear layer to quantize (skip={list(skip)})")
    done: list[tuple[str, nn.Module]] = []
    try:
        for key, module in tqdm(selected, desc="quantizing to NF4", unit="layer", disable=None):
            new = LinearNF4.from_linear(
                module, blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype,
                quant_storage=quant_storage, transpose=conv1d is not None and isinstance(module, conv1d),
            )
            replace_module(model, key, new)
            done.append((key, module))
    except BaseException:
        for key, module in reversed(done):
            replace_module(model, key, module)
        raise
    if not getattr(model, "_fastlora_nf4_hook", False):
        model.register_load_state_dict_pre_hook(_check_nf4_state_dict)
        model._fastlora_nf4_hook = True
    return model


def prepare_model_for_kbit_training(
    model: nn.Module, use_gradient_checkpointing: bool = True, gradient_checkpointing_kwargs: dict | None = None
) -> nn.Module:
    """PEFT's recipe before adding LoRA to a 4-bit model: freeze every weight, keep 16-bit parameters
    (norms, embeddings, head) in fp32 for stable training, and turn on gradient checkpointing with
    inputs that require grad (so reentrant checkpointing sees a grad path through the frozen base)."""
    for param in model.parameters():
        param.requires_grad_(False)
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    if use_gradient_checkpointing:
        kwargs = dict(gradient_checkpointing_kwargs or {})
        if kwargs.get("use_reentrant", True):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            else:
                model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
        # transformers 5 renamed gradient checkpointing to activation checkpointing (the old name warns).
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)
    return model
