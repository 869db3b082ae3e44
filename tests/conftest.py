"""Shared fixtures: tiny, seeded Hugging Face models built from configs in code (no hub downloads).

Each model fixture is a factory: it returns ``make(seed=0, **config_overrides)`` which builds a fresh
model every call, with weights drawn after ``torch.manual_seed(seed)``, in fp32 and in eval mode. Two
calls with the same seed give identical weights, so a test can build one model for fastlora and an
identical one for PEFT::

    def test_something(tiny_llama):
        ours, theirs = tiny_llama(), tiny_llama()          # same weights
        other = tiny_llama(seed=1, num_hidden_layers=3)    # different weights, 3 layers

Models (real sizes in comments; the tiny ones keep every code path, including GQA):

- ``tiny_llama``:    LlamaForCausalLM, hidden 32, 2 layers, 4 heads, 2 KV heads (grouped-query
                     attention, so k_proj/v_proj are [16, 32] while q_proj/o_proj are [32, 32]),
                     intermediate 64, vocab 128. (Llama-3-8B: hidden 4096, 32 layers, 32/8 heads.)
- ``tiny_gpt2``:     GPT2LMHeadModel, n_embd 32, 2 layers, 4 heads, vocab 128. Its c_attn / c_proj /
                     c_fc are transformers' ``Conv1D`` (weight stored [in, out], fan_in_fan_out).
- ``tiny_bert_cls``: BertForSequenceClassification, hidden 32, 2 layers, 4 heads, intermediate 64,
                     vocab 128, 3 labels (a ``classifier`` head for modules_to_save).
- ``tiny_t5``:       T5ForConditionalGeneration, d_model 32, d_kv 8, 2+2 layers, 4 heads, d_ff 64,
                     vocab 128 (decoder_start_token_id 0).

The test process runs torch on one thread (see ``torch.set_num_threads`` below).

``tiny_config(model_type, **overrides)`` (plain function, also exposed as the ``tiny_config`` fixture)
returns a tiny ``PretrainedConfig`` for every single-modality model type in
``fastlora.injector.targets`` (multimodal gemma3 is assembled in tests/injector/test_inject.py);
``tiny_model(model_type, seed=0, **overrides)`` builds the matching ``AutoModelForCausalLM`` /
``AutoModelForSeq2SeqLM`` / ``AutoModel``. Use them as fixtures (``def test_x(tiny_model): ...``)
rather than ``from conftest import ...``, which depends on pytest's import mode.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter, which triton reads when it is imported:
# set it before anything (peft, transformers) imports triton. torch itself does not.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import transformers  # noqa: E402

VOCAB = 128
HIDDEN = 32
LAYERS = 2
HEADS = 4
FFN = 64
MAX_POS = 64

# Overrides per model type on top of the common tiny sizes. Each names the config's own spelling of
# hidden size / layers / heads where it differs from the Llama one.
_TINY: dict[str, dict[str, Any]] = {
    "llama": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=2, sliding_window=None),
    "mixtral": dict(num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1),
    "qwen2": dict(num_key_value_heads=2),
    "qwen3": dict(num_key_value_heads=2, head_dim=8),
    "gemma": dict(num_key_value_heads=2, head_dim=8),
    "gemma2": dict(num_key_value_heads=2, head_dim=8),
    "gemma3_text": dict(num_key_value_heads=2, head_dim=8),
    "phi3": dict(num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "phi": dict(),
    "gpt2": dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=MAX_POS,
                 bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1),
    "opt": dict(ffn_dim=FFN, word_embed_proj_dim=HIDDEN, max_position_embeddings=MAX_POS),
    "bloom": dict(n_layer=LAYERS, n_head=HEADS),
    "gpt_neox": dict(rotary_pct=1.0),
    "gptj": dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, rotary_dim=4, n_positions=MAX_POS,
                 bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1),
    "falcon": dict(new_decoder_architecture=False, multi_query=True, alibi=False),
    "bert": dict(),
    "roberta": dict(pad_token_id=1),
    "xlm-roberta": dict(pad_token_id=1),
    "electra": dict(embedding_size=HIDDEN),
    "deberta-v2": dict(),
    "distilbert": dict(dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN),
    "t5": dict(d_model=HIDDEN, d_kv=8, d_ff=FFN, num_layers=LAYERS, num_decoder_layers=LAYERS,
               num_heads=HEADS, decoder_start_token_id=0),
    "mt5": dict(d_model=HIDDEN, d_kv=8, d_ff=FFN, num_layers=LAYERS, num_decoder_layers=LAYERS,
                num_heads=HEADS, decoder_start_token_id=0),
    "bart": dict(d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                 encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
                 encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, max_position_embeddings=MAX_POS),
}

_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
               num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=MAX_POS)

# Tests use tiny shapes, where threads only cost: on the 2-core CI machine (torch 2.13, MKL) a 2-thread
# fp32 matmul of [16, 32] x [32, 24] takes ~15 ms against ~2 us on one thread, which made the whole
# suite several times slower. Set at import so every test file (and every helper's) gets it.
torch.set_num_threads(1)

SEQ2SEQ_TYPES = {"t5", "mt5", "bart"}
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "electra", "deberta-v2", "distilbert"}


def tiny_config(model_type: str, **overrides: Any) -> transformers.PretrainedConfig:
    """A tiny config for ``model_type``; unknown keys to a config are kept as attributes, harmlessly."""
    kwargs = dict(_COMMON)
    kwargs.update(_TINY.get(model_type, {}))
    kwargs.update(overrides)
    return transformers.AutoConfig.for_model(model_type, **kwargs)


def _seeded(build: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build().float().eval()


def tiny_model(model_type: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A fresh tiny model of ``model_type``: causal LM, seq2seq LM or bare encoder as the type has."""
    config = tiny_config(model_type, **overrides)
    if model_type in SEQ2SEQ_TYPES:
        auto = transformers.AutoModelForSeq2SeqLM
    elif model_type in ENCODER_TYPES:
        auto = transformers.AutoModel
    else:
        auto = transformers.AutoModelForCausalLM
    return _seeded(lambda: auto.from_config(config), seed)


