"""PEFT's adapter checkpoint format: ``adapter_config.json`` + ``adapter_model.safetensors``.

On disk the adapter name is stripped from keys (``...q_proj.lora_A.weight``) and a modules_to_save
copy is stored under the wrapped module's own name (``...classifier.weight``). The default adapter
lives at the root of the folder, any other in ``folder/<name>/``. Writes are atomic for the pair of
files: a crash leaves the previous adapter, or a folder with no config (which does not load), never a
new config over old weights.
"""

from __future__ import annotations

import os
import tempfile

import torch
from torch import nn

from fastlora._warn import warn
from fastlora.config import CONFIG_NAME, PeftConfig
from fastlora.layers import ModulesToSaveWrapper

__all__ = [
    "WEIGHTS_NAME",
    "LEGACY_WEIGHTS_NAME",
    "adapter_folder",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "save_adapter",
    "load_adapter_weights",
    "STRICT_ADAPTER_CHECKS",
    "AdapterKeysError",
    "strict_mode",
]

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
MODULES_TO_SAVE = "modules_to_save"


# PEFT 0.22's ``strict_adapter_check``: what loading does when checkpoint and adapter disagree on tensor
# names. fastlora's default is "error" (PEFT's is "warn"): a partly loaded adapter computes something
# else than the one that was saved, and says so only in a warning.
STRICT_ADAPTER_CHECKS = ("error", "warn", "ignore")


class AdapterKeysError(ValueError, RuntimeError):
    """The checkpoint's tensor names do not match the adapter's. A ValueError as fastlora's load errors are,
    and a RuntimeError as PEFT's ``strict_adapter_check="error"`` raises."""


def strict_mode(strict_adapter_check: str | None) -> str:
    """``strict_adapter_check`` checked (None: fastlora's default, "error"), before anything is touched."""
    if strict_adapter_check is None:
        return "error"
    if strict_adapter_check not in STRICT_ADAPTER_CHECKS:
        raise ValueError(f"strict_adapter_check must be one of {', '.join(map(repr, STRICT_ADAPTER_CHECKS))}, "
                         f"got {strict_adapter_check!r}")
    return strict_adapter_check


def _report_keys(adapter_name: str, unexpected: list[str], missing: list[str], strict: str) -> None:
    """Raise (``strict`` "error"), warn or say nothing about tensors the model has no place for and
    adapter tensors the checkpoint lacks."""
    if strict == "ignore" or not (unexpected or missing):
        return
    problems = []
    if unexpected:
        problems.append(f"has tensors the model has no place for (targets differ from the config?): "
                        f"{_some(unexpected)}")
    if missing:
        problems.append(f"lacks {_some(missing)}")
    message = f"adapter {adapter_name!r}: the checkpoint " + "; it ".join(problems)
    if strict == "error":
        raise AdapterKeysError(message + ". Nothing was loaded; strict_adapter_check='warn' loads the tensors "
                               "that match and leaves the others as initialized")
    warn(message + "; the tensors that match were loaded, the others keep their initial values")


def _some(keys: list[str]) -> str:
    return f"{keys[:5]}{' ...' if len(keys) > 5 else ''}"


def adapter_folder(root: str | os.PathLike, adapter_name: str) -> str:
    return os.fspath(root) if adapter_name == "default" else os.path.join(root, adapter_name)


def _method_hooks(model: nn.Module):
    """The tuner of a method whose tensors are not ``<prefix>.<adapter>`` keys (prompt learning, adaption
    prompt): it names and checks them itself, through ``adapter_state_dict`` and ``adapter_state_loader``."""
    tuner = getattr(model, "_tuner", None)
    return tuner if hasattr(type(tuner), "adapter_state_loader") else None


