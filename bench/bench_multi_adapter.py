"""pytest-benchmark: one LoRA layer serving a mixed-adapter batch, base vs PEFT vs fastlora
(providers and workloads: bench/multi_adapter.py).

    python -m pytest bench/bench_multi_adapter.py --benchmark-only [--bench-preset full] [--bench-device cuda]

Grouped by workload, so each table lists the base layer, PEFT's mixed batch and fastlora's side by side.
``--bench-preset quick`` (the default) is the small CPU grid; ``full`` is BENCH.md's multi-adapter grid.
"""

from __future__ import annotations

import pytest

from bench.conftest import parametrize_specs, run_benchmark
from bench.multi_adapter import Workloads, build, specs


def pytest_generate_tests(metafunc):
    parametrize_specs(metafunc, specs)


@pytest.fixture(scope="module")
def work(bench_device, bench_dtype) -> Workloads:
    return Workloads(bench_device, bench_dtype)


def test_multi_adapter(benchmark, spec, work, bench_device):
    call = build(spec, work)
    benchmark.group = (f"multi_adapter {spec.phase} {spec.batch}x{spec.seq} K={spec.K} N={spec.N} "
                       f"adapters={spec.adapters} {spec.popularity} r={spec.ranks} base={spec.base_share:g}")
    benchmark.extra_info.update(provider=spec.provider, adapters=spec.adapters, popularity=spec.popularity,
                                ranks=spec.ranks, base_share=spec.base_share)
    try:
        run_benchmark(benchmark, call, bench_device)
    finally:
        if "context" in call.extra:
            call.extra["context"].close()