@pytest.fixture(scope="session")
def peft_at_least() -> Callable[[str], bool]:
    """``peft_at_least("0.22")``: whether the installed PEFT is that release or newer. fastlora follows the
    newest PEFT; a parity test compares with an older one only where the two PEFTs behave alike."""
    import peft
    from packaging.version import Version

    return lambda release: Version(Version(peft.__version__).base_version) >= Version(release)


@pytest.fixture(name="tiny_config")
def tiny_config_fixture() -> Callable[..., transformers.PretrainedConfig]:
    return tiny_config


@pytest.fixture(name="tiny_model")
def tiny_model_fixture() -> Callable[..., torch.nn.Module]:
    return tiny_model


@pytest.fixture
def tiny_llama() -> Callable[..., torch.nn.Module]:
    """``make(seed=0, **overrides)`` -> LlamaForCausalLM with grouped-query attention (4 heads, 2 KV)."""
    def make(seed: int = 0, **overrides: Any) -> torch.nn.Module:
        config = tiny_config("llama", **overrides)
        return _seeded(lambda: transformers.LlamaForCausalLM(config), seed)
    return make


@pytest.fixture
def tiny_gpt2() -> Callable[..., torch.nn.Module]:
    """``make(seed=0, **overrides)`` -> GPT2LMHeadModel (Conv1D layers, fan_in_fan_out)."""
    def make(seed: int = 0, **overrides: Any) -> torch.nn.Module:
        config = tiny_config("gpt2", **overrides)
        return _seeded(lambda: transformers.GPT2LMHeadModel(config), seed)
    return make


@pytest.fixture
def tiny_bert_cls() -> Callable[..., torch.nn.Module]:
    """``make(seed=0, **overrides)`` -> BertForSequenceClassification with 3 labels."""
    def make(seed: int = 0, **overrides: Any) -> torch.nn.Module:
        overrides.setdefault("num_labels", 3)
        config = tiny_config("bert", **overrides)
        return _seeded(lambda: transformers.BertForSequenceClassification(config), seed)
    return make