def _tuner_hook(model: nn.Module, name: str):
    """The tuner's optional ``adapter_state_to_save`` / ``adapter_state_to_load(state, adapter_name) -> state``:
    a method whose saved tensors differ from its live ones (AdaLoRA keeps only the ranks it allocated)."""
    tuner = getattr(model, "_tuner", model)
    return getattr(tuner, name) if hasattr(type(tuner), name) else None


def _wrapper_prefixes(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)]


def get_peft_model_state_dict(model: nn.Module, state_dict: dict | None = None, adapter_name: str = "default",
                              prefix: str = "lora_") -> dict[str, torch.Tensor]:
    """The tensors PEFT saves for ``adapter_name``, under PEFT's on-disk keys."""
    config = model.peft_config[adapter_name]
    state_dict = model.state_dict() if state_dict is None else state_dict
    wrappers = _wrapper_prefixes(model)
    out: dict[str, torch.Tensor] = {}
    adapter_layers: set[str] = set()
    hooks = _method_hooks(model)
    if hooks is not None:
        out.update(hooks.adapter_state_dict(adapter_name))
    for key, value in state_dict.items():
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if hooks is None and part.startswith(prefix) and parts[i + 1] == adapter_name:
                out[".".join(parts[: i + 1] + parts[i + 2 :])] = value
                adapter_layers.add(".".join(parts[:i]))
                break
        else:
            marker = f".{MODULES_TO_SAVE}.{adapter_name}."
            if marker in key and any(key.startswith(w + ".") for w in wrappers):
                out[key.replace(marker, ".")] = value
    bias = getattr(config, "bias", "none")
    in_wrapper = lambda key: any(key.startswith(w + ".") for w in wrappers)  # noqa: E731
    if bias == "all":
        out.update({k: v for k, v in state_dict.items() if k.endswith("bias") and prefix not in k and not in_wrapper(k)})
    elif bias == "lora_only":
        for layer in adapter_layers:
            key = f"{layer}.base_layer.bias"
            if key in state_dict:
                out[key] = state_dict[key]
    to_save = _tuner_hook(model, "adapter_state_to_save")
    if to_save is not None:
        out = to_save(out, adapter_name)
    return {k: v.detach() for k, v in out.items()}


