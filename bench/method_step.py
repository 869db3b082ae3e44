"""The harness the standalone per-method training-step benches share (``bench.train_step_methods``,
``bench.train_step_prompt``): the config-built Llama, the three providers' steps, the agreement check,
timing and memory per method, the markdown table and the command line.

Each bench supplies its methods and a ``prepare(base, method, ids) -> Case``: PEFT's and fastlora's
model for one method with the same adapter tensors, and the batch they train on.
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from bench.common import CSV_COLUMNS, Call, dtype_name, environment, measure_memory, setup_device, time_calls

MODE = "train_step"
PROVIDERS = ("base", "peft", "fastlora")

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


@dataclass
class Case:
    """One method ready to time: ``pair`` is (PEFT's model, fastlora's model), ``batch`` their inputs;
    ``rank`` goes to the CSV's ``r`` column of the adapter rows; ``after_step(model)`` gives what runs
    between ``optimizer.step()`` and ``zero_grad`` for that model (None: nothing)."""

    pair: tuple
    batch: dict
    rank: object = ""
    after_step: Callable[[torch.nn.Module], Callable[[], object] | None] | None = None


def build_base(shape: dict, device: torch.device, dtype: torch.dtype, max_positions: int,
               seed: int = 0) -> torch.nn.Module:
    """The frozen ``LlamaForCausalLM`` of ``shape`` (a ``CONFIGS`` entry), built from its config."""
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"], num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"], vocab_size=shape["vocab_size"],
        max_position_embeddings=max_positions, attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(device, dtype)
    return model.requires_grad_(False)


def build(spec: Spec, base: torch.nn.Module, case: Case) -> Call:
    """``base``: a copy of the frozen model, forward + backward (input embeddings requiring grad), on
    the batch without ``task_ids``; ``peft`` / ``fastlora``: forward + backward + ``AdamW.step()`` (+
    ``case.after_step``) + ``zero_grad``. One step runs here, so optimizer state exists before anything
    is measured."""
    if spec.provider == "base":
        model = copy.deepcopy(base)
        model.enable_input_require_grads()
        model.train()
        inputs = {k: v for k, v in case.batch.items() if k != "task_ids"}

        def step():
            model(**inputs).loss.backward()

    else:
        model = case.pair[PROVIDERS.index(spec.provider) - 1]
        model.train()
        inputs = case.batch
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        after = case.after_step(model) if case.after_step is not None else None

        def step():
            model(**inputs).loss.backward()
            optimizer.step()
            if after is not None:
                after()
            optimizer.zero_grad(set_to_none=True)

    def forward():
        return model(**inputs).loss

    step()
    return Call(fn=step, forward=forward, keep=[*model.parameters(), *model.buffers(), *case.batch.values()])


def check_same(pair, batch: dict, dtype: torch.dtype, loss: bool = True) -> None:
    """PEFT and fastlora must compute the same step, or comparing their speed means nothing: the same
    logits (and, with ``loss``, the same loss) in eval mode."""
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        theirs, ours = (model.eval()(**batch) for model in pair)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=tol, atol=tol)
    if loss:
        torch.testing.assert_close(ours.loss, theirs.loss, rtol=tol, atol=tol)


def run(op: str, methods, device, dtype, shape: dict, budget: float, base: torch.nn.Module, ids_seed: int,
        prepare: Callable[[torch.nn.Module, str, torch.Tensor], Case], progress=print) -> list[dict]:
    """Rows (BENCH.md's CSV columns + ``method``, ``saved_mb``) of every provider of every method, the
    providers of one method timed interleaved. ``prepare`` builds (and checks) each method's ``Case``."""
    gen = torch.Generator().manual_seed(ids_seed)
    ids = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]), generator=gen).to(device)
    env = environment(device)
    rows = []
    for method in methods:
        case = prepare(base, method, ids)
        calls = {Spec(method, p): build(Spec(method, p), base, case) for p in PROVIDERS}
        stats = time_calls({spec: call.fn for spec, call in calls.items()}, device, budget_s=budget)
        base_p50 = stats[Spec(method, "base")].p50_ms
        for spec, call in calls.items():
            mem = measure_memory(call, device)
            rows.append(dict(
                op=op, provider=spec.provider, mode=MODE, M=shape["batch"] * shape["seq"], K=shape["hidden_size"],
                N=shape["intermediate_size"], r="" if spec.provider == "base" else case.rank,
                dtype=dtype_name(dtype), dropout="", p50_ms=stats[spec].p50_ms, p20_ms=stats[spec].p20_ms,
                p80_ms=stats[spec].p80_ms, peak_mb=mem["peak_mb"], ratio_to_base=stats[spec].p50_ms / base_p50,
                **env.columns(), method=method, saved_mb=mem["saved_mb"]))
        progress(f"{method}: done")
        del calls, case
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


def main(argv: list[str] | None, *, op: str, doc: str, methods, run: Callable[..., list[dict]],
         details: Callable[[dict], list[str]]) -> int:
    """The command line of ``python -m bench.<op>``: ``run(methods, device, dtype, shape, budget, progress)``
    measures, ``details(shape)`` names what the header says about the model beside its Llama shape."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{op}", description=doc.splitlines()[0])
    parser.add_argument("--methods", default=",".join(methods), help=f"comma-separated, from {', '.join(methods)}")
    parser.add_argument("--quick", action="store_true", help="a smaller model and a shorter budget")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timing per provider (default 1, 0.3 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--csv", default=None, help="also write BENCH.md's CSV columns to this file")
    args = parser.parse_args(argv)
    chosen = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(chosen) - set(methods))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(methods)}")
    device, dtype = setup_device(args.device, args.dtype, args.threads)
    shape = dict(CONFIGS["cuda" if device.type == "cuda" else ("quick" if args.quick else "cpu")])
    if args.quick and device.type == "cuda":
        shape["batch"] = 1
    budget = args.budget if args.budget is not None else (0.3 if args.quick else 1.0)
    rows = run(chosen, device, dtype, shape, budget, progress=lambda msg: print(msg, file=sys.stderr))
    env = environment(device)
    print(", ".join([f"{op}: Llama hidden {shape['hidden_size']}", f"{shape['num_hidden_layers']} layers",
                     f"{shape['num_attention_heads']}/{shape['num_key_value_heads']} heads", *details(shape),
                     dtype_name(dtype)])
          + f"; {env.device}, torch {env.torch}, fastlora {env.fastlora}, {env.date}\n")
    print(markdown(rows))
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return 0
