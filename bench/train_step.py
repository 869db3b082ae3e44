"""One optimizer step of a small Llama: the frozen base model vs PEFT LoRA vs fastlora LoRA.

The model is built from a ``LlamaConfig`` (no download), in training mode, LoRA r=16 with
``lora_alpha = 32`` on every linear layer of the decoder (q, k, v, o, gate, up, down):
- ``base``: the model without adapters, every weight frozen, the input embeddings requiring grad
  (``enable_input_require_grads``), so the backward runs through every layer computing input
  gradients only: forward + backward, no optimizer (nothing to update). The floor for LoRA training.
- ``peft`` / ``fastlora``: forward, backward, ``AdamW.step()`` on the adapter weights, ``zero_grad``.
  Same base weights; fastlora's adapter weights are PEFT's (``init_lora_weights=False``, copied).
- QLoRA, the same step on the model with every linear layer but ``lm_head`` in 4-bit NF4 (blocksize
  64, double quantization, computing in the run's dtype: the QLoRA recipe), each library's own way:
  - ``peft_bnb``: ``bitsandbytes.nn.Linear4bit`` layers (as transformers' bitsandbytes loader makes
    them, ``is_loaded_in_4bit`` set), ``peft.prepare_model_for_kbit_training``, ``peft.get_peft_model``;
  - ``fastlora_qlora``: ``fastlora.quantize_model``, ``fastlora.prepare_model_for_kbit_training``,
    ``fastlora.get_peft_model``, with PEFT's adapter weights.
  Both preparations freeze the base, keep the 16-bit parameters (norms, embeddings, head) in fp32 and
  turn on gradient checkpointing, as QLoRA training does.

In the CSV, M is the number of tokens in the batch (batch x seq), K the hidden size, N the MLP's
intermediate size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from bench.common import Call
from bench.nf4_linear import bnb_linear4bit, has_bitsandbytes, release_workspace

__all__ = ["MODE", "OP", "PROVIDERS", "QLORA_PROVIDERS", "RANK", "Spec", "build", "check_losses", "model_config",
           "specs"]

OP = "train_step"
MODE = "train_step"
PROVIDERS = ("base", "peft", "fastlora")
QLORA_PROVIDERS = ("peft_bnb", "fastlora_qlora")
PAIRS = {"fastlora": "peft", "fastlora_qlora": "peft_bnb"}  # ours -> theirs, compared side by side
BLOCKSIZE, DOUBLE_QUANT = 64, True
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
# QLoRA on CPU: intermediate 704 instead of 688, a multiple of the blocksize, because bitsandbytes 0.50.2's
# CPU dequantize is wrong when a quantization block spans two rows (tests/test_qlora.py). The GPU
# model's 5504 already is one.
QLORA_CPU_INTERMEDIATE = 704


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
    def quantized(self) -> bool:
        return self.provider in QLORA_PROVIDERS

    def dtype_label(self, compute: str) -> str:
        """The CSV's dtype: ``nf4dq/<compute>`` for the QLoRA providers (their linear weights' format)."""
        return f"nf4dq/{compute}" if self.quantized else compute

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


def specs(device: torch.device, preset: str = "full", quant: str = "both") -> list[Spec]:
    """LoRA (``quant`` "none"), QLoRA ("nf4") or both; ``peft_bnb`` only where bitsandbytes imports."""
    if quant not in ("both", "none", "nf4"):
        raise ValueError(f"quant must be 'both', 'none' or 'nf4', got {quant!r}")
    c = model_config(device, preset)
    shape = dict(batch=c["batch"], seq=c["seq"], hidden=c["hidden_size"], intermediate=c["intermediate_size"])
    out = []
    if quant != "nf4":
        out.append(Spec("base", **shape))
        for p in DROPOUTS:
            out += [Spec(provider, **shape, dropout=p) for provider in PROVIDERS[1:]]
    if quant != "none":
        if device.type != "cuda":
            shape["intermediate"] = QLORA_CPU_INTERMEDIATE
        if quant == "nf4" or shape["intermediate"] != c["intermediate_size"]:
            out.append(Spec("base", **shape))  # the 16-bit model of the same shape, frozen
        providers = [p for p in QLORA_PROVIDERS if p != "peft_bnb" or has_bitsandbytes()]
        for p in DROPOUTS:
            out += [Spec(provider, **shape, dropout=p) for provider in providers]
    return out


class Models:
    """One base model per shape (seeded), copied for each provider."""

    def __init__(self, device: torch.device, dtype: torch.dtype, seed: int = 0):
        self.device, self.dtype, self.seed = device, dtype, seed
        self._base: dict[tuple, torch.nn.Module] = {}
        self._peft: dict[tuple, dict[str, torch.Tensor]] = {}  # PEFT's initial adapter weights

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
        key = (spec.provider in QLORA_PROVIDERS, spec.hidden, spec.intermediate, spec.dropout)
        if spec.provider in ("peft", "peft_bnb"):
            import peft

            model = copy.deepcopy(self.base(spec))
            if spec.provider == "peft_bnb":
                model = peft.prepare_model_for_kbit_training(_bnb_quantize(model, self.dtype))
            torch.manual_seed(self.seed + 2)
            model = peft.get_peft_model(model, peft.LoraConfig(**kwargs))
            # A copy: build() steps the model's optimizer once, and fastlora's twin starts from the same weights.
            self._peft[key] = {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}
            return model
        import fastlora

        model = copy.deepcopy(self.base(spec))
        if spec.provider == "fastlora_qlora":
            model = fastlora.quantize_model(model, blocksize=BLOCKSIZE, double_quant=DOUBLE_QUANT,
                                            compute_dtype=self.dtype)
            model = fastlora.prepare_model_for_kbit_training(model)
        model = fastlora.get_peft_model(model, fastlora.LoraConfig(**kwargs))
        theirs = PAIRS[spec.provider]
        if theirs == "peft_bnb" and not has_bitsandbytes():
            return model  # nothing to copy the adapter weights from: fastlora's own draw
        if key not in self._peft:
            self.lora(Spec(theirs, spec.batch, spec.seq, spec.hidden, spec.intermediate, spec.dropout))
        # PEFT's key names: same adapter weights (the adapters only: each library quantized W itself)
        fastlora.set_peft_model_state_dict(model, self._peft[key])
        return model

    def clear(self) -> None:
        self._peft.clear()


def _bnb_quantize(model: torch.nn.Module, compute_dtype: torch.dtype) -> torch.nn.Module:
    """``model`` with every ``nn.Linear`` but ``lm_head`` a bitsandbytes ``Linear4bit`` quantized on its
    device, flagged ``is_loaded_in_4bit`` as transformers flags a model it loads in 4 bits."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and name != "lm_head":
                setattr(parent, name, bnb_linear4bit(child.weight, DOUBLE_QUANT, compute_dtype, child.bias))
    model.is_loaded_in_4bit = True
    return model


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

    loss = None
    if spec.dropout == 0.0:  # the adapters as created, for check_losses (the step below moves them)
        with torch.no_grad():
            loss = forward().float().item()

    def reset():
        if spec.provider == "fastlora_qlora":  # its dequantization buffer counts in the step's peak, as bnb's do
            release_workspace(ids.device)

    step()  # the optimizer's state exists before anything is measured, as in a running training loop
    return Call(fn=step, reset=reset, forward=forward,
                keep=[*model.parameters(), *model.buffers(), *_quant_state_tensors(model), ids],
                extra={"model": model, "tokens": spec.M, "initial_loss": loss})


