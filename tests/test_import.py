"""``import fastlora`` stays light: no triton, no CUDA initialisation (DESIGN: works with no GPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_PROBE = """
import json, sys
import torch
import fastlora
from fastlora import LoraConfig, LoraLinear, lora_linear, get_peft_model  # the public surface
import fastlora.ops, fastlora.layers, fastlora.injector, fastlora.reference
print(json.dumps({
    "cuda_initialized": torch.cuda.is_initialized(),
    "triton": sorted(m for m in sys.modules if m == "triton" or m.startswith("triton.")),
    "kernels": "fastlora.kernels" in sys.modules,
    "all": sorted(fastlora.__all__),
    "missing": sorted(n for n in fastlora.__all__ if not hasattr(fastlora, n)),
}))
"""


@pytest.fixture(scope="module")
def probe() -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_does_not_initialize_cuda(probe):
    assert probe["cuda_initialized"] is False


def test_import_does_not_import_triton_or_kernels(probe):
    assert probe["triton"] == []
    assert probe["kernels"] is False


def test_public_api_is_importable(probe):
    assert probe["missing"] == []
    for name in ("LoraConfig", "PeftConfig", "get_peft_model", "PeftModel", "LoraLinear", "lora_linear"):
        assert name in probe["all"]


def test_probe_would_see_triton_if_imported():
    # The check above can fail: the same probe notices a triton import when there is one to notice.
    code = "import sys, types; sys.modules['triton'] = types.ModuleType('triton'); " + _PROBE.split("import torch", 1)[1]
    code = "import json, torch\n" + code
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1])["triton"] == ["triton"]


def test_setup_installs_every_package():
    """A wheel holds exactly the packages setup.py names: every folder of fastlora/ with an __init__.py
    must be among them (an editable install would hide a missing one)."""
    from pathlib import Path
    from unittest import mock

    import runpy

    root = Path(__file__).resolve().parent.parent
    captured = {}
    with mock.patch("setuptools.setup", lambda **kw: captured.update(kw)):
        cwd = Path.cwd()
        try:
            import os

            os.chdir(root)  # setup.py reads README.md relative to its folder
            runpy.run_path(str(root / "setup.py"))
        finally:
            os.chdir(cwd)
    on_disk = {".".join(p.parent.relative_to(root).parts) for p in (root / "fastlora").rglob("__init__.py")}
    assert on_disk <= set(captured["packages"]), sorted(on_disk - set(captured["packages"]))
    assert "fastlora.kernels" in captured["packages"] and captured["package_dir"] == {"fastlora.kernels": "kernels"}


_REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def test_checkout_root_does_not_pose_as_hf_kernels():
    """From a checkout's root (``python -m pytest`` puts it first on sys.path) ``import kernels`` is Hugging
    Face's package, which transformers imports at import time, not the folder that installs as
    fastlora.kernels; that folder stays importable as fastlora.kernels."""
    pytest.importorskip("kernels")  # the installed one (this process runs from the root too)
    code = ("import kernels, json, sys, fastlora.kernels as ours; import transformers.integrations.hub_kernels; "
            "print(json.dumps([kernels.__file__, ours.__file__, hasattr(ours, 'lora_linear_fwd'), "
            "sorted(m for m in sys.modules if m.startswith('kernels._shadowed'))]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=_REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    theirs, ours, has_kernels, leftovers = json.loads(out.stdout.strip().splitlines()[-1])
    assert not theirs.startswith(str(_REPO_ROOT / "kernels"))
    assert ours == str(_REPO_ROOT / "kernels" / "__init__.py") and has_kernels and leftovers == []


def test_checkout_root_without_hf_kernels_is_module_not_found():
    code = f"import sys; sys.path[:] = [{str(_REPO_ROOT)!r}]; import kernels"
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=_REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "ModuleNotFoundError: No module named 'kernels'" in out.stderr, out.stderr
    assert "fastlora.kernels" in out.stderr
