"""pytest-benchmark: one LoRA linear, base vs PEFT vs fastlora (providers and shapes: bench/lora_linear.py).

    python -m pytest bench/bench_lora_linear.py --benchmark-only [--bench-preset full]

Grouped by mode and shape, so each table lists the base matmul and every adapter variant of that shape.
"""

from __future__ import annotations

import pytest

from bench.conftest import parametrize_specs, run_benchmark
from bench.lora_linear import Inputs, build, specs


def pytest_generate_tests(metafunc):
    parametrize_specs(metafunc, specs)


@pytest.fixture(scope="module")
def inputs(bench_device, bench_dtype) -> Inputs:
    return Inputs(bench_device, bench_dtype)


def test_lora_linear(benchmark, spec, inputs, bench_device):
    call = build(spec, inputs)
    benchmark.group = f"lora_linear {spec.mode} M={spec.M} K={spec.K} N={spec.N}"
    benchmark.extra_info.update(provider=spec.provider, r=spec.r, dropout=spec.dropout)
    run_benchmark(benchmark, call, bench_device)