@pytest.fixture
def tiny_t5() -> Callable[..., torch.nn.Module]:
    """``make(seed=0, **overrides)`` -> T5ForConditionalGeneration (2 encoder + 2 decoder layers)."""
    def make(seed: int = 0, **overrides: Any) -> torch.nn.Module:
        config = tiny_config("t5", **overrides)
        return _seeded(lambda: transformers.T5ForConditionalGeneration(config), seed)
    return make


class _Parity:
    """Helpers for tests that hold fastlora beside the real PEFT; the ``parity`` fixture returns one."""

    @staticmethod
    def batch(model: torch.nn.Module, seed: int = 0, labels: bool = False) -> dict[str, torch.Tensor]:
        """Two rows of 7 tokens, the second left-padded by 2 (masks must flow through the wrappers);
        ``decoder_input_ids`` for an encoder-decoder; ``labels`` (class ids for BERT) on request."""
        gen = torch.Generator().manual_seed(seed)
        vocab = model.config.vocab_size
        input_ids = torch.randint(2, vocab, (2, 7), generator=gen)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, :2] = 0
        batch = dict(input_ids=input_ids, attention_mask=attention_mask)
        if model.config.is_encoder_decoder:
            batch["decoder_input_ids"] = torch.randint(2, vocab, (2, 5), generator=gen)
        if labels:
            batch["labels"] = torch.tensor([0, 2]) if model.config.model_type == "bert" else input_ids
        return batch

    @staticmethod
    @torch.no_grad()
    def out(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).logits

    @staticmethod
    @torch.no_grad()
    def perturb(model: torch.nn.Module, seed: int = 1, scale: float = 0.3) -> None:
        """Give every trainable tensor (adapters, head copies, biases) a value no fresh model has."""
        gen = torch.Generator().manual_seed(seed)
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * scale)

    @classmethod
    def pair(cls, base: torch.nn.Module, fl_config: Any, pf_config: Any, scale: float = 0.3):
        """(fastlora model, peft model) over copies of ``base``, PEFT's perturbed weights copied into fastlora."""
        import copy

        import peft

        import fastlora

        pf_model = peft.get_peft_model(copy.deepcopy(base), pf_config)
        fl_model = fastlora.get_peft_model(copy.deepcopy(base), fl_config)
        cls.perturb(pf_model, scale=scale)
        fl_model.load_state_dict(pf_model.state_dict())
        return fl_model.eval(), pf_model.eval()

    @staticmethod
    def saved_keys(folder) -> set[str]:
        from safetensors import safe_open

        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as fh:
            return set(fh.keys())

    @classmethod
    def assert_same_outputs_and_grads(cls, fl_model, pf_model, base: torch.nn.Module, tol: dict) -> None:
        """The adapted models differ from ``base``, agree with each other (``tol``), and a training-mode
        backward of the same loss (seeded: dropout draws match) gives both the same gradients."""
        batch = cls.batch(base)
        fl_out = cls.out(fl_model, batch)
        assert not torch.allclose(fl_out, cls.out(base, batch), **tol)
        torch.testing.assert_close(fl_out, cls.out(pf_model, batch), **tol)
        for model in (fl_model, pf_model):
            model.train()
            torch.manual_seed(0)
            model(**batch).logits.pow(2).mean().backward()
        cls.assert_same_grads(fl_model, pf_model)

    @staticmethod
    def assert_same_grads(fl_model: torch.nn.Module, pf_model: torch.nn.Module) -> None:
        """The same trainable names, each with the same gradient (to fp32 rounding of a backward pass)."""
        fl_grads = {n: p.grad for n, p in fl_model.named_parameters() if p.requires_grad}
        pf_grads = {n: p.grad for n, p in pf_model.named_parameters() if p.requires_grad}
        assert fl_grads.keys() == pf_grads.keys()
        for name, grad in fl_grads.items():
            torch.testing.assert_close(grad, pf_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture
def parity() -> _Parity:
    """``parity.batch / out / perturb / pair / saved_keys / assert_same_outputs_and_grads / assert_same_grads``
    for fastlora-vs-PEFT tests."""
    return _Parity()
