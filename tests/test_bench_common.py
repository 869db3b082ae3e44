"""bench.common: what a results file says about the machine (and its name), the CPU timing loop's
halfway trade of weight copies (bench.lora_linear.trade_weights), and the paired ratio of two providers'
rounds with what the report calls beyond noise."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ ships with the repository, not the package
    sys.path.insert(0, str(ROOT))

from bench import lora_linear, report  # noqa: E402
from bench.common import Stats, _cpu_stats, environment, paired_ratio, time_calls  # noqa: E402


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


def _row(stats: Stats, **paired) -> dict:
    return {"p50_ms": stats.p50_ms, "p50_lo_ms": stats.p50_lo_ms, "p50_hi_ms": stats.p50_hi_ms, **paired}


def test_paired_ratio_sees_through_noise_that_slows_both_calls_of_a_round():
    # Spells of a shared machine: each round 1x to 3x slower, for both providers alike; ours is 5% slower.
    spell = random.Random(0)
    theirs = [0.01 * spell.uniform(1.0, 3.0) for _ in range(40)]
    ours = [t * 1.05 for t in theirs]
    a, b = _cpu_stats(ours), _cpu_stats(theirs)
    assert a.p50_lo_ms <= b.p50_hi_ms  # the two medians' intervals overlap: they cannot tell
    paired = paired_ratio(a, b)
    assert [paired[k] for k in ("paired_lo", "paired_ratio", "paired_hi")] == pytest.approx([1.05] * 3, rel=1e-12)
    assert report._clearly_slower(_row(a, **paired), _row(b)) and not report._clearly_faster(_row(a, **paired), _row(b))
    # Without the paired interval (a run saved before it existed) the overlap rule stays: not beyond noise.
    assert not report._clearly_slower(_row(a), _row(b))
    # The same spells with ours 5% faster.
    quicker = _cpu_stats([t * 0.95 for t in theirs])
    paired = paired_ratio(quicker, b)
    assert report._clearly_faster(_row(quicker, **paired), _row(b))
    assert not report._clearly_slower(_row(quicker, **paired), _row(b))


def test_paired_ratio_needs_rounds_that_pair_up():
    rounds = _cpu_stats([0.01 * (1 + i % 3) for i in range(10)])
    assert paired_ratio(rounds, Stats(1.0, 1.0, 1.0, samples=0, timer="do_bench")) == {}
    assert paired_ratio(rounds, _cpu_stats([0.01] * 12)) == {}  # 10 rounds against 12: not one run
    assert paired_ratio(_cpu_stats([0.01] * 4), _cpu_stats([0.02] * 4)) == {}  # too few rounds for an interval
    noisy = paired_ratio(rounds, _cpu_stats([0.01 * (1 + i % 2) for i in range(10)]))
    assert noisy["paired_lo"] < 1.0 < noisy["paired_hi"]  # ratios from 0.5 to 3: no verdict
