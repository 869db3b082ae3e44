"""Results out: the CSV (BENCH.md's columns), a JSON with every measurement, a markdown table, PNG plots.

``python -m bench.report RESULTS.json`` writes the markdown and plots again from a saved run, so a
README table is always generated from committed results, never typed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from bench.common import CSV_COLUMNS

__all__ = ["comparisons", "read_json", "readme_section", "update_readme", "write_csv", "write_json", "write_markdown",
           "write_plots", "skip_plots_if_unavailable", "main"]


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _fmt_csv(row.get(key, "")) for key in CSV_COLUMNS})


def _fmt_csv(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


ENV_COLUMNS = ("device", "torch", "triton", "fastlora", "date")


def write_json(rows: list[dict], meta: dict, path: Path) -> None:
    """One row a line, the environment columns once in ``meta["env"]`` (``read_json`` puts them back)."""
    lines = [json.dumps({k: v for k, v in row.items() if k not in ENV_COLUMNS}) for row in rows]
    path.write_text('{"meta": ' + json.dumps(meta) + ',\n"rows": [\n' + ",\n".join(lines) + "\n]}\n")


def read_json(path: Path) -> tuple[list[dict], dict]:
    data = json.loads(path.read_text())
    env = {k: data["meta"]["env"][k] for k in ENV_COLUMNS}
    return [{**row, **env} for row in data["rows"]], data["meta"]


def _key(row: dict) -> tuple:
    return (row["op"], row["mode"], row["M"], row["K"], row["N"])


# fastlora's provider -> the providers it is compared with (whichever of them the row's op has): PEFT for
# LoRA; bitsandbytes for the 4-bit matmul; PEFT over bitsandbytes for LoRA over a 4-bit weight (QLoRA).
RIVALS = {"fastlora": ("peft", "bnb"), "fastlora_qlora": ("peft_bnb",)}
RIVAL_NAMES = {"peft": "PEFT", "bnb": "bitsandbytes", "peft_bnb": "PEFT+bnb"}


def comparisons(rows: list[dict]) -> list[dict]:
    """One line per (op, mode, shape, weights, r, dropout) where fastlora has a rival: base, the rival
    (``theirs``, named by ``against``) and fastlora (``ours``) side by side."""
    base = {_key(r): r for r in rows if r["provider"] == "base"}
    pairs: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        if row["provider"] != "base":
            pairs[(*_key(row), row["dtype"], row["r"], row["dropout"])][row["provider"]] = row
    out = []
    for (op, mode, m, k, n, dtype, r, p), by in pairs.items():
        for provider, rivals in RIVALS.items():
            ours = by.get(provider)
            against = next((rival for rival in rivals if rival in by), None)
            if ours is None or against is None:
                continue
            theirs = by[against]
            out.append(dict(
                op=op, mode=mode, M=m, K=k, N=n, dtype=dtype, r=r, dropout=p, base=base.get((op, mode, m, k, n)),
                theirs=theirs, ours=ours, against=against, vs_theirs=ours["p50_ms"] / theirs["p50_ms"],
                slower=ours["p50_ms"] > theirs["p50_ms"], paired=ours.get("paired_ratio", math.nan),
                clearly_slower=_clearly_slower(ours, theirs), clearly_faster=_clearly_faster(ours, theirs),
                heavier=_more(ours["peak_mb"], theirs["peak_mb"]) or _more(ours["saved_mb"], theirs["saved_mb"]),
            ))
    return out


def _clearly_slower(ours: dict, theirs: dict) -> bool:
    """Slower beyond the run's noise: the 95% interval of the paired ratio (``bench.common.paired_ratio``)
    lies above 1. Rows without it (runs saved before it existed): the 95% intervals of the two medians do
    not overlap; without intervals either, as from ``do_bench``, any slower median counts."""
    lo = ours.get("paired_lo", math.nan)
    if not math.isnan(lo):
        return lo > 1.0
    if ours["p50_ms"] <= theirs["p50_ms"]:
        return False
    lo, hi = ours.get("p50_lo_ms", math.nan), theirs.get("p50_hi_ms", math.nan)
    return not (lo <= hi)  # NaN: no interval


def _clearly_faster(ours: dict, theirs: dict) -> bool:
    """Faster beyond the run's noise: the paired ratio's interval lies below 1 (the two medians' intervals
    apart, for rows without it)."""
    hi = ours.get("paired_hi", math.nan)
    if not math.isnan(hi):
        return hi < 1.0
    return ours.get("p50_hi_ms", math.nan) < theirs.get("p50_lo_ms", math.nan)


# "More memory" means more by over 1 KiB: fastlora saves its dropout seed (an 8-byte int64 tensor) even
# without dropout, which the comparison should report (bench/README.md) but not flag on every row.
MEMORY_SLACK_MB = 1.0 / 1024


def _more(ours: float, theirs: float) -> bool:
    return not math.isnan(ours) and not math.isnan(theirs) and ours > theirs + MEMORY_SLACK_MB


def _ms(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _mb(x: float) -> str:
    return f"{x:.3g}" if x else "0"


def _lora_linear_table(lines: list[dict], theirs: str = "PEFT", weights: bool = False) -> list[str]:
    """LoRA layers, fastlora against ``theirs``; ``weights``: a column for the base weight's format."""
    w_head, w_rule = ("weights | ", "---|") if weights else ("", "")
    out = [
        f"| mode | M | K | N | {w_head}r | p | base ms | {theirs} ms | fastlora ms | {theirs}/base | fastlora/base "
        f"| **fastlora/{theirs}** | paired (95%) | peak MB base / {theirs} / fastlora | saved MB {theirs} / fastlora "
        f"| out MB |",
        f"|---|--:|--:|--:|{w_rule}--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for c in lines:
        b, p, f = c["base"], c["theirs"], c["ours"]
        flag = " !!" if c["clearly_slower"] else " !" if c["slower"] else ""
        heavy = " !" if c["heavier"] else ""
        w_cell = f"{_weights(c['dtype'])} | " if weights else ""
        out.append(
            f"| {c['mode']} | {c['M']} | {c['K']} | {c['N']} | {w_cell}{c['r']} | {c['dropout']:g} "
            f"| {_ms(b['p50_ms']) if b else '-'} | {_ms(p['p50_ms'])} | {_ms(f['p50_ms'])} "
            f"| {p['ratio_to_base']:.2f} | {f['ratio_to_base']:.2f} | **{c['vs_theirs']:.2f}**{flag} | {_paired(f)} "
            f"| {_mb(b['peak_mb']) if b else '-'} / {_mb(p['peak_mb'])} / {_mb(f['peak_mb'])}{heavy} "
            f"| {_mb(p['saved_mb'])} / {_mb(f['saved_mb'])} | {_mb(f['out_mb'])} |")
    return out


def _paired(ours: dict) -> str:
    """``0.95 (0.87-0.97)``: the paired ratio and its interval, ``-`` for rows without it."""
    ratio = ours.get("paired_ratio", math.nan)
    if math.isnan(ratio):
        return "-"
    return f"{ratio:.2f} ({ours['paired_lo']:.2f}-{ours['paired_hi']:.2f})"


def _weights(dtype: str) -> str:
    """``nf4`` or ``nf4dq`` from a 4-bit row's dtype (``nf4dq/bfloat16``); the dtype itself otherwise."""
    return dtype.split("/", 1)[0] if "/" in dtype else dtype


NF4_PROVIDERS = ("dequant_matmul", "bnb", "fastlora")


def _nf4_linear_tables(rows: list[dict], lines: list[dict]) -> list[str]:
    """The 4-bit matmul alone (base, dequantize + matmul, bitsandbytes, fastlora), then LoRA over it."""
    base = {_key(r): r for r in rows if r["provider"] == "base"}
    by: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        if r["provider"] in NF4_PROVIDERS:
            by[(*_key(r), r["dtype"])][r["provider"]] = r
    out = [
        "The 4-bit matmul (no adapter); `fastlora/deq` above 1 means fastlora was slower than dequantizing "
        "and then calling `F.linear` (marked `!`), `fastlora/bnb` above 1 slower than bitsandbytes.",
        "",
        "| mode | M | K | N | weights | base ms | deq+matmul ms | bnb ms | fastlora ms | fastlora/base "
        "| fastlora/deq | **fastlora/bnb** | peak MB base / deq / bnb / fastlora | saved MB deq / bnb / fastlora |",
        "|---|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for (op, mode, m, k, n, dtype), got in by.items():
        b, d, q, f = base.get((op, mode, m, k, n)), got.get("dequant_matmul"), got.get("bnb"), got.get("fastlora")
        cell = lambda row, key, fmt: fmt(row[key]) if row else "-"  # noqa: E731
        ratio = lambda row: f"{f['p50_ms'] / row['p50_ms']:.2f}" if row and f else "-"  # noqa: E731
        deq_flag = " !" if d and f and f["p50_ms"] > d["p50_ms"] else ""
        bnb_flag = " !" if q and f and f["p50_ms"] > q["p50_ms"] else ""
        out.append(
            f"| {mode} | {m} | {k} | {n} | {_weights(dtype)} | {cell(b, 'p50_ms', _ms)} | {cell(d, 'p50_ms', _ms)} "
            f"| {cell(q, 'p50_ms', _ms)} | {cell(f, 'p50_ms', _ms)} | {cell(f, 'ratio_to_base', '{:.2f}'.format)} "
            f"| {ratio(d)}{deq_flag} | **{ratio(q)}**{bnb_flag} "
            f"| {' / '.join(cell(x, 'peak_mb', _mb) for x in (b, d, q, f))} "
            f"| {' / '.join(cell(x, 'saved_mb', _mb) for x in (d, q, f))} |")
    qlora = [c for c in lines if c["ours"]["provider"] == "fastlora_qlora"]
    if qlora:
        out += ["", "LoRA over the 4-bit weight (QLoRA): PEFT's LoRA over bitsandbytes against fastlora's over "
                "`LinearNF4`.", ""]
        out += _lora_linear_table(qlora, theirs="PEFT+bnb", weights=True)
    return out


def _train_step_table(rows: list[dict]) -> list[str]:
    """One row per provider and dropout; fastlora's rows against their rival's (PEFT, or PEFT +
    bitsandbytes for QLoRA) of the same model and dropout."""
    by = {(_key(r), r["provider"], r["dropout"]): r for r in rows}
    out = [
        "| provider | weights | dropout | tokens | hidden / MLP | step ms (p20-p80) | tokens/s | ratio to base "
        "| ratio to PEFT (QLoRA: PEFT+bnb) | peak MB | saved MB |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        rival = next((by[(_key(r), name, r["dropout"])] for name in RIVALS.get(r["provider"], ())
                      if (_key(r), name, r["dropout"]) in by), None)
        vs = f"{r['p50_ms'] / rival['p50_ms']:.2f}" if rival else "-"
        p = "-" if r["dropout"] == "" else f"{r['dropout']:g}"
        out.append(
            f"| {r['provider']} | {_weights(r['dtype'])} | {p} | {r['M']} | {r['K']} / {r['N']} "
            f"| {_ms(r['p50_ms'])} ({_ms(r['p20_ms'])}-{_ms(r['p80_ms'])}) "
            f"| {r['M'] / r['p50_ms'] * 1e3:,.0f} | {r['ratio_to_base']:.2f} | {vs} "
            f"| {_mb(r['peak_mb'])} | {_mb(r['saved_mb'])} |")
    return out


def write_markdown(rows: list[dict], meta: dict, path: Path) -> str:
    env = meta["env"]
    text = [
        f"# fastlora benchmark: {env['device']}, {env['date']}",
        "",
        f"torch {env['torch']}, triton {env['triton'] or '-'}, fastlora {env['fastlora']}, "
        f"dtype {meta['dtype']}, preset {meta['preset']}. Command: `{meta['command']}`",
        "",
        "Times are medians (p50) in ms; ratios divide medians. `fastlora/PEFT` above 1 means fastlora was "
        "slower (marked `!`; `!!` where slower beyond the run's noise: see paired). paired: the median over the "
        "timing rounds of fastlora's time over its rival's in the same round, with its 95% interval; a spell of "
        "noise on a shared CPU slows both calls of a round, which this ratio cancels and a ratio of medians "
        "does not (bench/README.md). Beyond noise: that interval lies above 1 (for runs without it: the 95% "
        "intervals of the two medians do not overlap). peak MB: the most memory the measured call allocated "
        "beyond its inputs and weights (the backward alone counts the activations its forward saved); saved MB: "
        "activations autograd keeps for the backward; out MB: the output. See bench/README.md.",
    ]
    lines = comparisons(rows)
    for op in dict.fromkeys(r["op"] for r in rows):
        text += ["", f"## {op}", ""]
        op_lines = [c for c in lines if c["op"] == op]
        if op == "train_step":
            text += _train_step_table([r for r in rows if r["op"] == op])
        elif op == "nf4_linear":
            text += _nf4_linear_tables([r for r in rows if r["op"] == op], op_lines)
        else:
            text += _lora_linear_table(op_lines)
        text += ["", _summary(op_lines)]
    text.append("")
    path.write_text("\n".join(text))
    return "\n".join(text)


def _summary(lines: list[dict]) -> str:
    """Per rival: fastlora's time over theirs across the comparisons, by medians and round by round."""
    out = []
    for against in dict.fromkeys(c["against"] for c in lines):
        group = [c for c in lines if c["against"] == against]
        name = RIVAL_NAMES.get(against, against)
        slower = [c for c in group if c["slower"]]
        clearly = [c for c in group if c["clearly_slower"]]
        faster = [c for c in group if c["clearly_faster"]]
        heavier = [c for c in group if c["heavier"]]
        worst = max(group, key=lambda c: c["vs_theirs"])
        ratios = sorted(c["vs_theirs"] for c in group)
        paired = [c for c in group if not math.isnan(c["paired"])]
        out.append(
            f"fastlora/{name} time over {len(group)} comparisons: median {ratios[len(ratios) // 2]:.2f}, "
            f"best {ratios[0]:.2f}, worst {worst['vs_theirs']:.2f} ({_where(worst)}). Slower than {name} (median) "
            f"in {len(slower)}.")
        if paired:
            by_round = sorted(c["paired"] for c in paired)
            worst = max(paired, key=lambda c: c["paired"])
            out.append(
                f"Paired, round by round: median {by_round[len(by_round) // 2]:.2f}, worst {worst['paired']:.2f} "
                f"({_where(worst)}), above 1 in {sum(r > 1.0 for r in by_round)}.")
        out.append(
            f"Slower beyond the run's noise in {len(clearly)}, faster beyond it in {len(faster)}; more memory than "
            f"{name} (peak or saved, by over 1 KiB) in {len(heavier)}.")
    return " ".join(out)


def _where(c: dict) -> str:
    """``forward M=2048 K=2816 N=1024 r=16 p=0``: one comparison's mode and shape."""
    adapter = "" if c["r"] == "" else f" r={c['r']} p={c['dropout']:g}"
    adapter += f" {_weights(c['dtype'])}" if "/" in c["dtype"] else ""
    return f"{c['mode']} M={c['M']} K={c['K']} N={c['N']}{adapter}"


# ---- README section -------------------------------------------------------------------------------------
README_START = "<!-- bench:start (generated by python -m bench.report RESULTS.json --readme README.md) -->"
README_END = "<!-- bench:end -->"


def readme_section(rows: list[dict], meta: dict, source: str) -> str:
    """A summary of one run for the README: per mode and dropout, fastlora's time and peak memory over
    PEFT's across every measured shape, then the training-step table."""
    env = meta["env"]
    text = [
        f"Measured on {env['device']}, {env['date']}, {meta['dtype']}, torch {env['torch']}, "
        f"preset {meta['preset']} (`{meta['command']}`); every row: [{source}]({source}).",
        "",
    ]
    lines = [c for c in comparisons(rows) if c["op"] == "lora_linear"]
    if lines:
        text += [
            "One LoRA linear layer (shapes: M tokens x (K, N) projections x r), fastlora over PEFT "
            "(below 1: fastlora faster / lighter); slower in: the shapes where fastlora's median time is "
            "above PEFT's; paired: per shape, the median over the timing rounds of fastlora's time over "
            "PEFT's in the same round (bench/README.md); beyond noise: the shapes where the 95% interval of "
            "that ratio lies above 1 (for runs without it, where the 95% intervals of the two medians do not "
            "overlap):",
            "",
            "| mode | dropout | shapes | time: median | best | worst | slower in | paired: median | worst "
            "| above 1 | beyond noise | peak memory: median | worst |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for c in lines:
            groups[(c["mode"], c["dropout"])].append(c)
        for (mode, p), group in groups.items():
            times = sorted(c["vs_theirs"] for c in group)
            mems = sorted(c["ours"]["peak_mb"] / c["theirs"]["peak_mb"] for c in group if c["theirs"]["peak_mb"])
            slower = [c for c in group if c["slower"]]
            clearly = sum(c["clearly_slower"] for c in group)
            where = ", ".join(sorted({f"M={c['M']}" for c in slower}, key=lambda t: int(t[2:]))) or "none"
            paired = sorted(c["paired"] for c in group if not math.isnan(c["paired"]))
            by_round = (f"{paired[len(paired) // 2]:.2f} | {paired[-1]:.2f} | {sum(r > 1.0 for r in paired)}"
                        if paired else "- | - | -")
            text.append(
                f"| {mode} | {p:g} | {len(group)} | {times[len(times) // 2]:.2f} | {times[0]:.2f} | {times[-1]:.2f} "
                f"| {len(slower)} ({where}) | {by_round} | {clearly} | {mems[len(mems) // 2]:.2f} "
                f"| {mems[-1]:.2f} |")
    steps = [r for r in rows if r["op"] == "train_step"]
    if steps:
        text += ["", "Training step of a small Llama built from a config (LoRA r=16 on every projection):", ""]
        text += _train_step_table(steps)
    return "\n".join(text)


def update_readme(readme: Path, section: str) -> None:
    """Replace what lies between the README's bench markers (both must be there) with ``section``."""
    content = readme.read_text()
    if README_START not in content or README_END not in content:
        raise SystemExit(f"{readme}: missing the markers {README_START!r} ... {README_END!r}")
    head, rest = content.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_START}\n{section}\n{README_END}{tail}")


# ---- plots ------------------------------------------------------------------------------------------------
COLORS = {"base": "tab:gray", "peft": "tab:blue", "fastlora": "tab:orange", "dequant_matmul": "tab:purple",
          "bnb": "tab:green", "peft_bnb": "tab:cyan", "fastlora_qlora": "tab:red"}


def skip_plots_if_unavailable(no_plots: bool) -> bool:
    """``no_plots``, or True with a note on stderr where matplotlib is missing. Asked before a run, so that a
    long run does not end in an ImportError after its tables are written."""
    if no_plots:
        return True
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("bench: no plots: matplotlib is not installed (pip install -e \".[bench]\" adds it); the CSV, "
              "JSON and markdown are written as usual", file=sys.stderr)
        return True
    return False


def write_plots(rows: list[dict], meta: dict, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for op in dict.fromkeys(r["op"] for r in rows):
        op_rows = [r for r in rows if r["op"] == op]
        plot = {"train_step": _plot_train_step, "nf4_linear": _plot_nf4_linear}.get(op, _plot_lora_linear)
        fig = plot(plt, op_rows, meta)
        path = stem.with_name(f"{stem.name}_{op}.png")
        fig.savefig(path, dpi=80, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def _plot_lora_linear(plt, rows: list[dict], meta: dict):
    """Time by shape per provider, as a multiple of the base matmul's (its ms under each shape): on a log
    scale of raw times the providers' lines lie on top of each other."""
    dropouts = sorted({r["dropout"] for r in rows if r["provider"] != "base"})
    ranks = sorted({r["r"] for r in rows if r["provider"] != "base"})
    rank = 16 if 16 in ranks else ranks[len(ranks) // 2]
    return _ratio_grid(
        plt, rows, dropouts, keep=lambda r, p: r["r"] == rank and r["dropout"] == p,
        title=lambda mode, p: f"{mode}, r={rank}, dropout={p:g}", ylabel="p50 / base p50", legend_size=8,
        suptitle=f"lora_linear time relative to the base matmul (M x K x N, base ms below), {meta['dtype']}: "
                 f"{meta['env']['device']}, {meta['env']['date']}")


def _plot_nf4_linear(plt, rows: list[dict], meta: dict):
    """Time by shape relative to the dense base matmul, one panel per mode and weight format; the LoRA
    providers at their smallest rank and dropout 0."""
    formats = list(dict.fromkeys(_weights(r["dtype"]) for r in rows if "/" in r["dtype"]))
    ranks = sorted({r["r"] for r in rows if r["r"] != ""})
    return _ratio_grid(
        plt, rows, formats,
        keep=lambda r, fmt: (_weights(r["dtype"]) == fmt
                             and (r["r"] == "" or (r["r"] == ranks[0] and r["dropout"] == 0))),
        title=lambda mode, fmt: f"{mode}, {fmt}" + (f" (LoRA r={ranks[0]}, dropout 0)" if ranks else ""),
        ylabel="p50 / dense base p50", log=True, legend_size=7,
        suptitle=f"nf4_linear time relative to the dense base matmul (M x K x N, base ms below), {meta['dtype']}: "
                 f"{meta['env']['device']}, {meta['env']['date']}")


def _ratio_grid(plt, rows: list[dict], columns: list, keep, title, ylabel: str, suptitle: str, log: bool = False,
                legend_size: int = 8):
    """One panel per mode (rows of the grid) and per entry of ``columns``: each provider's time by shape
    as a multiple of the base's, the base's ms under each shape. ``keep(row, column)``: whether an
    adapter provider's row belongs in that column's panel (the base's always does); ``title(mode,
    column)``: the panel's title. A provider without a point in a panel is left out of it (and of the
    legend)."""
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    shapes = sorted({(r["K"], r["N"], r["M"]) for r in rows})
    fig, axes = plt.subplots(len(modes), len(columns), figsize=(max(6.5, 0.55 * len(shapes)) * len(columns),
                                                                 3.4 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        base = {(r["K"], r["N"], r["M"]): r["p50_ms"] for r in rows if r["mode"] == mode and r["provider"] == "base"}
        labels = [f"{m}x{k}x{n}\n{base[(k, n, m)]:.3g} ms" if (k, n, m) in base else f"{m}x{k}x{n}"
                  for k, n, m in shapes]
        for j, column in enumerate(columns):
            ax = axes[i][j]
            for provider, color in COLORS.items():
                by_shape = {(r["K"], r["N"], r["M"]): r["ratio_to_base"] for r in rows
                            if r["mode"] == mode and r["provider"] == provider
                            and (provider == "base" or keep(r, column))}
                xs = [x for x, s in enumerate(shapes) if s in by_shape]
                if xs:
                    ax.plot(xs, [by_shape[shapes[x]] for x in xs], "o-", color=color, label=provider, ms=3, lw=1)
            ax.set_title(title(mode, column), fontsize=9)
            ax.set_ylabel(ylabel)
            if log:
                ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels(labels, rotation=70, fontsize=6)
    axes[0][0].legend(fontsize=legend_size)
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def _plot_train_step(plt, rows: list[dict], meta: dict):
    several = len({r["N"] for r in rows}) > 1  # the CPU QLoRA model's MLP differs (bench/train_step.py)
    labels = [r["provider"] + ("" if r["dropout"] == "" else f"\np={r['dropout']:g}")
              + (f"\nMLP {r['N']}" if several else "") for r in rows]
    tokens_per_s = [r["M"] / r["p50_ms"] * 1e3 for r in rows]
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2, 3.5))
    ax.bar(range(len(rows)), tokens_per_s, color=[COLORS.get(r["provider"], "tab:green") for r in rows])
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("tokens/s (higher is better)")
    r0 = rows[0]
    ax.set_title(f"train_step, {r0['M']} tokens, hidden {r0['K']}, {meta['dtype']}: {meta['env']['device']}, "
                 f"{meta['env']['date']}", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a RESULTS.json written by python -m bench")
    parser.add_argument("--readme", type=Path, help="also rewrite this README's generated benchmark section")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = parser.parse_args(argv)
    no_plots = skip_plots_if_unavailable(args.no_plots)
    rows, meta = read_json(args.results)
    stem = args.results.with_suffix("")
    write_markdown(rows, meta, stem.with_suffix(".md"))
    if not no_plots:
        write_plots(rows, meta, stem)
    if args.readme is not None:
        source = args.results.with_suffix(".md")
        try:  # a link relative to the README
            source = source.resolve().relative_to(args.readme.resolve().parent)
        except ValueError:
            pass
        update_readme(args.readme, readme_section(rows, meta, source.as_posix()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
