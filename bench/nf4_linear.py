"""One linear layer with a frozen 4-bit NF4 weight, with and without LoRA on top (QLoRA).

Providers (one dense weight W per shape; every NF4 provider quantizes it itself, blocksize 64):
- ``base``: ``torch.nn.functional.linear(x, W)`` on the dense 16-bit (CPU: fp32) weight: the floor
  that a 4-bit layer is measured against.
- ``dequant_matmul``: fastlora's NF4 dequantize (the Triton kernel on CUDA, the reference on CPU) into
  a fresh tensor, then ``F.linear``: the naive 4-bit layer, which fastlora must never be slower than.
- ``bnb``: ``bitsandbytes.nn.Linear4bit`` (nf4, ``compute_dtype`` = the run's dtype) where bitsandbytes
  imports.
- ``fastlora``: ``fastlora.LinearNF4.from_linear``.
- ``peft_bnb``: PEFT's LoRA layer around a bitsandbytes ``Linear4bit``, as ``peft.get_peft_model``
  builds it for a model transformers loaded in 4 bits (``is_loaded_in_4bit``: PEFT's bnb layer).
- ``fastlora_qlora``: ``fastlora.LoraLinear`` around a ``LinearNF4`` (``fastlora.quantize_model`` then
  ``fastlora.get_peft_model``), with PEFT's adapter weights (``init_lora_weights=False``, copied).

Each NF4 provider is measured with and without double quantization (bitsandbytes'
``compress_statistics``). As in ``bench/lora_linear.py``: x requires grad (the backward computes dx,
and dA, dB for LoRA), the layers are in training mode in every mode, no bias, adapters in fp32,
``lora_alpha = 2 r``. The 4-bit weights are frozen and never get a gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import MODES, Call, OneLinear, dense_linear, random_x_dy
from bench.lora_linear import mode_call

__all__ = ["BLOCKSIZE", "OP", "PROVIDERS", "Inputs", "Spec", "bnb_linear4bit", "build", "check_outputs",
           "release_workspace", "specs"]

OP = "nf4_linear"
PROVIDERS = ("base", "dequant_matmul", "bnb", "fastlora", "peft_bnb", "fastlora_qlora")
QUANT_PROVIDERS = ("dequant_matmul", "bnb", "fastlora")  # the 4-bit matmul alone, no adapter
QLORA_PROVIDERS = ("peft_bnb", "fastlora_qlora")
BITSANDBYTES = ("bnb", "peft_bnb")
BLOCKSIZE = 64

# (K, N) = (in, out), as in bench/lora_linear.py. Every K is a multiple of the blocksize: bitsandbytes
# 0.50.2's CPU dequantize is wrong when a quantization block spans two rows (tests/test_qlora.py), and
# on a GPU the Llama shapes all are. M follows BENCH.md's NF4 line.
CPU_SHAPES = {
    "full": dict(kn=[(1024, 1024), (1024, 2816), (2816, 1024)], m=[1, 16, 128, 1024, 2048], r=[16],
                 dropout=[0.0, 0.1], double_quant=[False, True]),
    "quick": dict(kn=[(1024, 2816)], m=[1, 16, 128, 1024], r=[16], dropout=[0.0, 0.1], double_quant=[False]),
}
GPU_SHAPES = {
    # Llama-2-7B (q/k/v/o, gate/up, down) and Llama-3-8B (k/v, gate/up, down).
    "full": dict(kn=[(4096, 4096), (4096, 11008), (11008, 4096), (4096, 1024), (4096, 14336), (14336, 4096)],
                 m=[1, 16, 128, 2048, 8192], r=[16, 64], dropout=[0.0, 0.1], double_quant=[False, True]),
    "quick": dict(kn=[(4096, 4096), (4096, 11008), (11008, 4096)], m=[1, 16, 128, 2048, 8192], r=[16],
                  dropout=[0.0, 0.1], double_quant=[False, True]),
}


@dataclass(frozen=True)
class Spec:
    """One measurement. ``double_quant`` is None for ``base`` (dense); ``r`` and ``dropout`` are set for
    the LoRA providers only."""

    provider: str
    mode: str
    M: int
    K: int
    N: int
    double_quant: bool | None = None
    r: int | None = None
    dropout: float | None = None

    @property
    def group(self) -> tuple:
        """What is compared side by side: one shape, one mode (both weight formats, every provider)."""
        return (self.mode, self.M, self.K, self.N)

    @property
    def weights(self) -> str:
        """The weight format: ``dense``, ``nf4`` or ``nf4dq`` (double quantization)."""
        return "dense" if self.double_quant is None else ("nf4dq" if self.double_quant else "nf4")

    def dtype_label(self, compute: str) -> str:
        """The CSV's dtype: the compute dtype, after the weight format for a 4-bit weight (``nf4/bfloat16``)."""
        return compute if self.double_quant is None else f"{self.weights}/{compute}"

    @property
    def id(self) -> str:
        weights = "" if self.double_quant is None else f"-{self.weights}"
        adapter = "" if self.r is None else f"-r{self.r}-p{self.dropout:g}"
        return f"{self.provider}-{self.mode}-M{self.M}-K{self.K}-N{self.N}{weights}{adapter}"


