"""``fastlora demo`` end to end (train, save, reload, check; the adapter also loads in PEFT) and the
``fastlora`` command line."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

import fastlora
from fastlora import AutoPeftModelForCausalLM, cli
from fastlora.demo import DemoResult, run_demo
from fastlora.demo_task import build_tokenizer, encrypt, prompt_batch, read_answer, training_batch

peft = pytest.importorskip("peft")

LINEAR_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> DemoResult:
    """One full default run, shared by the tests that inspect it.

    On one thread: on a 2-core machine it takes 16-20 s whether or not other jobs share the cores; on
    two it took 12 s alone but 66-150 s beside another test run (OpenMP threads waiting on each other).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_demo(output_dir=tmp_path_factory.mktemp("demo"), quiet=True)
    finally:
        torch.set_num_threads(threads)


# ---- the task ----------------------------------------------------------------------------------------

def test_encrypt_shifts_by_three_and_wraps():
    assert encrypt("lora") == "orud"
    assert encrypt("xyz") == "abc"


def test_training_batch_labels_only_the_answer():
    tokenizer = build_tokenizer()
    batch = training_batch(tokenizer, ["abc", "wxyz"])
    # "<s> a b c = d e f </s> <pad> <pad>": loss on "d e f </s>" only, never on the prompt or padding.
    assert batch["input_ids"].shape == (2, 11)
    assert batch["labels"][0, :5].tolist() == [-100] * 5
    assert tokenizer.decode(batch["labels"][0, 5:9]) == "def</s>"
    assert batch["labels"][0, 9:].tolist() == [-100] * 2 and batch["attention_mask"][0, 9:].tolist() == [0] * 2
    assert tokenizer.decode(batch["labels"][1, 6:]) == "zabc</s>"


def test_read_answer_marks_an_answer_without_end():
    tokenizer = build_tokenizer()
    ids = tokenizer("abc", add_special_tokens=False).input_ids
    assert read_answer(tokenizer, ids + [tokenizer.eos_token_id, tokenizer.pad_token_id]) == "abc"
    assert read_answer(tokenizer, ids) == "abc..."


# ---- the demo end to end -----------------------------------------------------------------------------

@pytest.mark.slow
def test_adapted_model_does_the_task_and_base_model_does_not(demo):
    assert demo.adapted.accuracy >= 0.95 and demo.passed
    assert demo.base.accuracy <= 0.02
    assert demo.final_loss < 0.05
    assert demo.train_tokens_per_s > 0 and demo.adapted.tokens_per_s > 0


@pytest.mark.slow
def test_adapter_is_saved_in_peft_format_pointing_at_the_saved_base(demo):
    config = json.loads((demo.adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 16
    assert config["base_model_name_or_path"] == str(demo.base_dir)
    keys = load_file(demo.adapter_dir / "adapter_model.safetensors").keys()
    assert {key.split(".")[-3] for key in keys} == LINEAR_NAMES  # all-linear: every block linear, no lm_head
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys


@pytest.mark.slow
def test_peft_loads_the_adapter_with_the_same_logits_and_answers(demo):
    tokenizer = AutoTokenizer.from_pretrained(demo.base_dir)  # the tokenizer saved beside the base model
    words = demo.adapted.words[:16]
    batch = prompt_batch(tokenizer, words)
    ours = AutoPeftModelForCausalLM.from_pretrained(demo.adapter_dir)
    theirs = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(demo.base_dir), demo.adapter_dir)
    with torch.no_grad():
        expected = theirs(**batch).logits  # [16, T, vocab]
        torch.testing.assert_close(ours(**batch).logits, expected, rtol=1e-4, atol=1e-5)
        with theirs.disable_adapter():
            assert not torch.allclose(theirs(**batch).logits, expected, atol=1e-2)  # the adapter does something
        output = theirs.generate(**batch, max_new_tokens=8, do_sample=False)
    answers = [read_answer(tokenizer, row) for row in output[:, batch["input_ids"].shape[1]:].tolist()]
    assert answers == [encrypt(word) for word in words]


def test_same_seed_gives_the_same_adapter(tmp_path):
    first = run_demo(output_dir=tmp_path / "first", steps=3, seed=7, quiet=True)
    second = run_demo(output_dir=tmp_path / "second", steps=3, seed=7, quiet=True)
    assert first.final_loss == second.final_loss
    weights = [load_file(run.adapter_dir / "adapter_model.safetensors") for run in (first, second)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


# ---- the command line --------------------------------------------------------------------------------

def test_demo_command_exits_nonzero_when_the_adapter_has_not_learned(tmp_path, capsys):
    assert cli.main(["demo", "--output-dir", str(tmp_path), "--steps", "3", "--quiet"]) == 1
    assert "FAIL: adapted accuracy" in capsys.readouterr().out


def test_demo_command_rejects_unknown_arguments():
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--bogus"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("flag, expected", [("--help", "demo"), ("--version", fastlora.__version__)])
def test_help_and_version_run_as_a_command(flag, expected):
    done = subprocess.run([sys.executable, "-m", "fastlora.cli", flag], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout


def test_bench_runs_the_repository_runner_with_every_argument(tmp_path, monkeypatch):
    # A stand-in runner that records what it was called with, and where.
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "__init__.py").write_text("")
    (tmp_path / "bench" / "__main__.py").write_text(
        "import json, os, sys\n"
        "json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd()}, open('called.json', 'w'))\n"
        "sys.exit(3)\n"
    )
    monkeypatch.setattr(cli, "repo_root", lambda: tmp_path)
    assert cli.main(["bench", "--help", "-k", "lora", "--steps", "2"]) == 3
    called = json.loads((tmp_path / "called.json").read_text())
    assert called == {"argv": ["--help", "-k", "lora", "--steps", "2"], "cwd": str(tmp_path.resolve())}


def test_bench_without_a_bench_folder_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "repo_root", lambda: tmp_path)
    assert cli.main(["bench"]) == 2
    assert "no bench/ folder" in capsys.readouterr().err
