"""pytest options for the benchmark files (pass the files explicitly: pyproject's testpaths is tests/).

    python -m pytest bench/bench_lora_linear.py bench/bench_train_step.py --benchmark-only
    python -m pytest bench/bench_lora_linear.py --benchmark-only --bench-preset full --bench-device cuda

Each test also records the memory numbers of ``bench.common.measure_memory`` in ``extra_info``
(see them with ``--benchmark-json``).
"""

from __future__ import annotations

import pytest
import torch

from bench.common import default_dtype, measure_memory, parse_dtype, pick_device


def pytest_addoption(parser):
    group = parser.getgroup("fastlora bench")
    group.addoption("--bench-preset", choices=("quick", "full"), default="quick",
                    help="shape grid of bench/*.py (default: quick)")
    group.addoption("--bench-device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    group.addoption("--bench-dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on cuda, fp32 on cpu)")


@pytest.fixture(scope="session")
def bench_device(pytestconfig) -> torch.device:
    return pick_device(pytestconfig.getoption("bench_device"))


@pytest.fixture(scope="session")
def bench_dtype(pytestconfig, bench_device) -> torch.dtype:
    name = pytestconfig.getoption("bench_dtype")
    return parse_dtype(name) if name else default_dtype(bench_device)


def parametrize_specs(metafunc, specs_for) -> None:
    """Parametrize a bench file's ``spec`` argument with ``specs_for(device, preset)``, one id per spec."""
    if "spec" in metafunc.fixturenames:
        device = pick_device(metafunc.config.getoption("bench_device"))
        all_specs = specs_for(device, metafunc.config.getoption("bench_preset"))
        metafunc.parametrize("spec", all_specs, ids=[spec.id for spec in all_specs])


def run_benchmark(benchmark, call, device: torch.device) -> None:
    """Warm ``call`` up outside the timing, time it, and put its memory numbers into ``extra_info``."""
    for _ in range(2):  # first-call allocations, lazy initialisation
        call.fn()
    benchmark(timed(call.fn, device))
    benchmark.extra_info.update(measure_memory(call, device))


def timed(fn, device: torch.device):
    """What pytest-benchmark times: ``fn``, and on CUDA the wait for its kernels."""
    if device.type != "cuda":
        return fn

    def synced():
        fn()
        torch.cuda.synchronize(device)

    return synced


def pytest_configure(config):
    # PEFT calls a transformers attribute that transformers 5 deprecates; not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore:.*is_gradient_checkpointing.*:FutureWarning")
