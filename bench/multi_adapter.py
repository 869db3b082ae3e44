"""One LoRA layer serving a mixed-adapter batch: the base layer alone vs PEFT's mixed batch vs fastlora's.

    python -m bench.multi_adapter                          # quick preset on the default device
    python -m bench.multi_adapter --device cuda --preset targets   # issue 5's targets on a GPU (bf16)
    python -m bench.multi_adapter --device cuda --preset full --out bench/out

Providers (inference, ``torch.no_grad``; the same base weight everywhere, the same adapter weights for
PEFT and fastlora):
- ``base``: ``F.linear(x, W)``: the base model alone, the floor.
- ``peft``: PEFT's ``lora.Linear`` holding every adapter, called with ``adapter_names`` (one per
  sequence): PEFT loops over the adapters present, gathering and scattering their rows.
- ``fastlora``: ``fastlora.LoraLinear`` inside ``fastlora.mixed_adapter_batch``: the base layer, then
  one shrink and one expand launch over the whole batch through the layer's adapter bank. The batch
  metadata (sort, counts, block table) is built once per forward and shared by every layer of a model,
  so it is built before timing here, as every layer but the first of a model finds it built.

Workloads follow BENCH.md's multi-adapter list: adapters loaded (1, 8, 32, 128), popularity of the
sequences' adapters (identical / distinct / uniform / zipf 1.5 / skewed), ranks (one rank, or mixed
8-64), the share of sequences on the base model (0, 25%, 100%), decode (batch of single tokens) and
prefill (sequences of many tokens). In the CSV, M is the tokens of the batch and ``r`` the rank or
"8-64"; the extra columns (adapters, popularity, base share, phase) are in the JSON and markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import warnings
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import (
    Call,
    OneLinear,
    dense_linear,
    dtype_name,
    environment,
    setup_device,
    time_calls,
    time_cuda_graph,
)

__all__ = ["OP", "PROVIDERS", "Spec", "Workloads", "build", "specs", "check_same_output", "main"]

OP = "multi_adapter"
MODE = "forward_nograd"
PROVIDERS = ("base", "peft", "fastlora")
MIXED_RANKS = (8, 16, 32, 64)  # "mixed 8-64": adapters cycle through these
GRAPH_MAX_M = 256  # decode batches are also timed as CUDA graph replays (launch latency is the cost)

# phase -> (sequences, tokens per sequence)
PRESETS = {
    "quick": dict(kn=[(1024, 1024)], shapes=[("decode", 32, 1), ("prefill", 8, 64)], adapters=[8],
                  popularity=["identical", "distinct", "uniform", "skewed"], ranks=["16", "8-64"],
                  base_share=[0.0, 0.25]),
    # issue 5's targets: decode batch 32 with 8 distinct adapters at r=16 and r=64; prefill of 4096
    # tokens over 32 adapters of mixed ranks 8-64; and the rank sweep that shows cost following the
    # tokens' own ranks (one r=64 adapter loaded, tokens on r=8).
    "targets": dict(kn=[(4096, 4096), (4096, 14336)], shapes=[("decode", 32, 1), ("prefill", 32, 128)],
                    adapters=[8, 32], popularity=["distinct", "uniform"], ranks=["16", "64", "8-64"],
                    base_share=[0.0]),
    "full": dict(kn=[(4096, 4096), (4096, 14336), (14336, 4096)],
                 shapes=[("decode", 1, 1), ("decode", 8, 1), ("decode", 32, 1), ("decode", 128, 1),
                         ("decode", 256, 1), ("prefill", 4, 128), ("prefill", 16, 128), ("prefill", 32, 128),
                         ("prefill", 64, 128), ("prefill", 33, 121)],
                 adapters=[1, 8, 32, 128], popularity=["identical", "distinct", "uniform", "zipf", "skewed"],
                 ranks=["16", "64", "8-64"], base_share=[0.0, 0.25, 1.0]),
}


@dataclass(frozen=True)
class Spec:
    provider: str
    phase: str
    batch: int  # sequences
    seq: int  # tokens per sequence
    K: int
    N: int
    adapters: int
    popularity: str
    ranks: str  # "16", "64" or "8-64"
    base_share: float
    mode: str = MODE

    @property
    def M(self) -> int:
        return self.batch * self.seq

    @property
    def r(self) -> str | None:
        return None if self.provider == "base" else self.ranks

    @property
    def group(self) -> tuple:
        return (self.phase, self.batch, self.seq, self.K, self.N, self.adapters, self.popularity, self.ranks,
                self.base_share)

    @property
    def id(self) -> str:
        return (f"{self.provider}-{self.phase}-B{self.batch}x{self.seq}-K{self.K}-N{self.N}-L{self.adapters}-"
                f"{self.popularity}-r{self.ranks}-base{self.base_share:g}")


def specs(device: torch.device, preset: str = "quick") -> list[Spec]:
    grid = PRESETS[preset]
    out = []
    for (k, n), (phase, b, t), L, pop, ranks, share in product(grid["kn"], grid["shapes"], grid["adapters"],
                                                               grid["popularity"], grid["ranks"], grid["base_share"]):
        if share == 1.0 and (pop != "uniform" or ranks != grid["ranks"][0]):
            continue  # all-base batches: once per shape and adapter count
        out += [Spec(p, phase, b, t, k, n, L, pop, ranks, share) for p in PROVIDERS]
    return out


def adapter_ranks(ranks: str, count: int) -> list[int]:
    if ranks == "8-64":
        return [MIXED_RANKS[i % len(MIXED_RANKS)] for i in range(count)]
    return [int(ranks)] * count


def sequence_adapters(popularity: str, batch: int, count: int, base_share: float, seed: int = 0) -> list[str]:
    """One adapter name per sequence (``"__base__"`` for the base model), drawn by ``popularity``."""
    gen = torch.Generator().manual_seed(seed)
    if popularity == "identical":
        idx = [0] * batch
    elif popularity == "distinct":
        idx = [i % count for i in range(batch)]
    elif popularity == "uniform":
        idx = torch.randint(0, count, (batch,), generator=gen).tolist()
    elif popularity == "zipf":  # P(k) ~ 1 / k^1.5
        weights = torch.arange(1, count + 1, dtype=torch.float64) ** -1.5
        idx = torch.multinomial(weights, batch, replacement=True, generator=gen).tolist()
    elif popularity == "skewed":  # 80% on one adapter, the rest uniform
        idx = [0 if u < 0.8 else int(v * count) for u, v in torch.rand(batch, 2, generator=gen).tolist()]
    else:
        raise ValueError(f"unknown popularity {popularity!r}")
    names = [f"ad{i}" for i in idx]
    n_base = round(base_share * batch)
    for i in torch.randperm(batch, generator=gen)[:n_base].tolist():
        names[i] = "__base__"
    return names


def _models(weight: torch.Tensor, ranks: list[int]) -> dict[str, nn.Module]:
    """PEFT's and fastlora's one-layer models with the same adapters ``ad0``, ``ad1``, ..."""
    import peft

    import fastlora

    models = {}
    for name, lib in (("peft", peft), ("fastlora", fastlora)):
        model = None
        for i, r in enumerate(ranks):
            config = lib.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], init_lora_weights=False)
            if model is None:
                model = lib.get_peft_model(OneLinear(dense_linear(weight)), config, adapter_name=f"ad{i}")
            else:
                model.add_adapter(f"ad{i}", config)
        models[name] = model.eval()
    state = {k: v for k, v in models["peft"].state_dict().items() if "lora_" in k}
    models["fastlora"].load_state_dict(state, strict=False)
    return models


@dataclass
class Workloads:
    """Base weights, inputs and models, made once per (K, N, adapters, ranks) and shared by the specs."""

    device: torch.device
    dtype: torch.dtype
    seed: int = 0
    _key: tuple | None = None
    _weight: torch.Tensor | None = None
    _models: dict = field(default_factory=dict)
    _inputs: dict = field(default_factory=dict)

    def models(self, k: int, n: int, count: int, ranks: str) -> dict[str, nn.Module]:
        key = (k, n, count, ranks)
        if self._key != key:
            self.clear()
            gen = torch.Generator().manual_seed(self.seed)
            self._weight = (torch.randn(n, k, generator=gen) / k**0.5).to(self.device, self.dtype)
            torch.manual_seed(self.seed + 1)
            self._models = _models(self._weight, adapter_ranks(ranks, count))
            self._key = key
        return self._models

    def weight(self) -> torch.Tensor:
        return self._weight

    def x(self, batch: int, seq: int, k: int) -> torch.Tensor:
        key = (batch, seq, k)
        if key not in self._inputs:
            gen = torch.Generator().manual_seed(self.seed + 2)
            self._inputs[key] = torch.randn(batch, seq, k, generator=gen).to(self.device, self.dtype)
        return self._inputs[key]

    def clear(self) -> None:
        self._models, self._inputs, self._key, self._weight = {}, {}, None, None


def build(spec: Spec, work: Workloads) -> Call:
    """The measured call for ``spec``; for fastlora the mixed-batch context stays open in ``extra``."""
    import fastlora

    models = work.models(spec.K, spec.N, spec.adapters, spec.ranks)
    x = work.x(spec.batch, spec.seq, spec.K)
    names = sequence_adapters(spec.popularity, spec.batch, spec.adapters, spec.base_share)
    if spec.provider == "base":
        weight = work.weight()

        def fn():
            with torch.no_grad():
                return F.linear(x, weight)

        return Call(fn=fn, keep=[x, weight])
    layer = models[spec.provider].base_model.model.proj
    if spec.provider == "peft":
        def fn():
            with torch.no_grad():
                return layer(x, adapter_names=names)

        return Call(fn=fn, keep=[x, *layer.parameters()])
    stack = contextlib.ExitStack()
    stack.enter_context(fastlora.mixed_adapter_batch(models["fastlora"], adapter_names=names))
    layer.mixed_batch.for_input(x)  # what the first layer of a model builds for the others

    def fn():
        with torch.no_grad():
            return layer(x)

    return Call(fn=fn, keep=[x, *layer.parameters()], extra={"context": stack})


def check_same_output(work: Workloads, spec: Spec) -> float:
    """Max |fastlora - PEFT| relative to the output's scale, on this spec's batch."""
    calls = {p: build(Spec(p, *[getattr(spec, f) for f in Spec.__dataclass_fields__ if f != "provider"]), work)
             for p in ("peft", "fastlora")}
    try:
        ours, theirs = calls["fastlora"].fn().float(), calls["peft"].fn().float()
    finally:
        calls["fastlora"].extra["context"].close()
    return ((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1e-12)).item()


# ---- runner -------------------------------------------------------------------------------------------------------

def _groups(all_specs):
    groups: dict[tuple, list[Spec]] = {}
    for spec in all_specs:
        groups.setdefault(spec.group, []).append(spec)
    return list(groups.values())


def run(device, dtype, preset: str, budget: float, env, progress=None) -> list[dict]:
    work = Workloads(device, dtype)
    rows = []
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for group in _groups(specs(device, preset)):
        first = group[0]
        err = check_same_output(work, first)
        if err > tol:
            warnings.warn(f"{first.id}: fastlora and PEFT outputs differ (relative {err:.2e})", RuntimeWarning)
        calls = {spec: build(spec, work) for spec in group}
        try:
            stats = time_calls({spec: call.fn for spec, call in calls.items()}, device, budget_s=budget)
            graphs = {}
            if device.type == "cuda" and first.phase == "decode" and first.M <= GRAPH_MAX_M:
                graphs = {spec: time_cuda_graph(call.fn, budget) for spec, call in calls.items()}
        finally:
            for call in calls.values():
                if "context" in call.extra:
                    call.extra["context"].close()
        base = next(spec for spec in group if spec.provider == "base")
        for timing, suffix in ((stats, ""), (graphs, "+graph")):
            if not timing or timing.get(base) is None:
                continue
            for spec, st in timing.items():
                if st is None:
                    continue
                rows.append(dict(
                    op=OP, provider=spec.provider, mode=spec.mode + suffix, M=spec.M, K=spec.K, N=spec.N,
                    r="" if spec.r is None else spec.r, dtype=dtype_name(dtype), dropout="",
                    p50_ms=st.p50_ms, p20_ms=st.p20_ms, p80_ms=st.p80_ms, peak_mb="",
                    ratio_to_base=st.p50_ms / timing[base].p50_ms, **env.columns(),
                    phase=spec.phase, batch=spec.batch, seq=spec.seq, adapters=spec.adapters,
                    popularity=spec.popularity, ranks=spec.ranks, base_share=spec.base_share,
                    max_rel_err_vs_peft=err,
                ))
        if progress is not None:
            progress(len(group))
    work.clear()
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# multi_adapter: {meta['env']['device']}, {meta['dtype']}, {meta['env']['date']}", "",
             f"`{meta['command']}`", "",
             "| phase | tokens | K->N | adapters | popularity | ranks | base share | mode | base ms | PEFT / base "
             "| fastlora / base | PEFT / fastlora |", "|" + "---|" * 12]
    by_group: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        key = (row["phase"], row["batch"], row["seq"], row["K"], row["N"], row["adapters"], row["popularity"],
               row["ranks"], row["base_share"], row["mode"])
        by_group.setdefault(key, {})[row["provider"]] = row
    for key, group in by_group.items():
        if not {"base", "peft", "fastlora"} <= set(group):
            continue
        phase, b, t, k, n, adapters, pop, ranks, share, mode = key
        base, theirs, ours = group["base"], group["peft"], group["fastlora"]
        lines.append(f"| {phase} | {b}x{t} | {k}->{n} | {adapters} | {pop} | {ranks} | {share:g} | {mode} | "
                     f"{base['p50_ms']:.3f} | {theirs['ratio_to_base']:.2f} | {ours['ratio_to_base']:.2f} | "
                     f"{theirs['p50_ms'] / ours['p50_ms']:.1f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.multi_adapter", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="quick")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--budget", type=float, default=0.15, help="seconds of timing per call (default 0.15)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args(argv)
    device, dtype = setup_device(args.device, args.dtype, args.threads)
    env = environment(device)
    total = len(_groups(specs(device, args.preset)))
    done = [0]

    def progress(n):
        done[0] += 1
        print(f"\r{done[0]}/{total} groups", end="", file=sys.stderr, flush=True)

    rows = run(device, dtype, args.preset, args.budget, env, progress)
    print(file=sys.stderr)
    from bench.report import write_csv

    meta = {"env": env.__dict__, "dtype": dtype_name(dtype), "preset": args.preset, "budget_s": args.budget,
            "command": "python -m bench.multi_adapter " + shlex.join(argv if argv is not None else sys.argv[1:])}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{env.date}_{env.slug}_{OP}_{args.preset}"
    write_csv(rows, stem.with_suffix(".csv"))
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    text = markdown(rows, meta)
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {stem}.csv, .json, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
