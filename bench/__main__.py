"""``python -m bench``: measure every provider of each op side by side and write CSV, JSON, markdown, PNG.

    python -m bench                        # full grid on the default device (cuda if available)
    python -m bench --quick                # a subset in about a minute on CPU
    python -m bench --ops lora_linear --device cpu --out bench/out
    python -m bench --quick --ops nf4_linear,train_step --device cpu   # 4-bit layer and QLoRA step

Results are named ``<date>_<device>_<model>[_quick].{csv,json,md}`` plus ``..._<op>.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import warnings
from pathlib import Path

import torch

from bench import lora_linear, nf4_linear, train_step
from bench.common import (MODES, dtype_name, environment, measure_memory, paired_ratio, setup_device, time_calls,
                          time_cuda_graph)
from bench.report import (RIVALS, comparisons, skip_plots_if_unavailable, write_csv, write_json, write_markdown,
                          write_plots)

OPS = {"lora_linear": lora_linear, "nf4_linear": nf4_linear, "train_step": train_step}
LAYER_OPS = ("lora_linear", "nf4_linear")  # one layer, measured in each of --modes
GRAPH_MAX_M = 16  # decode sizes: also timed as a CUDA graph replay (BENCH.md)
GRAPH_MODES = ("forward_nograd", "forward", "full")  # a backward alone cannot be captured without its forward


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--quick", action="store_true", help="a small subset of shapes (about a minute on CPU)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {', '.join(OPS)} (default: all)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"lora_linear and nf4_linear modes (default: {','.join(MODES)})")
    parser.add_argument("--quant", choices=("both", "none", "nf4"), default="both",
                        help="train_step: LoRA on the 16-bit model (none), QLoRA on its NF4 quantization "
                             "against PEFT + bitsandbytes (nf4), or both (default)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--out", type=Path, default=Path("bench/out"), help="output folder (default: bench/out)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timing per measured call, spread over its rounds "
                             "(default: 0.25, 0.15 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--strict", action="store_true",
                        help="exit with 1 when fastlora is slower than PEFT (median) or uses more memory anywhere")
    return parser


def _groups(specs):
    groups: dict[tuple, list] = {}
    for spec in specs:
        groups.setdefault(spec.group, []).append(spec)
    return groups.values()


def _row(op: str, spec, stats, mem: dict, base_p50: float, dtype: str, env, extra: dict | None = None) -> dict:
    if hasattr(spec, "dtype_label"):  # a 4-bit weight: its format before the compute dtype, e.g. nf4/bfloat16
        dtype = spec.dtype_label(dtype)
    row = dict(
        op=op, provider=spec.provider, mode=spec.mode, M=spec.M, K=spec.K, N=spec.N,
        r="" if spec.r is None else spec.r, dtype=dtype, dropout="" if spec.dropout is None else spec.dropout,
        p50_ms=stats.p50_ms, p20_ms=stats.p20_ms, p80_ms=stats.p80_ms, peak_mb=mem["peak_mb"],
        ratio_to_base=stats.p50_ms / base_p50, **env.columns(),
        saved_mb=mem["saved_mb"], out_mb=mem["out_mb"], timer=stats.timer, samples=stats.samples,
        p50_lo_ms=stats.p50_lo_ms, p50_hi_ms=stats.p50_hi_ms,
    )
    row.update(extra or {})
    return row


def op_specs(name: str, device, preset: str, modes, quant: str = "both") -> list:
    if name in LAYER_OPS:
        return OPS[name].specs(device, preset, modes=modes)
    return train_step.specs(device, preset, quant=quant)


def run_op(name: str, device, dtype, env, preset: str, budget: float, modes, progress, quant: str = "both") -> list[dict]:
    module = OPS[name]
    specs = op_specs(name, device, preset, modes, quant)
    store = module.Models(device, dtype) if name == "train_step" else module.Inputs(device, dtype)
    rows: list[dict] = []
    checked: set[tuple] = set()
    for group in _groups(specs):
        calls = {spec: module.build(spec, store) for spec in group}
        if name == "lora_linear":
            _check_outputs(store, group, checked, dtype)
        elif name == "nf4_linear":
            _check_nf4_outputs(store, group, checked)
        else:
            _check_losses(calls, dtype)
        trade = module.trade_weights(store, group) if name == "lora_linear" else None
        stats = time_calls({spec: call.fn for spec, call in calls.items()}, device, budget_s=budget, halfway=trade)
        if trade is not None:
            trade()  # each provider's own copy back
        base_spec = next(spec for spec in group if spec.provider == "base")
        for spec, call in calls.items():
            rows.append(_row(name, spec, stats[spec], measure_memory(call, device), stats[base_spec].p50_ms,
                             dtype_name(dtype), env, _paired(spec, stats)))
        if device.type == "cuda" and name in LAYER_OPS and base_spec.M <= GRAPH_MAX_M and base_spec.mode in GRAPH_MODES:
            rows += _graph_rows(name, calls, base_spec, dtype, env, budget)
        del calls
        progress.update(len(group))
    store.clear()
    return rows


def _paired(spec, stats: dict) -> dict:
    """For a fastlora row: its time over its rival's (``bench.report.RIVALS``) round by round
    (``bench.common.paired_ratio``); empty for other rows."""
    for rival in RIVALS.get(spec.provider, ()):
        theirs = stats.get(dataclasses.replace(spec, provider=rival))
        if theirs is not None:
            return paired_ratio(stats[spec], theirs)
    return {}


def _graph_rows(name, calls, base_spec, dtype, env, budget) -> list[dict]:
    graphed = {spec: time_cuda_graph(call.fn, budget) for spec, call in calls.items()}
    if graphed.get(base_spec) is None:
        return []
    rows = []
    for spec, stats in graphed.items():
        if stats is not None:
            mem = {"peak_mb": float("nan"), "saved_mb": float("nan"), "out_mb": float("nan")}
            row = _row(name, spec, stats, mem, graphed[base_spec].p50_ms, dtype_name(dtype), env)
            row["mode"] = f"{spec.mode}+graph"
            rows.append(row)
    return rows


def _check_outputs(store, group, checked: set, dtype) -> None:
    """fastlora and PEFT must compute the same layer, or comparing their speed means nothing."""
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for spec in group:
        key = (spec.K, spec.N, spec.r)
        if spec.r is None or key in checked:
            continue
        checked.add(key)
        m = min(spec.M, 64)
        x, _ = store.x_dy(m, spec.K, spec.N)
        scale = x.abs().max().item() * spec.K**0.5
        err = lora_linear.check_same_output(store, m, spec.K, spec.N, spec.r) / max(scale, 1e-12)
        if err > tol:
            warnings.warn(f"lora_linear K={spec.K} N={spec.N} r={spec.r}: fastlora and PEFT outputs differ "
                          f"(relative {err:.2e} > {tol:g})", RuntimeWarning, stacklevel=2)


def _check_nf4_outputs(store, group, checked: set) -> None:
    """Every 4-bit provider must compute the same layer as the others (and as the dense one, to 4-bit
    rounding), or comparing their speed means nothing (``nf4_linear.check_outputs``). Checked on up to
    64 rows, once per row count, so that both of fastlora's paths (fused at decode sizes, dequantize
    into a workspace above) are."""
    for spec in group:
        if spec.double_quant is None:
            continue
        ranks = {s.r for s in group if s.double_quant == spec.double_quant and s.r is not None} or {None}
        m = min(spec.M, 64)
        for r in sorted(ranks, key=lambda r: r or 0):
            key = (m, spec.K, spec.N, spec.double_quant, r)  # with a rank, the no-adapter layers are checked too
            if key in checked:
                continue
            checked.add(key)
            for problem in nf4_linear.check_outputs(store, m, spec.K, spec.N, spec.double_quant, r):
                warnings.warn(f"nf4_linear M={m} K={spec.K} N={spec.N} {spec.weights} r={r}: {problem}",
                              RuntimeWarning, stacklevel=2)


def _check_losses(calls: dict, dtype) -> None:
    """fastlora's model and PEFT's (without dropout) must give the same loss (``train_step.check_losses``)."""
    for problem in train_step.check_losses(calls, dtype):
        warnings.warn(f"train_step: {problem}", RuntimeWarning, stacklevel=2)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise SystemExit(f"unknown op(s) {', '.join(unknown)}; choose from {', '.join(OPS)}")
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    if any(mode not in MODES for mode in modes):
        raise SystemExit(f"--modes: choose from {', '.join(MODES)}")
    no_plots = skip_plots_if_unavailable(args.no_plots)  # said now, not after the run
    device, dtype = setup_device(args.device, args.dtype, args.threads)
    preset = "quick" if args.quick else "full"
    budget = args.budget if args.budget is not None else (0.15 if args.quick else 0.25)
    env = environment(device)
    warnings.filterwarnings("ignore", message=".*requires_grad=True.*")  # transformers' checkpointing hint

    from tqdm import tqdm

    total = sum(len(op_specs(op, device, preset, modes, args.quant)) for op in ops)
    rows: list[dict] = []
    with tqdm(total=total, desc="bench", unit="call", dynamic_ncols=True) as progress:
        for op in ops:
            progress.set_description(op)
            torch.manual_seed(0)
            rows += run_op(op, device, dtype, env, preset, budget, modes, progress, args.quant)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{env.date}_{env.slug}{'_quick' if args.quick else ''}"
    meta = {"env": env.__dict__, "dtype": dtype_name(dtype), "preset": preset, "budget_s": budget,
            "command": "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:])}
    write_csv(rows, stem.with_suffix(".csv"))
    write_json(rows, meta, stem.with_suffix(".json"))
    text = write_markdown(rows, meta, stem.with_suffix(".md"))
    written = [stem.with_suffix(ext) for ext in (".csv", ".json", ".md")]
    if not no_plots:
        written += write_plots(rows, meta, stem)
    print(text)
    print("\nwrote " + ", ".join(str(p) for p in written))
    bad = [c for c in comparisons(rows) if c["slower"] or c["heavier"]]
    return 1 if args.strict and bad else 0


if __name__ == "__main__":
    sys.exit(main())
