"""One optimizer step per weight-adapting method beside LoRA (IA3, LoHa, AdaLoRA): base vs PEFT vs fastlora.

    python -m bench.train_step_methods                        # CPU preset, every method, markdown to stdout
    python -m bench.train_step_methods --quick                # a smaller model, well under a minute on 2 cores
    python -m bench.train_step_methods --methods loha,adalora --csv out.csv

The model is a ``LlamaForCausalLM`` built from a config (no download) with grouped-query attention, in
training mode. Per method:
- ``base``: no adapter, every weight frozen, input embeddings requiring grad, forward + backward (the
  floor: what any adapter method costs at least);
- ``peft`` / ``fastlora``: forward + backward + ``AdamW.step()`` (+ ``update_and_allocate`` for AdaLoRA,
  inside its warm-up phase, so the importance scores are updated every step) + ``zero_grad``, with the
  same adapter tensors (PEFT's, perturbed away from their no-op init, loaded into fastlora key for key;
  the outputs are checked equal before anything is timed).

Methods (on q, k, v, o, gate, up, down unless said): ``ia3`` (PEFT's Llama defaults: k, v, down; down
scales its input), ``loha`` (r=8, alpha 16), ``loha-r4`` (r=4: on the CPU shapes fastlora takes its
rank-r^2 LoRA form here, the merged-weight form at r=8), ``adalora`` (init_r 12, target_r 8).

The harness (model, steps, agreement check, table, command line) is ``bench.method_step``'s. Timing
and memory as ``bench.common`` measures them (BENCH.md): on CPU the providers of one method run
interleaved, round after round; ``peak_mb`` is the most memory a step had allocated beyond what was
allocated when it started; ``saved_mb`` what autograd keeps from the forward for the backward.
"""

from __future__ import annotations

import copy
from functools import partial

import torch

from bench import method_step
from bench.method_step import Case

OP = "train_step_methods"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Inside AdaLoRA's warm-up (step <= tinit): the allocator scores every step and prunes nothing, so the
# timed steps all cost the same.
ADALORA_STEP = 1

# method -> (config class name, rank for the CSV, config kwargs)
METHODS = {
    "ia3": ("IA3Config", "", dict()),
    "loha": ("LoHaConfig", 8, dict(r=8, alpha=16, target_modules=TARGETS)),
    "loha-r4": ("LoHaConfig", 4, dict(r=4, alpha=8, target_modules=TARGETS)),
    "adalora": ("AdaLoraConfig", 12, dict(init_r=12, target_r=8, lora_alpha=32, target_modules=TARGETS,
                                          tinit=100, tfinal=100, total_step=1000)),
}


def adapter_pair(base: torch.nn.Module, method: str):
    """PEFT's and fastlora's model for ``method`` with the same adapter tensors, away from their no-op init."""
    import peft

    import fastlora

    name, _, kwargs = METHODS[method]
    kwargs = dict(kwargs, task_type="CAUSAL_LM")
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), getattr(peft, name)(**kwargs))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, param in sorted(theirs.named_parameters()):
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32) * 0.02
                param.add_(noise.to(param.device, param.dtype))
    ours = fastlora.get_peft_model(copy.deepcopy(base), getattr(fastlora, name)(**kwargs))
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _adalora_allocate(model: torch.nn.Module):
    """AdaLoRA's ``update_and_allocate`` after every optimizer step (its importance scores)."""
    allocate = model.base_model.update_and_allocate
    return lambda: allocate(ADALORA_STEP)


def prepare(base: torch.nn.Module, method: str, ids: torch.Tensor, dtype: torch.dtype) -> Case:
    """The adapter pair of ``method``, checked to compute the same logits and loss."""
    batch = dict(input_ids=ids, labels=ids)
    pair = adapter_pair(base, method)
    method_step.check_same(pair, batch, dtype)
    return Case(pair, batch, rank=METHODS[method][1],
                after_step=_adalora_allocate if method == "adalora" else None)


def run(methods, device, dtype, shape: dict, budget: float, progress=print) -> list[dict]:
    base = method_step.build_base(shape, device, dtype, max_positions=shape["seq"])
    return method_step.run(OP, methods, device, dtype, shape, budget, base, ids_seed=3,
                           prepare=partial(prepare, dtype=dtype), progress=progress)


def main(argv: list[str] | None = None) -> int:
    return method_step.main(argv, op=OP, doc=__doc__, methods=METHODS, run=run,
                            details=lambda shape: [f"intermediate {shape['intermediate_size']}",
                                                   f"batch {shape['batch']} x seq {shape['seq']}"])


if __name__ == "__main__":
    raise SystemExit(main())
