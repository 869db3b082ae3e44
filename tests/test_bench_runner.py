"""bench's runner and report without matplotlib (it is in the bench extra, not the test one): a run says
before it starts that it draws no plots, writes its tables as usual and exits 0, instead of ending in an
ImportError after the whole run."""

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
