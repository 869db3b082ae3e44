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

Timing and memory as ``bench.common`` measures them (BENCH.md): on CPU the providers of one method run
interleaved, round after round; ``peak_mb`` is the most memory a step had allocated beyond what was
allocated when it started; ``saved_mb`` what autograd keeps from the forward for the backward.
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
from dataclasses import dataclass

import torch

from bench.common import (
    CSV_COLUMNS,
    Call,
    default_dtype,
    dtype_name,
    environment,
    measure_memory,
    parse_dtype,
    pick_device,
    time_calls,
)

OP = "train_step_methods"
MODE = "train_step"
PROVIDERS = ("base", "peft", "fastlora")
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

# CPU: about 2.6M parameters (train_step's CPU model, with 2 KV heads); GPU: about 1B, seq 2048.
CONFIGS = {
    "cpu": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=688, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1000, batch=4, seq=128),
    "quick": dict(hidden_size=128, num_hidden_layers=4, intermediate_size=344, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000, batch=2, seq=64),
    "cuda": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=5504, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000, batch=4, seq=2048),
}


@dataclass(frozen=True)
class Spec:
    method: str
    provider: str


def build_base(shape: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"], num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"], vocab_size=shape["vocab_size"],
        max_position_embeddings=shape["seq"], attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(device, dtype)
    return model.requires_grad_(False)


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


def build(spec: Spec, base: torch.nn.Module, pair, batch: dict) -> Call:
    if spec.provider == "base":
        model = copy.deepcopy(base)
        model.enable_input_require_grads()
        model.train()

        def step():
            model(**batch).loss.backward()

    else:
        model = pair[PROVIDERS.index(spec.provider) - 1]
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        allocate = model.base_model.update_and_allocate if spec.method == "adalora" else None

        def step():
            model(**batch).loss.backward()
            optimizer.step()
            if allocate is not None:
                allocate(ADALORA_STEP)
            optimizer.zero_grad(set_to_none=True)

    def forward():
        return model(**batch).loss

    step()  # optimizer state (and AdaLoRA's importance averages) exist before anything is measured
    return Call(fn=step, forward=forward, keep=[*model.parameters(), *model.buffers(), *batch.values()])


def check_same(pair, batch: dict, dtype: torch.dtype) -> None:
    """PEFT and fastlora must compute the same step, or comparing their speed means nothing."""
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        theirs, ours = (model.eval()(**batch) for model in pair)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=tol, atol=tol)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=tol, atol=tol)


def run(methods, device, dtype, shape: dict, budget: float, progress=print) -> list[dict]:
    base = build_base(shape, device, dtype)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]), generator=gen).to(device)
    batch = dict(input_ids=ids, labels=ids)
    env = environment(device)
    rows = []
    for method in methods:
        pair = adapter_pair(base, method)
        check_same(pair, batch, dtype)
        calls = {Spec(method, p): build(Spec(method, p), base, pair, batch) for p in PROVIDERS}
        stats = time_calls({spec: call.fn for spec, call in calls.items()}, device, budget_s=budget)
        base_p50 = stats[Spec(method, "base")].p50_ms
        for spec, call in calls.items():
            mem = measure_memory(call, device)
            rows.append(dict(
                op=OP, provider=spec.provider, mode=MODE, M=shape["batch"] * shape["seq"], K=shape["hidden_size"],
                N=shape["intermediate_size"], r="" if spec.provider == "base" else METHODS[method][1],
                dtype=dtype_name(dtype), dropout="", p50_ms=stats[spec].p50_ms, p20_ms=stats[spec].p20_ms,
                p80_ms=stats[spec].p80_ms, peak_mb=mem["peak_mb"], ratio_to_base=stats[spec].p50_ms / base_p50,
                **env.columns(), method=method, saved_mb=mem["saved_mb"]))
        progress(f"{method}: done")
        del calls, pair
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| method | base ms | PEFT ms | fastlora ms | fastlora/PEFT time | PEFT peak MB | fastlora peak MB "
             "| fastlora/PEFT memory | PEFT saved MB | fastlora saved MB |", "|---" * 10 + "|"]
    by_method: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_method.setdefault(row["method"], {})[row["provider"]] = row
    for method, r in by_method.items():
        b, p, f = r["base"], r["peft"], r["fastlora"]
        mem_ratio = f["peak_mb"] / p["peak_mb"] if p["peak_mb"] else float("nan")
        lines.append(f"| {method} | {b['p50_ms']:.2f} | {p['p50_ms']:.2f} [{p['p20_ms']:.2f}-{p['p80_ms']:.2f}] "
                     f"| {f['p50_ms']:.2f} [{f['p20_ms']:.2f}-{f['p80_ms']:.2f}] | {f['p50_ms'] / p['p50_ms']:.3f} "
                     f"| {p['peak_mb']:.1f} | {f['peak_mb']:.1f} | {mem_ratio:.3f} | {p['saved_mb']:.1f} "
                     f"| {f['saved_mb']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train_step_methods", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--quick", action="store_true", help="a smaller model and a shorter budget")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timing per provider (default 1, 0.3 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--csv", default=None, help="also write BENCH.md's CSV columns to this file")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = parse_dtype(args.dtype) if args.dtype else default_dtype(device)
    shape = dict(CONFIGS["cuda" if device.type == "cuda" else ("quick" if args.quick else "cpu")])
    if args.quick and device.type == "cuda":
        shape["batch"] = 1
    budget = args.budget if args.budget is not None else (0.3 if args.quick else 1.0)
    rows = run(methods, device, dtype, shape, budget, progress=lambda msg: print(msg, file=sys.stderr))
    env = environment(device)
    print(f"{OP}: Llama hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
          f"{shape['num_attention_heads']}/{shape['num_key_value_heads']} heads, intermediate "
          f"{shape['intermediate_size']}, batch {shape['batch']} x seq {shape['seq']}, {dtype_name(dtype)}; "
          f"{env.device}, torch {env.torch}, fastlora {env.fastlora}, {env.date}\n")
    print(markdown(rows))
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
