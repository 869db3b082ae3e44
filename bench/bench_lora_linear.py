"""pytest-benchmark: one LoRA linear, base vs PEFT vs fastlora (providers and shapes: bench/lora_linear.py).

    python -m pytest bench/bench_lora_linear.py --benchmark-only [--bench-preset full]

Grouped by mode and shape, so each table lists the base matmul and every adapter variant of that shape.
"""

from __future__ import annotations

import pytest

from bench.common import measure_memory, pick_device
from bench.conftest import timed
from bench.lora_linear import Inputs, build, specs


def pytest_generate_tests(metafunc):
    if "spec" in metafunc.fixturenames:
        device = pick_device(metafunc.config.getoption("bench_device"))
        preset = metafunc.config.getoption("bench_preset")
        all_specs = specs(device, preset)
        metafunc.parametrize("spec", all_specs, ids=[spec.id for spec in all_specs])


@pytest.fixture(scope="module")
def inputs(bench_device, bench_dtype) -> Inputs:
    return Inputs(bench_device, bench_dtype)


def test_lora_linear(benchmark, spec, inputs, bench_device):
    call = build(spec, inputs)
    benchmark.group = f"lora_linear {spec.mode} M={spec.M} K={spec.K} N={spec.N}"
    benchmark.extra_info.update(provider=spec.provider, r=spec.r, dropout=spec.dropout)
    for _ in range(2):  # warm-up (first-call allocations, lazy initialisation) outside the timing
        call.fn()
    benchmark(timed(call.fn, bench_device))
    benchmark.extra_info.update(measure_memory(call, bench_device))
