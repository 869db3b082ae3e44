"""One LoRA linear layer: the bare base matmul vs PEFT's ``lora.Linear`` vs fastlora's ``LoraLinear``.

Providers (same base weight everywhere, same adapter weights for PEFT and fastlora):
- ``base``: ``torch.nn.functional.linear(x, W)`` with W frozen, no adapter: the floor.
- ``peft``: the layer ``peft.get_peft_model`` puts around one ``nn.Linear`` (``peft.tuners.lora.Linear``).
- ``fastlora``: the layer ``fastlora.get_peft_model`` puts there (``fastlora.LoraLinear``), adapter
  weights copied from PEFT's (``init_lora_weights=False``, so B is not zero).

As inside a model: base weight frozen, input requiring grad (the backward computes dx, dA, dB), the
layer in training mode (dropout active), no bias (Llama's projections have none), adapters in
fp32 as both libraries keep them by default, ``lora_alpha = 2 r``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import MODES, Call, OneLinear, dense_linear, random_x_dy

__all__ = ["OP", "PROVIDERS", "Inputs", "Spec", "build", "check_same_output", "mode_call", "specs",
           "trade_weights"]

OP = "lora_linear"
PROVIDERS = ("base", "peft", "fastlora")

# (K, N) = (in, out). CPU: Llama-2-7B's projections scaled down 4x (4096 -> 1024, 11008 -> 2816) so
# that the whole grid runs in minutes on 2 cores. GPU: BENCH.md's shapes.
CPU_SHAPES = {
    "full": dict(kn=[(1024, 1024), (1024, 2816), (2816, 1024)], m=[1, 16, 256, 1024, 2048],
                 r=[8, 16, 64], dropout=[0.0, 0.1]),
    "quick": dict(kn=[(1024, 2816)], m=[1, 16, 256, 1024], r=[16], dropout=[0.0, 0.1]),
}
GPU_SHAPES = {
    # Llama-2-7B (q/k/v/o, gate/up, down) and Llama-3-8B (k/v, gate/up, down).
    "full": dict(kn=[(4096, 4096), (4096, 11008), (11008, 4096), (4096, 1024), (4096, 14336), (14336, 4096)],
                 m=[1, 4, 16, 64, 256, 1024, 2048, 4096, 8192, 16384, 1000, 4097],
                 r=[8, 16, 64, 256, 12], dropout=[0.0, 0.1]),
    "quick": dict(kn=[(4096, 4096), (4096, 11008), (11008, 4096)], m=[1, 16, 256, 2048, 8192],
                  r=[16], dropout=[0.0, 0.1]),
}


@dataclass(frozen=True)
class Spec:
    """One measurement. ``r`` and ``dropout`` are None for ``base`` (it has no adapter)."""

    provider: str
    mode: str
    M: int
    K: int
    N: int
    r: int | None = None
    dropout: float | None = None

    @property
    def group(self) -> tuple:
        """What is compared side by side: one shape, one mode."""
        return (self.mode, self.M, self.K, self.N)

    @property
    def id(self) -> str:
        adapter = "" if self.r is None else f"-r{self.r}-p{self.dropout:g}"
        return f"{self.provider}-{self.mode}-M{self.M}-K{self.K}-N{self.N}{adapter}"


def specs(device: torch.device, preset: str = "full", modes=MODES) -> list[Spec]:
    """Every measurement of ``preset`` ("full" or "quick"), base once per (mode, shape)."""
    grid = (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)[preset]
    out: list[Spec] = []
    for (k, n), m, mode in product(grid["kn"], grid["m"], modes):
        out.append(Spec("base", mode, m, k, n))
        for r, p in product(grid["r"], grid["dropout"]):
            out += [Spec(provider, mode, m, k, n, r, p) for provider in PROVIDERS[1:]]
    return out


def _lora_layers(weight: torch.Tensor, r: int, dropout: float) -> dict[str, nn.Module]:
    """PEFT's and fastlora's layer around the same weight, with the same adapter weights."""
    import peft

    import fastlora

    kwargs = dict(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["proj"], init_lora_weights=False)
    theirs = peft.get_peft_model(OneLinear(dense_linear(weight)), peft.LoraConfig(**kwargs)).base_model.model.proj
    ours = fastlora.get_peft_model(OneLinear(dense_linear(weight)), fastlora.LoraConfig(**kwargs)).base_model.model.proj
    ours.load_state_dict(theirs.state_dict())  # same key names (PEFT's layout), so same adapter weights
    for layer in (theirs, ours):
        layer.train()
        layer.base_layer.weight.requires_grad_(False)
    return {"peft": theirs, "fastlora": ours}


class Inputs:
    """Base weights, inputs and LoRA layers, made once per (K, N) and shared by the specs that need them.

    Only one (K, N) is kept at a time: asking for another frees the last one's tensors (a GPU run
    goes through 16384 x 14336 inputs).
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, seed: int = 0):
        self.device, self.dtype, self.seed = device, dtype, seed
        self._kn: tuple[int, int] | None = None
        self._weights: dict[tuple, torch.Tensor] = {}
        self._inputs: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._layers: dict[tuple, dict[str, nn.Module]] = {}

    def _focus(self, k: int, n: int) -> None:
        if self._kn != (k, n):
            self._weights.clear()
            self.clear()
            self._kn = (k, n)

    def weight(self, k: int, n: int) -> torch.Tensor:
        self._focus(k, n)
        if (k, n) not in self._weights:
            gen = torch.Generator().manual_seed(self.seed)
            w = torch.randn(n, k, generator=gen) / k**0.5  # [out, in]
            self._weights[(k, n)] = w.to(self.device, self.dtype)
        return self._weights[(k, n)]

    def x_dy(self, m: int, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._focus(k, n)
        if (m, k, n) not in self._inputs:
            self._inputs[(m, k, n)] = random_x_dy(m, k, n, self.seed + 1, self.device, self.dtype)
        return self._inputs[(m, k, n)]

    def layer(self, provider: str, k: int, n: int, r: int, dropout: float) -> nn.Module:
        self._focus(k, n)
        key = (k, n, r, dropout)
        if key not in self._layers:
            torch.manual_seed(self.seed + 2)
            self._layers[key] = _lora_layers(self.weight(k, n), r, dropout)
        return self._layers[key][provider]

    def clear(self) -> None:
        self._inputs.clear()
        self._layers.clear()


def build(spec: Spec, inputs: Inputs) -> Call:
    """The measured call for ``spec`` (see ``bench.common.Call``)."""
    x, dy = inputs.x_dy(spec.M, spec.K, spec.N)
    if spec.provider == "base":
        weight = inputs.weight(spec.K, spec.N)

        def layer(t):
            return F.linear(t, weight)

        params: list[torch.Tensor] = []
        keep = [weight]
    else:
        module = inputs.layer(spec.provider, spec.K, spec.N, spec.r, spec.dropout)
        layer = module
        params = [p for p in module.parameters() if p.requires_grad]  # lora_A, lora_B
        keep = list(module.parameters())
    grads = [x, *params]
    return mode_call(spec.mode, layer, x, dy, grads, keep + [x, dy])


def mode_call(mode: str, layer, x: torch.Tensor, dy: torch.Tensor, grads: list[torch.Tensor],
              keep: list[torch.Tensor]) -> Call:
    """The ``Call`` of one mode (``bench.common.MODES``) of ``layer`` on ``x`` (``dy`` for the backward);
    ``grads``: the tensors whose ``.grad`` is dropped before each call; ``keep``: alive before it."""
    out_bytes = dy.numel() * dy.element_size()

    def reset():
        for t in grads:
            t.grad = None

    def forward():
        return layer(x)

    if mode == "forward_nograd":
        def fn():
            with torch.no_grad():
                return layer(x)

        return Call(fn=fn, reset=reset, forward=None, keep=keep, out_bytes=out_bytes)
    if mode == "forward":
        return Call(fn=forward, reset=reset, forward=forward, keep=keep, out_bytes=out_bytes)
    if mode == "backward":
        y = layer(x)  # the graph every call runs the backward of, kept alive by retain_graph

        def fn():
            reset()
            y.backward(dy, retain_graph=True)

        return Call(fn=fn, reset=reset, forward=forward, keep=keep, out_bytes=out_bytes, runs_on_saved=True,
                    extra={"graph": y})
    if mode == "full":
        def fn():
            reset()
            layer(x).backward(dy)

        return Call(fn=fn, reset=reset, forward=forward, keep=keep, out_bytes=out_bytes)
    raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")


def trade_weights(inputs: Inputs, group) -> Callable[[], None] | None:
    """A call that swaps the base weights of each PEFT / fastlora pair in ``group`` (calling it again swaps
    them back): the two hold equal copies, and the timing hands each provider the other's halfway (see
    ``bench.common``). None when the group has no pair."""
    pairs = []
    for spec in group:
        if spec.provider == "fastlora":
            layers = [inputs.layer(p, spec.K, spec.N, spec.r, spec.dropout) for p in ("peft", "fastlora")]
            pairs.append([layer.base_layer.weight for layer in layers])
    if not pairs:
        return None

    def trade() -> None:
        with torch.no_grad():
            for theirs, ours in pairs:
                theirs.data, ours.data = ours.data, theirs.data

    return trade


def check_same_output(inputs: Inputs, m: int, k: int, n: int, r: int) -> float:
    """Max |fastlora - PEFT| on one forward without dropout: the providers compute the same thing."""
    x, _ = inputs.x_dy(m, k, n)
    with torch.no_grad():
        ours = inputs.layer("fastlora", k, n, r, 0.0)(x)
        theirs = inputs.layer("peft", k, n, r, 0.0)(x)
    return (ours.float() - theirs.float()).abs().max().item()