def has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def specs(device: torch.device, preset: str = "full", modes=MODES) -> list[Spec]:
    """Every measurement of ``preset`` ("full" or "quick"), base once per (mode, shape); the
    bitsandbytes providers only where bitsandbytes imports."""
    grid = (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)[preset]
    skip = () if has_bitsandbytes() else BITSANDBYTES
    out: list[Spec] = []
    for (k, n), m, mode in product(grid["kn"], grid["m"], modes):
        out.append(Spec("base", mode, m, k, n))
        for dq in grid["double_quant"]:
            out += [Spec(p, mode, m, k, n, dq) for p in QUANT_PROVIDERS if p not in skip]
            for r, p in product(grid["r"], grid["dropout"]):
                out += [Spec(q, mode, m, k, n, dq, r, p) for q in QLORA_PROVIDERS if q not in skip]
    return out


# ---- the layers ----------------------------------------------------------------------------------------

def bnb_linear4bit(weight: torch.Tensor, double_quant: bool, compute_dtype: torch.dtype,
                   bias: torch.Tensor | None = None) -> nn.Module:
    """A ``bitsandbytes.nn.Linear4bit`` (nf4, blocksize 64) holding ``weight`` [out, in] quantized on its
    device, its quantization state in ``weight``'s dtype, as transformers' bitsandbytes loader makes it."""
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight.detach().to("cpu", copy=True), requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant, blocksize=BLOCKSIZE, module=layer)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to("cpu", copy=True), requires_grad=bias.requires_grad)
    return layer.to(weight.device)  # quantizes (on CPU too)


def _quantized(provider: str, weight: torch.Tensor, double_quant: bool, dtype: torch.dtype):
    """The layer (or, for ``dequant_matmul``, the ``(packed, state)`` pair) of one no-adapter provider."""
    import fastlora

    if provider == "bnb":
        return bnb_linear4bit(weight, double_quant, dtype).train()
    layer = fastlora.LinearNF4.from_linear(dense_linear(weight), blocksize=BLOCKSIZE, double_quant=double_quant).train()
    return (layer.weight, layer.quant_state) if provider == "dequant_matmul" else layer


def _qlora_layers(weight: torch.Tensor, double_quant: bool, r: int, dropout: float,
                  dtype: torch.dtype) -> dict[str, nn.Module]:
    """PEFT's LoRA over bitsandbytes and fastlora's LoRA over ``LinearNF4``, same adapter weights."""
    import fastlora

    kwargs = dict(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["proj"], init_lora_weights=False)
    ours = fastlora.quantize_model(OneLinear(dense_linear(weight)), blocksize=BLOCKSIZE, double_quant=double_quant)
    ours = fastlora.get_peft_model(ours, fastlora.LoraConfig(**kwargs)).base_model.model.proj
    layers = {"fastlora_qlora": ours}
    if has_bitsandbytes():
        import peft

        model = OneLinear(bnb_linear4bit(weight, double_quant, dtype))
        model.is_loaded_in_4bit = True  # what transformers sets on a 4-bit model: PEFT then uses its bnb layer
        theirs = peft.get_peft_model(model, peft.LoraConfig(**kwargs)).base_model.model.proj
        adapter = {key: value for key, value in theirs.state_dict().items() if "lora_" in key}
        result = ours.load_state_dict(adapter, strict=False)  # PEFT's key names: same adapter weights
        if result.unexpected_keys or any("lora_" in key for key in result.missing_keys):
            raise RuntimeError(f"PEFT's adapter weights do not load into fastlora's layer: {result}")
        layers["peft_bnb"] = theirs
    for layer in layers.values():
        layer.train()
    return layers


