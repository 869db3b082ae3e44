"""bench's runner and report. Without matplotlib (it is in the bench extra, not the test one) a run says
before it starts that it draws no plots, writes its tables as usual and exits 0, instead of ending in an
ImportError after the whole run. Each fastlora row carries its time over its rival's round by round (the
paired ratio), paired with the rival of the same adapter."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ ships with the repository, not the package
    sys.path.insert(0, str(ROOT))

from bench import __main__ as runner  # noqa: E402
from bench import lora_linear, report  # noqa: E402

pytest.importorskip("peft")


def test_without_matplotlib_a_run_and_its_report_write_the_tables_and_say_so_first(tmp_path, monkeypatch,
                                                                                 capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setitem(lora_linear.CPU_SHAPES, "quick", dict(kn=[(32, 48)], m=[4], r=[8], dropout=[0.0]))
    said_before_the_run = []
    run_op = runner.run_op

    def spy(*args, **kwargs):
        said_before_the_run.append(capsys.readouterr().err)
        return run_op(*args, **kwargs)

    monkeypatch.setattr(runner, "run_op", spy)
    assert runner.main(["--quick", "--ops", "lora_linear", "--device", "cpu", "--out", str(tmp_path),
                        "--budget", "0.001", "--modes", "full"]) == 0
    assert "no plots: matplotlib is not installed" in said_before_the_run[0]
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".csv", ".json", ".md"]

    (results,) = tmp_path.glob("*.json")
    results.with_suffix(".md").unlink()
    capsys.readouterr()
    assert report.main([str(results)]) == 0
    assert "no plots: matplotlib is not installed" in capsys.readouterr().err
    assert results.with_suffix(".md").exists() and not list(tmp_path.glob("*.png"))


def test_each_fastlora_row_carries_its_ratio_to_its_rival_round_by_round(tmp_path, monkeypatch):
    monkeypatch.setitem(lora_linear.CPU_SHAPES, "quick", dict(kn=[(32, 48)], m=[4], r=[8], dropout=[0.0, 0.1]))
    assert runner.main(["--quick", "--ops", "lora_linear", "--device", "cpu", "--out", str(tmp_path),
                        "--budget", "0.001", "--modes", "forward", "--no-plots"]) == 0
    (results,) = tmp_path.glob("*.json")
    rows, _ = report.read_json(results)
    ours = [r for r in rows if r["provider"] == "fastlora"]
    assert len(ours) == 2 and all(r["paired_lo"] <= r["paired_ratio"] <= r["paired_hi"] for r in ours)
    assert not any("paired_ratio" in r for r in rows if r["provider"] != "fastlora")
    text = results.with_suffix(".md").read_text()
    assert "paired (95%)" in text and "Paired, round by round: median" in text
    for r in ours:
        assert f"{r['paired_ratio']:.2f} ({r['paired_lo']:.2f}-{r['paired_hi']:.2f})" in text


def test_the_pair_is_the_rival_with_the_same_adapter():
    from bench.common import Stats

    group = [lora_linear.Spec("base", "forward", 4, 32, 48)]
    group += [lora_linear.Spec(p, "forward", 4, 32, 48, r, 0.0) for r in (8, 16) for p in ("peft", "fastlora")]
    seconds = {"base": 1.0, "peft": 2.0, "fastlora": 3.0}
    stats = {spec: Stats(1, 1, 1, samples=8, timer="perf_counter",
                         seconds=tuple(seconds[spec.provider] * (spec.r or 1) * (1 + i % 3) for i in range(8)))
             for spec in group}
    for spec in group:
        paired = runner._paired(spec, stats)
        if spec.provider == "fastlora":  # 3 r / 2 r in every round: its own rank's PEFT layer
            assert paired["paired_lo"] == paired["paired_ratio"] == paired["paired_hi"] == 1.5
        else:
            assert paired == {}
