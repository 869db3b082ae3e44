"""One optimizer step of a small Llama: the frozen base model vs PEFT LoRA vs fastlora LoRA.

The model is built from a ``LlamaConfig`` (no download), in training mode, LoRA r=16 with
``lora_alpha = 32`` on every linear layer of the decoder (q, k, v, o, gate, up, down):
- ``base``: the model without adapters, every weight frozen, the input embeddings requiring grad
  (``enable_input_require_grads``), so the backward runs through every layer computing input
  gradients only: forward + backward, no optimizer (nothing to update). The floor for LoRA training.
- ``peft`` / ``fastlora``: forward, backward, ``AdamW.step()`` on the adapter weights, ``zero_grad``.
  Same base weights; fastlora's adapter weights are PEFT's (``init_lora_weights=False``, copied).

In the CSV, M is the number of tokens in the batch (batch x seq), K the hidden size, N the MLP's
intermediate size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from bench.common import Call

__all__ = ["MODE", "OP", "PROVIDERS", "RANK", "Spec", "build", "model_config", "specs"]

OP = "train_step"
MODE = "train_step"
PROVIDERS = ("base", "peft", "fastlora")
RANK = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# CPU: about 2.6M parameters, a step in tens of milliseconds on 2 cores.
# GPU: BENCH.md's "about 1B" (0.94B: 16 layers of hidden 2048, intermediate 5504), seq 2048.
CONFIGS = {
    "cpu": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=688, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=1000, batch=4, seq=128),
    "cuda": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=5504, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=32000, batch=4, seq=2048),
}
DROPOUTS = (0.0, 0.05)


@dataclass(frozen=True)
class Spec:
    provider: str
    batch: int
    seq: int
    hidden: int
    intermediate: int
    dropout: float | None = None  # None for base

    mode = MODE

    @property
    def r(self) -> int | None:
        return None if self.provider == "base" else RANK

    @property
    def M(self) -> int:
        return self.batch * self.seq

    @property
    def K(self) -> int:
        return self.hidden

    @property
    def N(self) -> int:
        return self.intermediate

    @property
    def group(self) -> tuple:
        return (MODE, self.M, self.K, self.N)

    @property
    def id(self) -> str:
        adapter = "" if self.dropout is None else f"-p{self.dropout:g}"
        return f"{self.provider}-b{self.batch}-s{self.seq}-h{self.hidden}{adapter}"


def model_config(device: torch.device, preset: str = "full") -> dict:
    config = dict(CONFIGS["cuda" if device.type == "cuda" else "cpu"])
    if preset == "quick" and device.type == "cuda":
        config["batch"] = 1
    return config


def specs(device: torch.device, preset: str = "full") -> list[Spec]:
    c = model_config(device, preset)
    shape = dict(batch=c["batch"], seq=c["seq"], hidden=c["hidden_size"], intermediate=c["intermediate_size"])
    out = [Spec("base", **shape)]
    for p in DROPOUTS:
        out += [Spec(provider, **shape, dropout=p) for provider in PROVIDERS[1:]]
    return out


class Models:
    """One base model per shape (seeded), copied for each provider."""

    def __init__(self, device: torch.device, dtype: torch.dtype, seed: int = 0):
        self.device, self.dtype, self.seed = device, dtype, seed
        self._base: dict[tuple, torch.nn.Module] = {}
        self._peft: dict[tuple, torch.nn.Module] = {}

    def base(self, spec: Spec) -> torch.nn.Module:
        key = (spec.hidden, spec.intermediate)
        if key not in self._base:
            import transformers

            c = model_config(self.device)
            config = transformers.LlamaConfig(
                hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
                num_key_value_heads=c["num_key_value_heads"], vocab_size=c["vocab_size"],
                max_position_embeddings=max(spec.seq, 128), attn_implementation="sdpa")
            torch.manual_seed(self.seed)
            model = transformers.LlamaForCausalLM(config).to(self.device, self.dtype)
            model.requires_grad_(False)
            self._base[key] = model
        return self._base[key]

    def inputs(self, spec: Spec) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + 1)
        vocab = self.base(spec).config.vocab_size
        return torch.randint(0, vocab, (spec.batch, spec.seq), generator=gen).to(self.device)

    def lora(self, spec: Spec) -> torch.nn.Module:
        kwargs = dict(r=RANK, lora_alpha=2 * RANK, lora_dropout=spec.dropout, target_modules=TARGETS,
                      init_lora_weights=False, task_type="CAUSAL_LM")
        key = (spec.hidden, spec.intermediate, spec.dropout)
        if spec.provider == "peft":
            import peft

            torch.manual_seed(self.seed + 2)
            model = peft.get_peft_model(copy.deepcopy(self.base(spec)), peft.LoraConfig(**kwargs))
            self._peft[key] = model
            return model
        import fastlora

        model = fastlora.get_peft_model(copy.deepcopy(self.base(spec)), fastlora.LoraConfig(**kwargs))
        if key not in self._peft:
            self.lora(Spec("peft", spec.batch, spec.seq, spec.hidden, spec.intermediate, spec.dropout))
        model.load_state_dict(self._peft[key].state_dict())  # PEFT's key names: same adapter weights
        return model

    def clear(self) -> None:
        self._peft.clear()


def build(spec: Spec, models: Models) -> Call:
    ids = models.inputs(spec)
    if spec.provider == "base":
        model = copy.deepcopy(models.base(spec))
        model.enable_input_require_grads()  # the frozen base still backpropagates to its input
        model.train()

        def step():
            model(input_ids=ids, labels=ids).loss.backward()

    else:
        model = models.lora(spec)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def forward():
        return model(input_ids=ids, labels=ids).loss

    step()  # the optimizer's state exists before anything is measured, as in a running training loop
    return Call(fn=step, forward=forward, keep=[*model.parameters(), *model.buffers(), ids],
                extra={"model": model, "tokens": spec.M})
