"""The top-level name ``kernels`` belongs to Hugging Face's package; this folder only borrows it by accident.

Installed, this folder is ``fastlora.kernels`` and never meets the name. From a checkout's root on
``sys.path`` (``python -m pytest``, ``python -m bench``, a notebook started there) ``import kernels``
would find this folder before the installed ``kernels`` that transformers (>= 5.25, a hard dependency)
and bitsandbytes import, and both fail on names it does not have.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def hand_over(init_file: str) -> None:
    """Replace ``sys.modules["kernels"]`` (this folder, mid-import) by the installed ``kernels`` found on
    ``sys.path`` without the folder holding this one; the import statement then returns that module.
    Raises ``ModuleNotFoundError`` when none is installed, as the import would without this folder."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
    if spec is None or spec.loader is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels' (the folder kernels/ in a fastlora checkout is "
                                  "fastlora.kernels, not that package)", name="kernels")
    sys.modules.pop("kernels._shadowed", None)  # this module: no submodule of the package taking the name
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["kernels"]
        raise