def release_workspace(device: torch.device) -> None:
    """Free fastlora's NF4 dequantization workspace (CUDA), so that the next call's peak memory counts it:
    bitsandbytes allocates its dequantized weight inside every call, fastlora keeps one buffer per
    (device, dtype) across calls, and a peak measured with the buffer already there would hide it."""
    from fastlora.ops.dispatch import resolve_backend

    kernels = resolve_backend("nf4_linear", device) if device.type == "cuda" else None
    if kernels is not None:
        kernels.nf4_workspace_clear()


class Inputs:
    """The dense weight, inputs and layers of one (K, N) at a time (asking for another frees the last)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, seed: int = 0):
        self.device, self.dtype, self.seed = device, dtype, seed
        self._kn: tuple[int, int] | None = None
        self._weight: torch.Tensor | None = None
        self._inputs: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._layers: dict[tuple, object] = {}

    def _focus(self, k: int, n: int) -> None:
        if self._kn != (k, n):
            self._weight = None
            self.clear()
            self._kn = (k, n)

    def weight(self, k: int, n: int) -> torch.Tensor:
        self._focus(k, n)
        if self._weight is None:
            gen = torch.Generator().manual_seed(self.seed)
            self._weight = (torch.randn(n, k, generator=gen) / k**0.5).to(self.device, self.dtype)  # [out, in]
        return self._weight

    def x_dy(self, m: int, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._focus(k, n)
        if (m, k, n) not in self._inputs:
            self._inputs[(m, k, n)] = random_x_dy(m, k, n, self.seed + 1, self.device, self.dtype)
        return self._inputs[(m, k, n)]

    def layer(self, spec: Spec):
        """The layer of ``spec`` (each provider its own copy of the weight, as in bench/lora_linear.py)."""
        self._focus(spec.K, spec.N)
        if spec.r is None:
            key = (spec.provider, spec.double_quant)
            if key not in self._layers:
                self._layers[key] = _quantized(spec.provider, self.weight(spec.K, spec.N), spec.double_quant,
                                               self.dtype)
            return self._layers[key]
        key = ("qlora", spec.double_quant, spec.r, spec.dropout)
        if key not in self._layers:
            torch.manual_seed(self.seed + 2)
            self._layers[key] = _qlora_layers(self.weight(spec.K, spec.N), spec.double_quant, spec.r, spec.dropout,
                                              self.dtype)
        return self._layers[key][spec.provider]

    def clear(self) -> None:
        self._inputs.clear()
        self._layers.clear()


def _dequantize(device: torch.device):
    """fastlora's NF4 dequantize: the Triton kernel where it serves the device, else the reference."""
    from fastlora.ops.dispatch import resolve_backend
    from fastlora.quant import dequantize_nf4

    kernels = resolve_backend("nf4_linear", device)
    if kernels is None:
        return dequantize_nf4
    return kernels.nf4_dequantize


def _layer_fn(spec: Spec, inputs: Inputs):
    """``(layer: x -> y, trainable tensors, tensors alive before the call)`` of one spec."""
    if spec.provider == "base":
        weight = inputs.weight(spec.K, spec.N)
        return (lambda t: F.linear(t, weight)), [], [weight]
    if spec.provider == "dequant_matmul":
        packed, state = inputs.layer(spec)
        dequantize = _dequantize(packed.device)
        dtype = inputs.dtype

        def layer(t):
            return F.linear(t, dequantize(packed, state, dtype))

        return layer, [], [packed, *state.tensors()]
    module = inputs.layer(spec)
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    state = getattr(base, "quant_state", None) or base.weight.quant_state  # fastlora's or bitsandbytes'
    state_tensors = state.tensors() if hasattr(state, "tensors") else _bnb_state_tensors(state)
    params = [p for p in module.parameters() if p.requires_grad]  # lora_A, lora_B (none without LoRA)
    return module, params, [*module.parameters(), *state_tensors]


def _bnb_state_tensors(state) -> list[torch.Tensor]:
    nested = getattr(state, "state2", None)
    found = [state.absmax, state.code] + ([nested.absmax, nested.code] if nested is not None else [])
    return [t for t in found if isinstance(t, torch.Tensor)]


