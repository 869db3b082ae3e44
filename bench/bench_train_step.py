"""pytest-benchmark: one training step of a small Llama, frozen base vs PEFT vs fastlora
(model and providers: bench/train_step.py).

    python -m pytest bench/bench_train_step.py --benchmark-only
"""

from __future__ import annotations

import pytest

from bench.common import measure_memory, pick_device
from bench.conftest import timed
from bench.train_step import Models, build, specs


def pytest_generate_tests(metafunc):
    if "spec" in metafunc.fixturenames:
        device = pick_device(metafunc.config.getoption("bench_device"))
        all_specs = specs(device, metafunc.config.getoption("bench_preset"))
        metafunc.parametrize("spec", all_specs, ids=[spec.id for spec in all_specs])


@pytest.fixture(scope="module")
def models(bench_device, bench_dtype) -> Models:
    return Models(bench_device, bench_dtype)


def test_train_step(benchmark, spec, models, bench_device):
    call = build(spec, models)
    benchmark.group = f"train_step tokens={spec.M} hidden={spec.hidden}"
    benchmark.extra_info.update(provider=spec.provider, dropout=spec.dropout, tokens=spec.M)
    for _ in range(2):  # warm-up (first-call allocations, lazy initialisation) outside the timing
        call.fn()
    benchmark(timed(call.fn, bench_device))
    benchmark.extra_info.update(measure_memory(call, bench_device))
    benchmark.extra_info["tokens_per_s"] = spec.M / benchmark.stats.stats.median
