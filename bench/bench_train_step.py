"""pytest-benchmark: one training step of a small Llama, frozen base vs PEFT vs fastlora, and QLoRA:
PEFT + bitsandbytes vs fastlora (model and providers: bench/train_step.py).

    python -m pytest bench/bench_train_step.py --benchmark-only
"""

from __future__ import annotations

import pytest

from bench.conftest import parametrize_specs, run_benchmark
from bench.train_step import Models, build, specs


def pytest_generate_tests(metafunc):
    parametrize_specs(metafunc, specs)


@pytest.fixture(scope="module")
def models(bench_device, bench_dtype) -> Models:
    return Models(bench_device, bench_dtype)


def test_train_step(benchmark, spec, models, bench_device):
    call = build(spec, models)
    benchmark.group = f"train_step tokens={spec.M} hidden={spec.hidden} mlp={spec.intermediate}"
    benchmark.extra_info.update(provider=spec.provider, dropout=spec.dropout, tokens=spec.M,
                                weights="nf4dq" if spec.quantized else "16-bit")
    run_benchmark(benchmark, call, bench_device)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tokens_per_s"] = spec.M / benchmark.stats.stats.median
