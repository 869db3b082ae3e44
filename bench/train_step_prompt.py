"""One optimizer step per prompt-learning method: the frozen base model vs PEFT vs fastlora.

    python -m bench.train_step_prompt                      # CPU preset, every method, markdown to stdout
    python -m bench.train_step_prompt --quick              # a smaller model, about a minute on 2 cores
    python -m bench.train_step_prompt --methods prefix,adaption --csv out.csv

The model is a ``LlamaForCausalLM`` built from a config (no download) with grouped-query attention, in
training mode. Per method:
- ``base``: no adapter, every weight frozen, input embeddings requiring grad, forward + backward (the
  floor: what any adapter method costs at least);
- ``peft`` / ``fastlora``: forward + backward + ``AdamW.step()`` + ``zero_grad`` with the same adapter
  tensors (PEFT's state dict loaded into fastlora's model, key for key, and the outputs checked equal
  before anything is timed).

Methods: prompt tuning, p-tuning (MLP), prefix tuning (plain and with projection), multitask prompt
tuning and adaption prompt. The harness (model, steps, agreement check, table, command line) is
``bench.method_step``'s. Timing and memory as ``bench.common`` measures them (BENCH.md): on CPU the
providers of one method run interleaved, round after round; ``peak_mb`` is the most memory a step had
allocated beyond what was allocated when it started; ``saved_mb`` what autograd keeps from the forward
for the backward.
"""

from __future__ import annotations

import copy
from functools import partial

import torch

from bench import method_step
from bench.method_step import Case

OP = "train_step_prompt"
VIRTUAL_TOKENS = 20

METHODS = {
    "prompt": ("PromptTuningConfig", dict(num_virtual_tokens=VIRTUAL_TOKENS)),
    "ptuning": ("PromptEncoderConfig", dict(num_virtual_tokens=VIRTUAL_TOKENS, encoder_hidden_size=128)),
    "prefix": ("PrefixTuningConfig", dict(num_virtual_tokens=VIRTUAL_TOKENS)),
    "prefix-proj": ("PrefixTuningConfig", dict(num_virtual_tokens=VIRTUAL_TOKENS, prefix_projection=True,
                                               encoder_hidden_size=128)),
    "multitask": ("MultitaskPromptTuningConfig", dict(num_virtual_tokens=VIRTUAL_TOKENS, num_tasks=4, num_ranks=2)),
    "adaption": ("AdaptionPromptConfig", dict(adapter_len=10, adapter_layers=4)),
}


def adapter_pair(base: torch.nn.Module, method: str, adapter_layers: int):
    """PEFT's and fastlora's model for ``method`` with the same adapter tensors."""
    import peft

    import fastlora

    name, kwargs = METHODS[method]
    kwargs = dict(kwargs, task_type="CAUSAL_LM")
    if method == "adaption":
        kwargs["adapter_layers"] = adapter_layers
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), getattr(peft, name)(**kwargs))
    with torch.no_grad():  # open adaption prompt's zero gate, so its path is not a no-op
        for pname, param in theirs.named_parameters():
            if pname.endswith("adaption_gate"):
                param.fill_(0.5)
    ours = fastlora.get_peft_model(copy.deepcopy(base), getattr(fastlora, name)(**kwargs))
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def prepare(base: torch.nn.Module, method: str, ids: torch.Tensor, dtype: torch.dtype, shape: dict) -> Case:
    """The adapter pair of ``method`` (multitask: one task id per sequence), checked to compute the same
    logits."""
    batch = dict(input_ids=ids, labels=ids)
    if method == "multitask":
        batch["task_ids"] = torch.arange(shape["batch"], device=ids.device) % 4
    pair = adapter_pair(base, method, shape["num_hidden_layers"])
    method_step.check_same(pair, batch, dtype, loss=False)
    return Case(pair, batch)


def run(methods, device, dtype, shape: dict, budget: float, progress=print) -> list[dict]:
    base = method_step.build_base(shape, device, dtype, max_positions=shape["seq"] + 2 * VIRTUAL_TOKENS)
    return method_step.run(OP, methods, device, dtype, shape, budget, base, ids_seed=2,
                           prepare=partial(prepare, dtype=dtype, shape=shape), progress=progress)


def main(argv: list[str] | None = None) -> int:
    return method_step.main(argv, op=OP, doc=__doc__, methods=METHODS, run=run,
                            details=lambda shape: [f"batch {shape['batch']} x seq {shape['seq']}",
                                                   f"{VIRTUAL_TOKENS} virtual tokens"])


if __name__ == "__main__":
    raise SystemExit(main())
