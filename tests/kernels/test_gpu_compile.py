"""Every kernel launch the launchers make compiles for NVIDIA GPUs (sm_80, sm_90), without a GPU.

The interpreter runs the kernels' Python, not triton's compiler: layouts, ``tl.join``/``tl.reshape``
lowering, dot shapes, register and shared-memory budgets are only checked by compiling. This runs
``_compile_for_gpu.py`` in a subprocess (the interpreter cannot be switched off in this process) on
real LLM shapes: fp32, fp16 and bf16, dropout on and off, decode (split-K) and training sizes, rank
buckets 16 to 256, a transposed Conv1D weight. The first run takes ~40 s on 2 CPU cores; triton's
cache makes later ones take seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HELPER = Path(__file__).with_name("_compile_for_gpu.py")


@pytest.mark.slow
def test_every_launch_compiles_for_nvidia_gpus():
    pytest.importorskip("triton.backends.nvidia", reason="triton without its NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(HELPER), "80", "90"], env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["failures"] == [], "\n\n".join(result["failures"])
    assert result["compiled"] >= 40  # every kernel, in many variants, for two targets