def _quant_state_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The 4-bit layers' absmax and codebooks (neither parameters nor buffers, in both libraries)."""
    found = []
    for module in model.modules():
        state = getattr(module, "quant_state", None) or getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None:
            continue
        nested = getattr(state, "state2", None)  # bitsandbytes keeps the double quantization's state there
        for holder in (state, nested):
            for name in ("absmax", "code", "nested_absmax", "nested_code"):
                t = getattr(holder, name, None)
                if isinstance(t, torch.Tensor):
                    found.append(t)
    return found


# fastlora's loss against PEFT's, dropout 0, relative. The QLoRA pair: bitsandbytes' CPU library rounds a
# few double-quantized absmax bytes one level off (bench/nf4_linear.py), which moves the loss slightly.
LOSS_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
QLORA_LOSS_TOLERANCE = 1e-3


def check_losses(calls: dict, dtype: torch.dtype) -> list[str]:
    """Where fastlora's model and PEFT's (same base, same adapters, no dropout) gave different losses on
    the benchmark's batch before their first step, one line each; empty when they agree."""
    problems = []
    for ours in calls:
        theirs = next((spec for spec in calls if spec.provider == PAIRS.get(ours.provider) and spec.dropout == 0.0
                       and ours.dropout == 0.0), None)
        if theirs is None:
            continue
        losses = [calls[spec].extra["initial_loss"] for spec in (ours, theirs)]
        tol = LOSS_TOLERANCE.get(dtype, 1e-2)
        if ours.quantized:
            tol = max(tol, QLORA_LOSS_TOLERANCE)
        err = abs(losses[0] - losses[1]) / max(abs(losses[1]), 1e-12)
        if not err <= tol:
            problems.append(f"{ours.provider} loss {losses[0]:.6g} vs {theirs.provider} {losses[1]:.6g} "
                            f"(relative {err:.2e} > {tol:g})")
    return problems
