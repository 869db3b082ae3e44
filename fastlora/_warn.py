"""Warnings that point at the user's line.

A fixed ``stacklevel`` names one frame a fixed depth up, and fastlora reaches the same warning through
different depths: ``PeftModel.from_pretrained`` through ``torch.no_grad``'s wrapper, ``AutoPeftModel``
through one more frame, a model's forward through ``nn.Module.__call__`` and transformers' ``generate``.
``warn`` walks up instead, past every frame of fastlora and of the libraries it runs inside, to the first
frame of the caller's own code, and reports the warning there (what Python 3.12's ``skip_file_prefixes``
does). Its "shown once per location" then means once per line of the user's code, not once per process.

A leaf: it imports nothing of fastlora, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings

__all__ = ["warn"]

_FASTLORA = os.path.dirname(os.path.abspath(__file__)) + os.sep
# Packages whose frames lie between a user's call and fastlora's code: torch (no_grad's wrapper,
# nn.Module.__call__), transformers (generate, Trainer), accelerate's hooks; and the standard library's
# decorator helpers.
_LIBRARIES = ("torch", "transformers", "accelerate")
_STDLIB_FILES = {os.path.abspath(contextlib.__file__), os.path.abspath(functools.__file__)}


def _library_prefixes() -> tuple[str, ...]:
    """Asked at each warning (they are rare): a library imported after fastlora counts too."""
    prefixes = [_FASTLORA]
    for name in _LIBRARIES:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if path:
            prefixes.append(os.path.dirname(os.path.abspath(path)) + os.sep)
    return tuple(prefixes)


def _internal(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path in _STDLIB_FILES or path.startswith(_library_prefixes())


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` reported at the first frame outside fastlora and the libraries
    around it (the outermost frame when every frame is internal)."""
    frame = sys._getframe(1)
    level = 2  # the caller of warn
    while frame.f_back is not None and _internal(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
