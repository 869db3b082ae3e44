"""Multitask prompt tuning specifics: task_ids (required, checked, per row) and the source-task inits."""

from __future__ import annotations


import peft
import pytest
import torch
from safetensors.torch import save_file

import fastlora

KWARGS = dict(task_type="CAUSAL_LM", num_virtual_tokens=4, num_tasks=3, num_ranks=2)


@pytest.fixture
def model(tiny_llama):
    return fastlora.get_peft_model(tiny_llama(), fastlora.MultitaskPromptTuningConfig(**KWARGS))


def _ids():
    return torch.randint(2, 128, (2, 6), generator=torch.Generator().manual_seed(0))


def test_missing_task_ids_fail_before_the_model_runs(model):
    calls = []
    model.get_base_model().register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="task_ids"):
        model(input_ids=_ids())
    with pytest.raises(ValueError, match="task_ids"):
        model.generate(input_ids=_ids(), max_new_tokens=2)
    assert not calls


def test_task_ids_out_of_range_are_refused(model):
    with pytest.raises(ValueError, match=r"task_ids must be in \[0, 3\)"):
        model(input_ids=_ids(), task_ids=torch.tensor([0, 3]))


def test_each_row_gets_its_own_task(model):
    ids = _ids()
    with torch.no_grad():
        mixed = model(input_ids=ids, task_ids=torch.tensor([0, 2])).logits
        first = model(input_ids=ids, task_ids=torch.tensor([0, 0])).logits
        last = model(input_ids=ids, task_ids=torch.tensor([2, 2])).logits
    torch.testing.assert_close(mixed[0], first[0])
    torch.testing.assert_close(mixed[1], last[1])
    assert not torch.allclose(first[1], last[1])


@pytest.mark.parametrize("init", ["AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"])
def test_source_task_inits_match_peft(tiny_llama, tmp_path, init):
    source = fastlora.get_peft_model(tiny_llama(), fastlora.MultitaskPromptTuningConfig(**KWARGS))
    path = str(tmp_path / "source.safetensors")
    save_file({k: v.contiguous() for k, v in fastlora.get_peft_model_state_dict(source).items()}, path)
    kwargs = dict(KWARGS, num_tasks=1, prompt_tuning_init=init, prompt_tuning_init_state_dict_path=path,
                  prompt_tuning_init_task=2)
    if init == "ONLY_SOURCE_SHARED":
        kwargs["num_tasks"] = 3
    ours = fastlora.get_peft_model(tiny_llama(), fastlora.MultitaskPromptTuningConfig(**kwargs))
    theirs = peft.get_peft_model(tiny_llama(), peft.MultitaskPromptTuningConfig(**kwargs))
    saved, expected = fastlora.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    keys = ["prompt_embeddings"] if init == "ONLY_SOURCE_SHARED" else sorted(expected)
    for key in keys:
        torch.testing.assert_close(saved[key], expected[key], rtol=0, atol=0)


def test_source_init_needs_a_path():
    with pytest.raises(ValueError, match="prompt_tuning_init_state_dict_path"):
        fastlora.MultitaskPromptTuningConfig(**KWARGS, prompt_tuning_init="EXACT_SOURCE_TASK")
    with pytest.raises(ValueError, match="num_tasks"):
        fastlora.MultitaskPromptTuningConfig(**dict(KWARGS, num_tasks=0))
