"""pytest-benchmark: one linear layer with a 4-bit NF4 weight: dense F.linear vs dequantize + matmul vs
bitsandbytes vs fastlora, and LoRA over it, PEFT + bitsandbytes vs fastlora (providers and shapes:
bench/nf4_linear.py).

    python -m pytest bench/bench_nf4_linear.py --benchmark-only [--bench-preset full]

Grouped by mode and shape, so each table lists the dense base matmul and every 4-bit variant of that shape.
"""

from __future__ import annotations

import pytest

from bench.conftest import parametrize_specs, run_benchmark
from bench.nf4_linear import Inputs, build, specs


def pytest_generate_tests(metafunc):
    parametrize_specs(metafunc, specs)


@pytest.fixture(scope="module")
def inputs(bench_device, bench_dtype) -> Inputs:
    return Inputs(bench_device, bench_dtype)


def test_nf4_linear(benchmark, spec, inputs, bench_device):
    call = build(spec, inputs)
    benchmark.group = f"nf4_linear {spec.mode} M={spec.M} K={spec.K} N={spec.N}"
    benchmark.extra_info.update(provider=spec.provider, weights=spec.weights, r=spec.r, dropout=spec.dropout)
    run_benchmark(benchmark, call, bench_device)