def _load_key(key: str, adapter_name: str, wrappers: list[str], prefix: str) -> str:
    """On-disk key -> in-memory key of ``adapter_name`` (the inverse of ``get_peft_model_state_dict``)."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith(prefix):
            return ".".join(parts[: i + 1] + [adapter_name] + parts[i + 1 :])
    if parts[-1].startswith(prefix):  # a tensor held in a ParameterDict (IA3's ``ia3_l``, LoHa's ``hada_w1_a``)
        return f"{key}.{adapter_name}"
    for wrapper in wrappers:
        if key.startswith(wrapper + "."):
            return f"{wrapper}.{MODULES_TO_SAVE}.{adapter_name}.{key[len(wrapper) + 1:]}"
    return key


@torch.no_grad()
def set_peft_model_state_dict(model: nn.Module, peft_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default", prefix: str = "lora_",
                              strict_adapter_check: str | None = None) -> None:
    """Load saved adapter tensors into ``adapter_name``. Every key, shape and expected tensor is checked
    first; on a shape mismatch nothing is loaded and the error names the module and both shapes.

    Tensors the model has no place for, or adapter tensors the checkpoint lacks, follow
    ``strict_adapter_check`` (``STRICT_ADAPTER_CHECKS``; None: "error", which loads nothing). Prompt
    learning and adaption prompt check their own tensors, and always strictly.
    """
    strict = strict_mode(strict_adapter_check)
    wrappers = _wrapper_prefixes(model)
    to_load = _tuner_hook(model, "adapter_state_to_load")
    if to_load is not None:
        peft_state_dict = to_load(peft_state_dict, adapter_name)
    current = model.state_dict(keep_vars=True)
    hooks = _method_hooks(model)
    load_own = None
    if hooks is not None:  # the method checks its own tensors first; modules_to_save copies follow below
        own = {k: v for k, v in peft_state_dict.items() if not any(k.startswith(w + ".") for w in wrappers)}
        load_own = hooks.adapter_state_loader(own, adapter_name)
        peft_state_dict = {k: v for k, v in peft_state_dict.items() if k not in own}
    # PEFT's bias="all" also writes a wrapper's inner tensors (``classifier.modules_to_save.bias``,
    # ``classifier.original_module.bias``) beside ``classifier.bias``; PEFT skips them on load, so do we.
    inner = tuple(f"{w}.{part}." for w in wrappers for part in (MODULES_TO_SAVE, "original_module"))
    mapped = {
        _load_key(k, adapter_name, wrappers, prefix): (k, v)
        for k, v in peft_state_dict.items()
        if not k.startswith(inner)
    }
    unexpected = sorted(saved for key, (saved, _) in mapped.items() if key not in current)
    mapped = {key: item for key, item in mapped.items() if key in current}
    for key, (saved, value) in mapped.items():
        if tuple(value.shape) != tuple(current[key].shape):
            module = key.rsplit(".", 1)[0]
            raise ValueError(
                f"adapter {adapter_name!r} does not fit the base model: {module} expects "
                f"{tuple(current[key].shape)} for {saved!r} but the checkpoint has {tuple(value.shape)}"
            )
    owned = [
        k for k in current
        if (hooks is None and (f".{adapter_name}." in k or k.endswith(f".{adapter_name}"))
            and any(p.startswith(prefix) for p in k.split(".")))
        or f".{MODULES_TO_SAVE}.{adapter_name}." in k
    ]
    missing = sorted(k for k in owned if k not in mapped)
    _report_keys(adapter_name, unexpected, missing, strict)
    for key, (_, value) in mapped.items():
        current[key].copy_(value.to(current[key].dtype))
    if load_own is not None:
        load_own()


def load_adapter_weights(folder: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read ``adapter_model.safetensors`` (or PEFT's legacy ``adapter_model.bin``) with a clear error
    for a missing, truncated or corrupted file.
    """
    path = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device=str(device))
        except (SafetensorError, OSError, RuntimeError, ValueError) as err:
            raise ValueError(f"cannot read adapter weights {path!r}: the file is truncated or corrupted ({err})") from None
    legacy = os.path.join(folder, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(legacy):
        try:
            return torch.load(legacy, map_location=device, weights_only=True)
        except Exception as err:  # torch raises several types for a damaged pickle/zip
            raise ValueError(f"cannot read adapter weights {legacy!r}: {err}") from None
    raise FileNotFoundError(f"no {WEIGHTS_NAME} in {os.fspath(folder)!r}")


def save_adapter(folder: str | os.PathLike, state_dict: dict[str, torch.Tensor], config: PeftConfig,
                 safe_serialization: bool = True) -> None:
    """Write config and weights so that the folder holds the old adapter, or the new one, or no config."""
    from safetensors.torch import save_file

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    weights_name = WEIGHTS_NAME if safe_serialization else LEGACY_WEIGHTS_NAME
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    with tempfile.TemporaryDirectory(prefix=".fastlora-save-", dir=folder) as tmp:
        tmp_weights = os.path.join(tmp, weights_name)
        if safe_serialization:
            save_file(tensors, tmp_weights, metadata={"format": "pt"})
        else:
            torch.save(tensors, tmp_weights)
        config.save_pretrained(tmp)
        for name in (weights_name, CONFIG_NAME):
            with open(os.path.join(tmp, name), "rb") as fh:
                os.fsync(fh.fileno())
        config_path = os.path.join(folder, CONFIG_NAME)
        if os.path.exists(config_path):
            os.remove(config_path)  # until the new config lands, the folder holds no loadable adapter
        os.replace(tmp_weights, os.path.join(folder, weights_name))
        os.replace(os.path.join(tmp, CONFIG_NAME), config_path)
