"""What every benchmark shares: device and dtype choice, the environment columns, the one-layer model
and its inputs, timing and memory.

Timing (``time_calls``):
- CPU: the calls of one group (every provider for one shape and mode) run interleaved, round after
  round, each round in a new random order (seeded), each call timed alone with ``time.perf_counter``; so
  a slow minute of a shared machine hits every provider alike, and no provider always runs right after
  the same one. (A rotating order did that: in a group listed base, PEFT, fastlora, ... each fastlora
  call ran right after its PEFT twin in all rounds but one, which measured fastlora up to 10% slower
  than the same code placed elsewhere in the list; shuffled, the two agree within 1%: 2-core EPYC, 16 x
  1024 x 1024, r 16.) At least ``min_rounds`` rounds (25): the calls of a 2048-row group take 20 to 100
  ms, and the time budget alone gave them 6 rounds; with 15, single rows of a full run still came out 10
  to 14% off the rest of their shape. Each provider holds its own copy of the weights, so the calls in
  between evict a call's weights from the caches (they arrive cold, as each layer's do in a model, and
  as ``do_bench`` makes them on a GPU by clearing the L2) while the interpreter and the dispatcher stay
  warm, as they are in a model. Flushing every cache level before each call instead was tried and
  rejected: it makes the Python code of every layer cold too, which no model sees (PEFT's 16 x 16 LoRA
  forward+backward: 0.07 ms warm, 0.29 ms after a flush, AMD EPYC). Where the providers compute on
  one weight (bench/lora_linear.py), they trade their copies halfway (``halfway``): where a copy lies
  in memory can make every call on it faster or slower, which more rounds do not average out (full run,
  2-core Zen 5 EPYC, one row, 1024 -> 1024: PEFT's r 8 layer took 0.239 ms against 0.27-0.28 for its
  other ranks, so fastlora measured 1.14x of it; the same group run alone gave 0.95-0.97, four times).
  The garbage collector is off while timing. ``budget_s`` is the wall time per call in the group. Each
  provider's samples keep their round order (``Stats.seconds``), so two providers compare round by
  round too (``paired_ratio``).
- CUDA: ``triton.testing.do_bench`` (CUDA events; warm-up first) per call, or
  ``torch.cuda.Event`` timing when triton is missing; ``time_cuda_graph`` replays a captured graph
  for decode shapes (M <= 16), where launch latency is the cost.

Memory (``measure_memory``), in MiB:
- ``peak_mb``: the most memory the call had allocated at any moment beyond what was allocated when it
  started (inputs, weights: the same for every provider), plus, for the backward alone, the
  activations its forward saved (they are held for it). CUDA: ``max_memory_allocated()`` after
  ``reset_peak_memory_stats()``, minus ``memory_allocated()`` before. CPU, which has no allocator
  peak counter: the running sum of the allocation and free events that ``torch.profiler`` records
  with ``profile_memory=True``.
- ``saved_mb``: what autograd keeps for the backward from the call's forward: the unique storages
  passed through ``torch.autograd.graph.saved_tensors_hooks``, leaving out those alive before the
  call (inputs, weights). Device-independent; 0 for a forward without grad.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Iterable

import torch

__all__ = [
    "CSV_COLUMNS",
    "MODES",
    "Call",
    "Env",
    "OneLinear",
    "Stats",
    "default_dtype",
    "dense_linear",
    "dtype_name",
    "environment",
    "measure_memory",
    "paired_ratio",
    "parse_dtype",
    "pick_device",
    "random_x_dy",
    "setup_device",
    "time_calls",
    "time_cuda_graph",
]

# The columns BENCH.md fixes, in its order; extra measurements go to the markdown table only.
CSV_COLUMNS = (
    "op", "provider", "mode", "M", "K", "N", "r", "dtype", "dropout",
    "p50_ms", "p20_ms", "p80_ms", "peak_mb", "ratio_to_base",
    "device", "torch", "triton", "fastlora", "date",
)

# forward_nograd: inference; forward: the forward of a training step (builds the autograd graph);
# backward: the backward alone, on a graph kept alive (retain_graph); full: forward + backward.
MODES = ("forward_nograd", "forward", "backward", "full")

MIB = 2.0**20
REPO_ROOT = Path(__file__).resolve().parent.parent


# ---- device, dtype, environment ----------------------------------------------------------------------
def pick_device(name: str | None = None) -> torch.device:
    """``cuda`` when available (or asked for), else ``cpu``."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available in this process")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU (what LoRA training runs in), fp32 on CPU (CPU half-precision matmuls are not the
    code path anyone trains with, and their speed says nothing about a GPU)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
           "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def parse_dtype(text: str) -> torch.dtype:
    try:
        return _DTYPES[text.lower()]
    except KeyError:
        raise SystemExit(f"unknown dtype {text!r}; one of {', '.join(_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def setup_device(name: str | None, dtype: str | None, threads: int | None) -> tuple[torch.device, torch.dtype]:
    """What a command line's ``--device``, ``--dtype`` and ``--threads`` ask for: torch's CPU threads set
    (when given), the device (``pick_device``) and the dtype (``default_dtype`` unless given)."""
    if threads:
        torch.set_num_threads(threads)
    device = pick_device(name)
    return device, parse_dtype(dtype) if dtype else default_dtype(device)


@dataclass(frozen=True)
class CpuModel:
    """The CPU's model name and, on x86, its family and model numbers and widest vector ISA: a VM may name
    every generation "AMD EPYC", and BLAS picks its kernels (and so the timings) by generation, so results
    from two of them must not share a name."""

    name: str
    family: str = ""
    model: str = ""
    isa: str = ""

    @property
    def detail(self) -> str:  # "family 26 model 2 avx512"
        ids = f"family {self.family} model {self.model}" if self.family else ""
        return " ".join(filter(None, [ids, self.isa]))

    @property
    def tag(self) -> str:  # "f26m2", for file names
        return f"f{self.family}m{self.model}" if self.family else ""


def _cpu_model(cpuinfo: str | None = None) -> CpuModel:
    """From ``cpuinfo`` (the text of /proc/cpuinfo, read when not given)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "cpu family", "model", "flags"):
            fields.setdefault(key, value.strip())
        if len(fields) == 4:
            break
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown cpu"
    flags = set(fields.get("flags", "").split())
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else ""
    return CpuModel(name, fields.get("cpu family", ""), fields.get("model", ""), isa)


def _fastlora_version() -> str:
    import fastlora

    version = fastlora.__version__
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fastlora", "kernels"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{head}{'.dirty' if dirty else ''}" if head else version


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return ""
    return triton.__version__


@dataclass(frozen=True)
class Env:
    """The columns that say where and with what a row was measured."""

    device: str  # e.g. "cpu AMD EPYC (family 26 model 2 avx512, 2 threads)", "cuda NVIDIA H100 80GB HBM3"
    slug: str  # for file names, e.g. "cpu_amd-epyc-f26m2"
    torch: str
    triton: str
    fastlora: str
    date: str  # ISO date of the run

    def columns(self) -> dict[str, str]:
        return {"device": self.device, "torch": self.torch, "triton": self.triton,
                "fastlora": self.fastlora, "date": self.date}


def environment(device: torch.device, cpuinfo: str | None = None) -> Env:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        label = f"cuda {name}"
    else:
        cpu = _cpu_model(cpuinfo)
        label = f"cpu {cpu.name} ({', '.join(filter(None, [cpu.detail, f'{torch.get_num_threads()} threads']))})"
        name = f"{cpu.name} {cpu.tag}"
    slug = f"{device.type}_" + (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown")
    return Env(device=label, slug=slug, torch=torch.__version__, triton=_triton_version(),
               fastlora=_fastlora_version(), date=_dt.date.today().isoformat())


# ---- one-layer models and their inputs -----------------------------------------------------------------
class OneLinear(torch.nn.Module):
    """The smallest model PEFT and fastlora can wrap: one linear layer named ``proj``."""

    def __init__(self, proj: torch.nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def dense_linear(weight: torch.Tensor) -> torch.nn.Linear:
    """An ``nn.Linear`` without bias holding a copy of ``weight`` [out, in], on its device and in its dtype."""
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def random_x_dy(m: int, k: int, n: int, seed: int, device: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's input x [m, k] (requiring grad) and output gradient dy [m, n], drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(device, dtype).requires_grad_(True)
    dy = torch.randn(m, n, generator=gen).to(device, dtype)
    return x, dy


# ---- what is measured -----------------------------------------------------------------------------------
@dataclass
class Call:
    """One provider's measured call, ready to run.

    ``fn`` does the measured work once (for ``backward`` on a graph built at setup with
    ``retain_graph=True``); it calls ``reset`` first (drop the ``.grad`` of the last call, so calls
    do not accumulate). ``forward`` is the forward alone with grad enabled (what ``saved_mb`` looks
    at; None for modes without grad). ``keep`` lists tensors alive before the call (inputs, weights),
    which are not counted. ``runs_on_saved``: the call consumes activations saved before it (the
    backward alone), so they count towards its peak.
    """

    fn: Callable[[], object]
    reset: Callable[[], None] = lambda: None
    forward: Callable[[], object] | None = None
    keep: list[torch.Tensor] = field(default_factory=list)
    out_bytes: int = 0
    runs_on_saved: bool = False
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Stats:
    p50_ms: float
    p20_ms: float
    p80_ms: float
    samples: int
    timer: str  # "perf_counter", "do_bench", "cuda_event", "cuda_graph"
    # A 95% confidence interval of the median (NaN where the timer gives no samples): two providers whose
    # intervals do not overlap differ by more than this run's noise.
    p50_lo_ms: float = float("nan")
    p50_hi_ms: float = float("nan")
    # The CPU timer's samples in seconds, one a round in round order (so the calls of one round pair up:
    # ``paired_ratio``); empty for the CUDA timers.
    seconds: tuple[float, ...] = field(default=(), repr=False)


def _quantiles_ms(seconds: list[float]) -> tuple[float, float, float]:
    qs = statistics.quantiles(seconds, n=10, method="inclusive") if len(seconds) > 1 else seconds * 9
    return statistics.median(seconds) * 1e3, qs[1] * 1e3, qs[7] * 1e3  # p50, p20, p80


def _median_interval(values: list[float]) -> tuple[float, float] | None:
    """The distribution-free 95% interval of the median: the order statistics n/2 -+ 1.96 sqrt(n)/2 (None
    below 6 values)."""
    n = len(values)
    if n < 6:
        return None
    ordered = sorted(values)
    half = 1.96 * math.sqrt(n) / 2
    return ordered[max(0, math.floor(n / 2 - half))], ordered[min(n - 1, math.ceil(n / 2 + half) - 1)]


def _median_interval_ms(seconds: list[float]) -> dict[str, float]:
    interval = _median_interval(seconds)
    return {} if interval is None else {"p50_lo_ms": interval[0] * 1e3, "p50_hi_ms": interval[1] * 1e3}


def paired_ratio(ours: Stats, theirs: Stats) -> dict[str, float]:
    """``paired_ratio``: the median over rounds of our time over theirs in the same round, with its 95%
    interval (``paired_lo``, ``paired_hi``); empty without per-round samples (the CUDA timers).

    On a shared CPU the noise comes in spells longer than a round (the calls of a 2048-row round take
    0.2-0.5 s), and a spell slows both calls of a round alike: the ratio of one round's two calls cancels
    it, the ratio of two medians does not. One run, 2-core Zen 4 EPYC, 2048 x 2816 -> 1024, r 8, forward
    without grad, 25 rounds: medians 94.3 vs 103.7 ms, whose intervals (76.7-105.8, 83.9-112.1) overlap
    and say nothing; paired 0.953 (0.873-0.965)."""
    if not ours.seconds or len(ours.seconds) != len(theirs.seconds):
        return {}
    ratios = [a / b for a, b in zip(ours.seconds, theirs.seconds)]
    interval = _median_interval(ratios)
    if interval is None:
        return {}
    return {"paired_ratio": statistics.median(ratios), "paired_lo": interval[0], "paired_hi": interval[1]}


def time_calls(
    calls: dict[Hashable, Callable[[], object]],
    device: torch.device,
    budget_s: float = 0.5,
    min_rounds: int = 25,
    max_rounds: int = 2000,
    warmup_rounds: int = 2,
    halfway: Callable[[], object] | None = None,
) -> dict[Hashable, Stats]:
    """p50/p20/p80 in ms of each call (see the module docstring for how, per device). CPU: ``halfway`` is
    called once, after half of the rounds (to hand the providers each other's weights)."""
    if device.type == "cuda":
        return {key: _time_cuda(fn, budget_s) for key, fn in calls.items()}
    return _time_cpu_interleaved(calls, budget_s, min_rounds, max_rounds, warmup_rounds, halfway)


def _time_cpu_interleaved(calls, budget_s, min_rounds, max_rounds, warmup_rounds,
                          halfway=None) -> dict[Hashable, Stats]:
    keys = list(calls)
    samples: dict[Hashable, list[float]] = {key: [] for key in keys}
    clock = time.perf_counter
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(warmup_rounds):
            start = clock()
            for key in keys:
                calls[key]()
            round_s = clock() - start
        rounds = max(min_rounds, min(max_rounds, int(budget_s * len(keys) / max(round_s, 1e-9))))
        order = list(keys)
        shuffle = random.Random(0).shuffle
        for done in range(rounds):
            if halfway is not None and done == rounds // 2:
                halfway()
            shuffle(order)  # no provider always runs right after the same one (see the module docstring)
            for key in order:
                fn = calls[key]
                start = clock()
                fn()
                samples[key].append(clock() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {key: _cpu_stats(samples[key]) for key in keys}


def _cpu_stats(seconds: list[float]) -> Stats:
    """The ``Stats`` of one call's CPU samples, in round order."""
    return Stats(*_quantiles_ms(seconds), samples=len(seconds), timer="perf_counter", seconds=tuple(seconds),
                 **_median_interval_ms(seconds))


def _time_cuda(fn: Callable[[], object], budget_s: float) -> Stats:
    rep_ms = max(25.0, budget_s * 1e3)
    try:
        from triton.testing import do_bench
    except ImportError:
        return _time_cuda_events(fn, rep_ms)
    p50, p20, p80 = do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return Stats(p50, p20, p80, samples=0, timer="do_bench")


def _time_cuda_events(fn: Callable[[], object], rep_ms: float) -> Stats:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times: list[float] = []
    total = 0.0
    while total < rep_ms or len(times) < 10:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        total += times[-1] * 1e3
    return Stats(*_quantiles_ms(times), samples=len(times), timer="cuda_event", **_median_interval_ms(times))


def time_cuda_graph(fn: Callable[[], object], budget_s: float = 0.5) -> Stats | None:
    """``fn`` captured in a CUDA graph and replayed, or None (with a warning) when it cannot be captured
    (a host sync inside, such as ``.item()``, or a backward whose forward ran outside the capture)."""
    try:
        from triton.testing import do_bench_cudagraph

        p50, p20, p80 = do_bench_cudagraph(fn, rep=max(20.0, budget_s * 1e3), quantiles=[0.5, 0.2, 0.8])
    except Exception as err:  # noqa: BLE001 - any capture failure means "no graph row", not a crash
        print(f"bench: CUDA graph capture failed ({type(err).__name__}: {str(err).splitlines()[0][:120]})",
              file=sys.stderr)
        torch.cuda.synchronize()
        return None
    return Stats(p50, p20, p80, samples=0, timer="cuda_graph")


# ---- memory ---------------------------------------------------------------------------------------------
def measure_memory(call: Call, device: torch.device) -> dict[str, float]:
    """``peak_mb``, ``saved_mb`` and ``out_mb`` of one call (module docstring)."""
    saved = _saved_bytes(call.forward, call.keep) if call.forward is not None else 0
    call.reset()  # the last call's gradients are freed here, not inside the measured call
    if device.type == "cuda":
        peak = _cuda_peak_bytes(call.fn, device)
    else:
        peak = _cpu_peak_bytes(call.fn)
    if call.runs_on_saved:
        peak += saved
    return {"peak_mb": peak / MIB, "saved_mb": saved / MIB, "out_mb": call.out_bytes / MIB}


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    storage = t.untyped_storage()
    return (str(t.device), storage.data_ptr())


def _saved_bytes(forward: Callable[[], object], keep: Iterable[torch.Tensor]) -> int:
    alive = {_storage_key(t) for t in keep}
    seen: dict[tuple[str, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in alive:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())


def _cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


@contextlib.contextmanager
def _quiet_fd(fd: int):
    """Silence a C-level file descriptor (kineto prints 'profiler_start/stop' lines to stderr)."""
    try:
        sys.stderr.flush()
        saved = os.dup(fd)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with _quiet_fd(2), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak
