"""bench.common: what a results file says about the machine (and its name), and the CPU timing loop's
halfway trade of weight copies (bench.lora_linear.trade_weights)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ ships with the repository, not the package
    sys.path.insert(0, str(ROOT))

from bench import lora_linear  # noqa: E402
from bench.common import environment, time_calls  # noqa: E402


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


def test_time_calls_runs_halfway_once_between_the_rounds():
    log = []
    time_calls({"a": lambda: log.append("a"), "b": lambda: log.append("b")}, torch.device("cpu"),
               budget_s=0.0, min_rounds=6, warmup_rounds=1, halfway=lambda: log.append("half"))
    assert log.count("half") == 1
    timed = log[2:]  # after the warm-up round
    assert timed.index("half") == 6 and len(timed) == 13


def test_trade_weights_swaps_each_pair_and_changes_no_output():
    inputs = lora_linear.Inputs(torch.device("cpu"), torch.float32)
    group = [spec for spec in lora_linear.specs(torch.device("cpu"), "quick", modes=["forward_nograd"])
             if spec.M == 16]
    calls = {spec: lora_linear.build(spec, inputs) for spec in group}
    before = {spec: call.fn() for spec, call in calls.items()}
    pairs = [[inputs.layer(p, spec.K, spec.N, spec.r, spec.dropout).base_layer.weight for p in ("peft", "fastlora")]
             for spec in group if spec.provider == "fastlora"]
    storages = [[w.data_ptr() for w in pair] for pair in pairs]
    assert len(pairs) == 2 and all(a != b for a, b in storages)
    trade = lora_linear.trade_weights(inputs, group)
    trade()
    assert [[w.data_ptr() for w in pair] for pair in pairs] == [s[::-1] for s in storages]
    for spec, call in calls.items():
        if spec.dropout in (None, 0.0):
            torch.testing.assert_close(call.fn(), before[spec], rtol=0, atol=0)
    trade()
    assert [[w.data_ptr() for w in pair] for pair in pairs] == storages
