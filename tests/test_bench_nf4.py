"""The NF4 benchmarks (bench/nf4_linear.py, the QLoRA rows of bench/train_step.py) on tiny shapes: every
provider and mode runs, the agreement checks pass on honest layers and catch a wrong one, and the runner
writes the rows and tables the README describes."""

from __future__ import annotations

import csv
import sys
import warnings
from pathlib import Path

import pytest
import torch

import fastlora

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ ships with the repository, not the package
    sys.path.insert(0, str(ROOT))

from bench import __main__ as runner  # noqa: E402
from bench import nf4_linear, train_step  # noqa: E402
from bench.common import MODES  # noqa: E402

CPU = torch.device("cpu")
K, N = 128, 192  # K a multiple of the blocksize, as every benchmark shape


def _inputs():
    return nf4_linear.Inputs(CPU, torch.float32)


@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4dq"])
def test_every_provider_and_mode_runs_and_agrees(double_quant):
    inputs = _inputs()
    assert nf4_linear.check_outputs(inputs, 4, K, N, double_quant, r=8) == []
    for mode in MODES:
        specs = [nf4_linear.Spec("base", mode, 4, K, N)]
        specs += [nf4_linear.Spec(p, mode, 4, K, N, double_quant) for p in nf4_linear.QUANT_PROVIDERS]
        specs += [nf4_linear.Spec(p, mode, 4, K, N, double_quant, 8, 0.1) for p in nf4_linear.QLORA_PROVIDERS]
        for spec in specs:
            call = nf4_linear.build(spec, inputs)
            call.fn()
            call.reset()
    x, _ = inputs.x_dy(4, K, N)
    assert x.grad is None  # reset drops the gradients the calls made
    bnb_layer = inputs.layer(nf4_linear.Spec("bnb", "full", 4, K, N, double_quant))
    assert type(bnb_layer).__name__ == "Linear4bit"
    peft_layer = inputs.layer(nf4_linear.Spec("peft_bnb", "full", 4, K, N, double_quant, 8, 0.1))
    assert type(peft_layer).__module__ == "peft.tuners.lora.bnb"  # PEFT's bnb layer, as for a 4-bit model


def test_checks_catch_a_wrong_weight_and_wrong_adapters():
    inputs = _inputs()
    ours = inputs.layer(nf4_linear.Spec("fastlora", "forward", 4, K, N, False))
    with torch.no_grad():
        ours.weight[:10] ^= 0x11  # other levels for 20 weights
    qlora = inputs.layer(nf4_linear.Spec("fastlora_qlora", "forward", 4, K, N, False, 8, 0.0))
    with torch.no_grad():
        qlora.lora_B["default"].weight.mul_(1.5)
    problems = nf4_linear.check_outputs(inputs, 4, K, N, False, r=8)
    text = "\n".join(problems)
    assert "different packed bytes" in text
    assert "fastlora vs bitsandbytes" in text and "fastlora vs dequantize+F.linear" in text
    assert "fastlora_qlora vs peft_bnb (y)" in text and "fastlora_qlora vs peft_bnb (dA)" in text


def test_the_4bit_weight_must_be_the_dense_one():
    inputs = _inputs()
    ours = inputs.layer(nf4_linear.Spec("fastlora", "forward", 4, K, N, False))
    ours.quant_state.absmax.mul_(2.0)  # same bytes, twice the scale: no longer the benchmark's W
    assert any(p.startswith("fastlora vs dense") for p in nf4_linear.check_outputs(inputs, 4, K, N, False, r=None))


def _rows(path: Path) -> list[dict]:
    (csv_path,) = path.glob("*.csv")
    with csv_path.open() as f:
        return list(csv.DictReader(f))


def _check_warnings(record) -> list[str]:
    return [str(w.message) for w in record if str(w.message).startswith(("nf4_linear M=", "train_step:"))]


def test_runner_writes_nf4_rows_and_tables(tmp_path, monkeypatch):
    monkeypatch.setitem(nf4_linear.CPU_SHAPES, "quick", dict(kn=[(K, N)], m=[4], r=[8], dropout=[0.0],
                                                            double_quant=[False, True]))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert runner.main(["--quick", "--ops", "nf4_linear", "--device", "cpu", "--out", str(tmp_path),
                            "--no-plots", "--budget", "0.001", "--modes", "full"]) == 0
    assert _check_warnings(record) == []
    rows = _rows(tmp_path)
    got = {(r["mode"], r["provider"], r["dtype"]) for r in rows}
    assert ("full", "base", "float32") in got
    for provider in nf4_linear.PROVIDERS[1:]:
        assert {("full", provider, "nf4/float32"), ("full", provider, "nf4dq/float32")} <= got, provider
    assert len(rows) == 1 + 2 * 5
    assert all(float(r["p50_ms"]) > 0 and float(r["ratio_to_base"]) > 0 for r in rows)
    (md,) = tmp_path.glob("*.md")
    text = md.read_text()
    assert "| full | 4 | 128 | 192 | nf4dq |" in text  # the 4-bit matmul table
    assert "fastlora/PEFT+bnb" in text and "fastlora/bitsandbytes time over 2 comparisons" in text


def test_runner_writes_qlora_train_step_rows(tmp_path, monkeypatch):
    tiny = dict(hidden_size=64, num_hidden_layers=1, intermediate_size=128, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=128, batch=1, seq=16)
    monkeypatch.setitem(train_step.CONFIGS, "cpu", tiny)
    monkeypatch.setattr(train_step, "QLORA_CPU_INTERMEDIATE", 192)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert runner.main(["--quick", "--ops", "train_step", "--quant", "nf4", "--device", "cpu",
                            "--out", str(tmp_path), "--no-plots", "--budget", "0.001"]) == 0
    assert _check_warnings(record) == []
    rows = _rows(tmp_path)
    assert [(r["provider"], r["dtype"], r["dropout"], r["N"]) for r in rows] == [
        ("base", "float32", "", "192"),
        ("peft_bnb", "nf4dq/float32", "0", "192"), ("fastlora_qlora", "nf4dq/float32", "0", "192"),
        ("peft_bnb", "nf4dq/float32", "0.05", "192"), ("fastlora_qlora", "nf4dq/float32", "0.05", "192"),
    ]
    (md,) = tmp_path.glob("*.md")
    assert "| fastlora_qlora | nf4dq | 0.05 | 16 | 64 / 192 |" in md.read_text()


def test_train_step_check_catches_different_adapters(monkeypatch):
    tiny = dict(hidden_size=64, num_hidden_layers=1, intermediate_size=128, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=128, batch=1, seq=16)
    monkeypatch.setitem(train_step.CONFIGS, "cpu", tiny)
    monkeypatch.setattr(train_step, "QLORA_CPU_INTERMEDIATE", 192)
    specs = [s for s in train_step.specs(CPU, "quick", quant="nf4") if s.dropout == 0.0]
    models = train_step.Models(CPU, torch.float32)
    calls = {spec: train_step.build(spec, models) for spec in specs}
    assert train_step.check_losses(calls, torch.float32) == []
    # fastlora's model keeping its own random adapters instead of PEFT's: the check must see it
    monkeypatch.setattr(fastlora, "set_peft_model_state_dict", lambda *args, **kwargs: None)
    models = train_step.Models(CPU, torch.float32)
    calls = {spec: train_step.build(spec, models) for spec in specs}
    (problem,) = train_step.check_losses(calls, torch.float32)
    assert problem.startswith("fastlora_qlora loss")
