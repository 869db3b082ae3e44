"""bench.common.environment: what a results file says about the machine, and its name."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ ships with the repository, not the package
    sys.path.insert(0, str(ROOT))

from bench.common import environment  # noqa: E402


def _cpuinfo(family: int, model: int, flags: str) -> str:
    core = f"processor\t: {{}}\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel\t\t: {model}\n" \
           f"model name\t: AMD EPYC\nflags\t\t: fpu sse2 {flags}\n\n"
    return core.format(0) + core.format(1)


def test_two_cpu_generations_with_one_model_name_get_two_file_names():
    zen3 = environment(torch.device("cpu"), _cpuinfo(25, 1, "avx avx2 fma"))
    zen5 = environment(torch.device("cpu"), _cpuinfo(26, 2, "avx2 avx512f avx512bw"))
    threads = torch.get_num_threads()
    assert zen3.slug == "cpu_amd-epyc-f25m1" and zen5.slug == "cpu_amd-epyc-f26m2"
    assert zen3.device == f"cpu AMD EPYC (family 25 model 1 avx2, {threads} threads)"
    assert zen5.device == f"cpu AMD EPYC (family 26 model 2 avx512, {threads} threads)"


def test_a_cpu_without_family_numbers_keeps_its_plain_name():
    env = environment(torch.device("cpu"), "processor\t: 0\nmodel name\t: Some CPU 3000\n")
    assert env.slug == "cpu_some-cpu-3000"
    assert env.device == f"cpu Some CPU 3000 ({torch.get_num_threads()} threads)"
