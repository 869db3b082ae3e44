"""Backend selection for fastlora's ops: ``FASTLORA_BACKEND`` = ``auto`` (default), ``reference`` or ``triton``.

``auto`` runs the fused Triton kernels on CUDA tensors when ``fastlora.kernels`` provides them and the
reference elsewhere; ``triton`` forces the kernels (on CPU tensors this needs ``TRITON_INTERPRET=1``);
``reference`` forces the pure-PyTorch path. A request the kernels cannot serve falls back to the
reference with a one-time warning that says why.
"""

from __future__ import annotations

import importlib
import os
from functools import lru_cache

import torch

from fastlora._warn import warn

BACKENDS = ("auto", "reference", "triton")

__all__ = ["BACKENDS", "get_backend", "resolve_backend", "load_kernels", "serving_kernels", "warn_once"]


def get_backend() -> str:
    """The backend asked for through ``FASTLORA_BACKEND`` (read on every call, so tests can switch it)."""
    raw = os.environ.get("FASTLORA_BACKEND")
    if raw is None:  # the common case, on every call of every layer
        return "auto"
    name = raw.strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"FASTLORA_BACKEND={name!r} is not one of {', '.join(BACKENDS)}")
    return name


# What ``fastlora.kernels`` must export to serve an op.
_ENTRY_POINTS = {
    "lora_linear": ("lora_linear_fwd", "lora_linear_bwd", "unsupported_reason"),
    "nf4_linear": ("nf4_linear_fwd", "nf4_linear_bwd", "nf4_unsupported_reason"),
    "multi_lora": ("multi_lora_add", "multi_lora_unsupported_reason"),
}


@lru_cache(maxsize=None)
def load_kernels(op: str):
    """The ``fastlora.kernels`` module providing ``op``, or the reason it cannot be used (a str)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    try:
        module = importlib.import_module("fastlora.kernels")
    except ImportError as err:
        return f"fastlora.kernels could not be imported ({err})"
    missing = [name for name in _ENTRY_POINTS.get(op, (op,)) if not hasattr(module, name)]
    if missing:
        return f"fastlora.kernels lacks {', '.join(missing)} in this version"
    return module


@lru_cache(maxsize=None)
def warn_once(reason: str) -> None:
    """Warn, once per distinct reason, that a call runs on the reference instead of the kernels."""
    warn(f"fastlora: using the reference implementation because {reason}", RuntimeWarning)


def resolve_backend(op: str, device: torch.device):
    """``None`` for the reference, else the kernels module to launch ``op`` from."""
    name = get_backend()
    if name == "reference":
        return None
    if name == "auto" and device.type != "cuda":
        return None
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        warn_once(f"FASTLORA_BACKEND=triton on {device.type} tensors needs TRITON_INTERPRET=1")
        return None
    module = load_kernels(op)
    if isinstance(module, str):
        warn_once(module)
        return None
    return module


def serving_kernels(op: str, device: torch.device, *call):
    """The kernels module when it serves this call of ``op``, else None (the reference), saying once why
    not. The kernels are asked through ``op``'s last entry point, its unsupported-reason function, with
    ``call``. An op's forward and backward both ask with the forward's inputs, so they always agree (the
    two backends draw different dropout masks)."""
    kernels = resolve_backend(op, device)
    if kernels is None:
        return None
    reason = getattr(kernels, _ENTRY_POINTS[op][-1])(*call)
    if reason is not None:
        warn_once(f"the Triton kernels do not cover this call: {reason}")
        return None
    return kernels