def build(spec: Spec, inputs: Inputs) -> Call:
    """The measured call for ``spec`` (see ``bench.common.Call``)."""
    x, dy = inputs.x_dy(spec.M, spec.K, spec.N)
    layer, params, keep = _layer_fn(spec, inputs)
    call = mode_call(spec.mode, layer, x, dy, [x, *params], keep + [x, dy])
    if spec.provider in ("fastlora", "fastlora_qlora"):
        clear_grads = call.reset

        def reset():  # before a memory measurement: the workspace is allocated inside the call, as bnb's is
            clear_grads()
            release_workspace(x.device)

        call.reset = reset
    return call


# ---- do the providers compute the same layer? ---------------------------------------------------------
# Relative to the largest |value| of the reference. bitsandbytes and fastlora quantize to the same bytes
# (blocksize 64; tests/quant), so without double quantization they differ by matmul rounding only.
# With it, bitsandbytes' CPU library rounds an absmax that lies within ~3e-5 of a midpoint between two
# 8-bit levels through a lookup table, one level off fastlora's exact rounding (fastlora/quant/nf4.py):
# about 0.15% of the blocks of a random 1024 x 2816 weight, which moves outputs by up to ~3e-3.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
DOUBLE_QUANT_CPU_TOLERANCE = 1e-2
# The NF4 layer against the dense one: 4-bit rounding of N(0, 1/K) weights moves outputs by about 8% (mean).
DENSE_TOLERANCE = 0.25


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30)).item()


def check_outputs(inputs: Inputs, m: int, k: int, n: int, double_quant: bool, r: int | None) -> list[str]:
    """What disagrees between the providers on one (K, N) and weight format, one line each (empty: all
    agree). Compared on ``m`` rows, dropout 0: the packed bytes of fastlora and bitsandbytes; the outputs
    of fastlora, dequantize-then-matmul and bitsandbytes; with ``r``, the LoRA layers' outputs and their
    gradients (dx, dA, dB); and the 4-bit layer against the dense one (it must be the same weight)."""
    x, dy = inputs.x_dy(m, k, n)
    dtype = inputs.dtype
    tol = TOLERANCE.get(dtype, 2e-2)
    if double_quant and x.device.type == "cpu":
        tol = max(tol, DOUBLE_QUANT_CPU_TOLERANCE)
    problems = []

    def spec(provider, **kw):
        return Spec(provider, "forward", m, k, n, double_quant, **kw)

    def compare(what, ours, ref, limit):
        err = _rel(ours, ref)
        if not err <= limit:  # NaN fails too
            problems.append(f"{what}: relative difference {err:.2e} > {limit:g}")

    with torch.no_grad():
        dense = F.linear(x, inputs.weight(k, n))
        ours = inputs.layer(spec("fastlora"))(x)
        compare("fastlora vs dense F.linear", ours, dense, DENSE_TOLERANCE)
        packed, state = inputs.layer(spec("dequant_matmul"))
        compare("fastlora vs dequantize+F.linear", ours, F.linear(x, _dequantize(x.device)(packed, state, dtype)), tol)
        if has_bitsandbytes():
            bnb_layer = inputs.layer(spec("bnb"))
            bnb_bytes = bnb_layer.weight.data.reshape(-1).view(torch.uint8)
            if not torch.equal(inputs.layer(spec("fastlora")).weight.reshape(-1), bnb_bytes):
                problems.append("fastlora and bitsandbytes quantized W to different packed bytes")
            compare("fastlora vs bitsandbytes", ours, bnb_layer(x), tol)
    if r is not None:
        providers = [p for p in QLORA_PROVIDERS if p != "peft_bnb" or has_bitsandbytes()]
        results = {}
        for provider in providers:
            layer = inputs.layer(spec(provider, r=r, dropout=0.0))
            a, b = (p for name, p in layer.named_parameters() if p.requires_grad and "lora_" in name)
            y = layer(x)
            results[provider] = (y, *torch.autograd.grad(y, (x, a, b), dy))
        with torch.no_grad():
            delta = inputs.layer(spec("fastlora_qlora", r=r, dropout=0.0)).get_delta_weight("default")  # [N, K]
            compare("fastlora_qlora vs dense F.linear + LoRA", results["fastlora_qlora"][0],
                    dense + F.linear(x, delta.to(dtype)), DENSE_TOLERANCE)
        if "peft_bnb" in results:
            for name, ours_t, theirs_t in zip(("y", "dx", "dA", "dB"), results["fastlora_qlora"], results["peft_bnb"]):
                compare(f"fastlora_qlora vs peft_bnb ({name})", ours_t, theirs_t, tol)
    return problems
