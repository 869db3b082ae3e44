"""Mixed-adapter batches through the whole model: ``model(..., adapter_names=[...])``, ``generate(...,
adapter_names=[...])`` and the per-token entry ``mixed_adapter_batch(model, token_indices=...)``.

What a user relies on:
- every row of a mixed batch gives what that row gives alone with its adapter set (logits and greedy
  generation), for adapters of ranks 4, 8, 16 and 64 (different alphas, one rsLoRA) beside base rows,
  on the reference and on the Triton kernels (under the interpreter on CPU);
- the same numbers as PEFT's own mixed batch for the same adapters, and PEFT's errors, word for word;
- popularity patterns (identical / distinct / uniform / skewed) change nothing of the above;
- adapters deleted, added and replaced between batches without re-injecting.

Models are the tiny fp32 Llama / GPT-2 / T5 of conftest.py; fastlora's adapters are loaded from PEFT's
state dict (same keys), so both libraries hold the same weights.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import fastlora
from fastlora.injector import mixed_batch as mixed_batch_module

TOL = dict(rtol=1e-5, atol=1e-5)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Ranks 4, 8, 16, 64 with their own alphas; "r8" uses rsLoRA (scaling alpha / sqrt(r)).
ADAPTERS = {
    "r4": dict(r=4, lora_alpha=8),
    "r8": dict(r=8, lora_alpha=4, use_rslora=True),
    "r16": dict(r=16, lora_alpha=16),
    "r64": dict(r=64, lora_alpha=32),
}
MIXED = ["r4", "__base__", "r8", "r16", "r64", "r4"]


def _build(lib, base, task_type="CAUSAL_LM", targets=LLAMA_TARGETS, adapters=ADAPTERS, **extra):
    model = None
    for name, kwargs in adapters.items():
        config = lib.LoraConfig(task_type=task_type, target_modules=targets, init_lora_weights=False,
                                **kwargs, **extra)
        if model is None:
            model = lib.get_peft_model(copy.deepcopy(base), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return model.eval()


def _pair(base, **kwargs):
    """PEFT's model and fastlora's, with the same adapters (weights copied key for key)."""
    torch.manual_seed(1)
    theirs = _build(peft, base, **kwargs)
    ours = _build(fastlora, base, **kwargs)
    state = {k: v for k, v in theirs.state_dict().items() if "lora_" in k}
    assert not ours.load_state_dict(state, strict=False).unexpected_keys
    return theirs, ours


def _ids(batch, length, seed=0, vocab=128):
    return torch.randint(2, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _alone(model, name, **inputs):
    """The row run by itself with ``name`` active (the base model for "__base__")."""
    if name == "__base__":
        with model.disable_adapter():
            return model(**inputs).logits
    model.set_adapter(name)
    return model(**inputs).logits


@torch.no_grad()
def _assert_same_logits(ours, theirs, **inputs):
    """One forward of each library on the same inputs (``adapter_names`` included): the same logits."""
    torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, **TOL)


@torch.no_grad()
def _alone_generate(model, name, **inputs):
    if name == "__base__":
        with model.disable_adapter():
            return model.generate(**inputs)
    model.set_adapter(name)
    return model.generate(**inputs)


@pytest.fixture
def pair(tiny_llama):
    return _pair(tiny_llama())


def _set_backend(monkeypatch, backend) -> list[int]:
    """Switch the backend; returns a list that grows by the rows mode (0) or block size of every kernel launch."""
    launches: list[int] = []
    if backend == "triton":
        import fastlora.kernels as kernels
        from fastlora.kernels import _config
        from fastlora.kernels.sgmv import _sgmv_expand_kernel

        if not torch.cuda.is_available() and not _config.interpreted(_sgmv_expand_kernel):
            pytest.skip("the kernels need a GPU or TRITON_INTERPRET=1 before triton is imported")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        real = kernels.multi_lora_add
        monkeypatch.setattr(kernels, "multi_lora_add", lambda *a: launches.append(a[-1]) or real(*a))
    monkeypatch.setenv("FASTLORA_BACKEND", backend)
    return launches


BACKENDS = [pytest.param("reference", id="reference"),
            pytest.param("triton", id="interpreter", marks=pytest.mark.interpreter)]


# ---- every row as if alone ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_every_row_of_a_mixed_batch_equals_the_row_alone(pair, backend, monkeypatch):
    _, ours = pair
    ids = _ids(len(MIXED), 7)
    launches = _set_backend(monkeypatch, backend)
    with torch.no_grad():
        mixed = ours(input_ids=ids, adapter_names=MIXED).logits
    assert backend == "reference" or launches == [16] * 14  # 14 layers, 42 tokens: segments of 16
    monkeypatch.setenv("FASTLORA_BACKEND", "reference")
    for i, name in enumerate(MIXED):
        torch.testing.assert_close(mixed[i:i + 1], _alone(ours, name, input_ids=ids[i:i + 1]), **TOL,
                                   msg=f"row {i} ({name})")
    # the rows really differ: each adapter changes the output
    assert all((mixed[i] - mixed[1]).abs().max() > 1e-3 for i in (0, 2, 3, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_generate_of_a_mixed_batch_equals_each_row_alone(pair, backend, monkeypatch):
    _, ours = pair
    ids = _ids(len(MIXED), 6, seed=1)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    launches = _set_backend(monkeypatch, backend)
    with torch.no_grad():
        mixed = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=MIXED, **kwargs)
    # the prompt (36 tokens) in segments, then 3 decode steps of 6 rows each, one program per row
    assert backend == "reference" or launches == [16] * 14 + [0] * 42
    monkeypatch.setenv("FASTLORA_BACKEND", "reference")
    for i, name in enumerate(MIXED):
        alone = _alone_generate(ours, name, input_ids=ids[i:i + 1], **kwargs)
        assert torch.equal(mixed[i:i + 1], alone), f"row {i} ({name})"


# ---- parity with PEFT's mixed batch ----------------------------------------------------------------------------

def test_forward_matches_peft_mixed_batch(pair):
    theirs, ours = pair
    ids = _ids(len(MIXED), 7, seed=2)
    with torch.no_grad():
        expected = theirs(input_ids=ids, adapter_names=MIXED).logits
        got = ours(input_ids=ids, adapter_names=MIXED).logits
    torch.testing.assert_close(got, expected, **TOL)


def test_generate_matches_peft_mixed_batch_greedy_and_beam_search(pair):
    theirs, ours = pair
    ids = _ids(4, 5, seed=3)
    names = ["r64", "__base__", "r8", "r4"]
    for kwargs in (dict(max_new_tokens=4, do_sample=False), dict(max_new_tokens=3, num_beams=2, do_sample=False)):
        kwargs.update(attention_mask=torch.ones_like(ids), pad_token_id=0)
        expected = theirs.generate(input_ids=ids, adapter_names=names, **kwargs)
        got = ours.generate(input_ids=ids, adapter_names=names, **kwargs)
        assert torch.equal(got, expected), kwargs


def test_gpt2_conv1d_matches_peft(tiny_gpt2):
    theirs, ours = _pair(tiny_gpt2(), targets=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                         adapters={"first": dict(r=4, lora_alpha=8), "second": dict(r=16, lora_alpha=8)})
    ids = _ids(3, 6, seed=4)
    names = ["second", "first", "__base__"]
    _assert_same_logits(ours, theirs, input_ids=ids, adapter_names=names)


def test_t5_encoder_decoder_matches_peft_forward_and_beam_search(tiny_t5):
    theirs, ours = _pair(tiny_t5(), task_type="SEQ_2_SEQ_LM", targets=["q", "k", "v", "o"],
                         adapters={"first": dict(r=4, lora_alpha=8), "second": dict(r=8, lora_alpha=32)})
    ids = _ids(3, 6, seed=5)
    names = ["first", "__base__", "second"]
    dec = _ids(3, 4, seed=6)
    _assert_same_logits(ours, theirs, input_ids=ids, decoder_input_ids=dec, adapter_names=names)
    # beams: the decoder sees 2 rows per sequence, the encoder one
    kwargs = dict(max_new_tokens=3, num_beams=2, do_sample=False)
    assert torch.equal(ours.generate(input_ids=ids, adapter_names=names, **kwargs),
                       theirs.generate(input_ids=ids, adapter_names=names, **kwargs))


# ---- popularity patterns ------------------------------------------------------------------------------------------

POPULARITY = {
    "identical": ["r16"] * 6,
    "distinct": ["r4", "r8", "r16", "r64", "__base__"],
    "uniform": ["r8", "r64", "r4", "r16", "r8", "r64"],
    "skewed": ["r64", "r64", "r64", "r64", "r4", "__base__"],
    "all-base": ["__base__"] * 6,
}


@pytest.mark.parametrize("pattern", list(POPULARITY))
def test_popularity_patterns_match_peft(pair, pattern):
    theirs, ours = pair
    names = POPULARITY[pattern]
    ids = _ids(len(names), 5, seed=7)
    _assert_same_logits(ours, theirs, input_ids=ids, adapter_names=names)


# ---- adapters coming and going ------------------------------------------------------------------------------------

def test_deleted_adapter_frees_its_slot_and_the_others_stay_exact(pair):
    theirs, ours = pair
    ids = _ids(4, 5, seed=8)
    names = ["r4", "r64", "__base__", "r16"]
    with torch.no_grad():
        ours(input_ids=ids, adapter_names=names)  # banks built with all four adapters
    slots = fastlora.adapter_slots(ours)
    ours.delete_adapter("r8")
    theirs.delete_adapter("r8")
    _assert_same_logits(ours, theirs, input_ids=ids, adapter_names=names)
    after = fastlora.adapter_slots(ours)
    assert "r8" not in after and all(after[n] == slots[n] for n in after)  # the others keep their slots
    with pytest.raises(ValueError, match="non-existing adapter.*r8"):
        ours(input_ids=ids, adapter_names=["r8", "r4", "r4", "r4"])
    # a new adapter takes the freed slot; its rows see its weights, not r8's leftovers
    config = fastlora.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=12, lora_alpha=6,
                                 init_lora_weights=False)
    ours.add_adapter("new", config)
    theirs.add_adapter("new", peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=12,
                                              lora_alpha=6, init_lora_weights=False))
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if ".new." in k}, strict=False)
    assert fastlora.adapter_slots(ours)["new"] == slots["r8"]
    names = ["new", "r4", "__base__", "new"]
    _assert_same_logits(ours, theirs, input_ids=ids, adapter_names=names)


def test_new_weights_for_an_adapter_show_in_the_next_batch(pair):
    theirs, ours = pair
    ids = _ids(2, 5, seed=9)
    names = ["r16", "r4"]
    with torch.no_grad():
        before = ours(input_ids=ids, adapter_names=names).logits
        for name, param in ours.named_parameters():
            if ".r16." in name:
                param.mul_(0.5)  # in place, as an optimizer step or load_state_dict would
        for name, param in theirs.named_parameters():
            if ".r16." in name:
                param.mul_(0.5)
        after = ours(input_ids=ids, adapter_names=names).logits
        torch.testing.assert_close(after, theirs(input_ids=ids, adapter_names=names).logits, **TOL)
    assert (after[0] - before[0]).abs().max() > 1e-4
    torch.testing.assert_close(after[1], before[1], rtol=0, atol=0)


# ---- PEFT's errors ------------------------------------------------------------------------------------------------

def _error(fn) -> tuple[type, str]:
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


def test_errors_are_peft_errors(pair):
    theirs, ours = pair
    ids = _ids(2, 4, seed=10)
    cases = {
        "unknown names": lambda m: m(input_ids=ids, adapter_names=["zzz", "nope"]),
        "length mismatch": lambda m: m(input_ids=ids, adapter_names=["r4", "r8", "r16"]),
        "generate unknown": lambda m: m.generate(input_ids=ids, adapter_names=["nope", "r4"], max_new_tokens=1),
    }
    for what, call in cases.items():
        expected = _error(lambda: call(theirs))
        assert _error(lambda: call(ours)) == expected, what
    for model in (theirs, ours):
        model.train()
    expected = _error(lambda: theirs(input_ids=ids, adapter_names=["r4", "r8"]))
    assert "training mode" in expected[1]
    assert _error(lambda: ours(input_ids=ids, adapter_names=["r4", "r8"])) == expected
    assert _error(lambda: ours.generate(input_ids=ids, adapter_names=["r4", "r8"], max_new_tokens=1)) == expected
    for model in (theirs, ours):
        model.eval()
        model.set_adapter("r4")
        model.merge_adapter()
    expected = _error(lambda: theirs(input_ids=ids, adapter_names=["r4", "r8"]))
    assert "merged" in expected[1]
    assert _error(lambda: ours(input_ids=ids, adapter_names=["r4", "r8"])) == expected


def test_disabled_adapters_ignore_adapter_names_as_peft_does(pair):
    theirs, ours = pair
    ids = _ids(2, 4, seed=11)
    with torch.no_grad(), theirs.disable_adapter(), ours.disable_adapter():
        expected = theirs(input_ids=ids, adapter_names=["r4", "nope"]).logits
        got = ours(input_ids=ids, adapter_names=["r4", "nope"]).logits
        base = ours(input_ids=ids).logits
    torch.testing.assert_close(got, expected, **TOL)
    torch.testing.assert_close(got, base, rtol=0, atol=0)


def test_a_failed_mixed_batch_leaves_the_model_as_it_was(pair):
    _, ours = pair
    ids = _ids(2, 4, seed=12)
    with torch.no_grad():
        plain = ours(input_ids=ids).logits
        with pytest.raises(ValueError, match="Length of `adapter_names`"):
            ours(input_ids=ids, adapter_names=["r4"])
        torch.testing.assert_close(ours(input_ids=ids).logits, plain, rtol=0, atol=0)
    layers = [m for m in ours.modules() if isinstance(m, fastlora.LoraLinear)]
    assert all(layer.mixed_batch is None for layer in layers)


# ---- gradients in eval mode ---------------------------------------------------------------------------------------

def test_eval_forward_with_grad_gives_peft_gradients(pair):
    theirs, ours = pair
    ids = _ids(3, 4, seed=13)
    names = ["r8", "__base__", "r64"]
    for model in (theirs, ours):
        model.base_model.set_adapter(["r8", "r64"])  # both trainable
        model.zero_grad()
    theirs(input_ids=ids, adapter_names=names).logits.square().mean().backward()
    loss = ours(input_ids=ids, adapter_names=names).logits.square().mean()
    loss.backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    assert any(".r64." in n for n in grads) and not any(".r4." in n for n in grads)
    for name, param in ours.named_parameters():
        if name in grads:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)
        else:
            assert param.grad is None or not param.grad.any(), name


# ---- the per-token entry ------------------------------------------------------------------------------------------

def test_token_indices_entry_matches_adapter_names(pair):
    _, ours = pair
    ids = _ids(3, 5, seed=14)
    names = ["r64", "__base__", "r4"]
    slots = fastlora.adapter_slots(ours)
    assert sorted(slots) == sorted(ADAPTERS) and sorted(slots.values()) == list(range(len(ADAPTERS)))
    per_token = torch.tensor([slots.get(n, -1) for n in names]).repeat_interleave(5)
    with torch.no_grad():
        expected = ours(input_ids=ids, adapter_names=names).logits
        with fastlora.mixed_adapter_batch(ours, token_indices=per_token):
            got = ours(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_token_indices_are_checked(pair):
    _, ours = pair
    ids = _ids(2, 3, seed=15)
    with pytest.raises(ValueError, match=r"must lie in \[-1, 3\]"):
        with fastlora.mixed_adapter_batch(ours, token_indices=torch.tensor([0, 1, 2, 4, 0, 0])):
            pass
    with pytest.raises(TypeError, match="integer tensor"):
        with fastlora.mixed_adapter_batch(ours, token_indices=torch.zeros(6)):
            pass
    with pytest.raises(ValueError, match="indices for 5 tokens, the layer input has 6"), torch.no_grad():
        with fastlora.mixed_adapter_batch(ours, token_indices=torch.zeros(5, dtype=torch.long)):
            ours(input_ids=ids)


def test_metadata_is_built_once_per_input_shape_and_shared(pair, monkeypatch):
    _, ours = pair
    calls = []
    real = mixed_batch_module.MixedBatch.for_input

    built = []
    import fastlora.layers.bank as bank_module

    real_build = bank_module.adapter_batch
    monkeypatch.setattr(bank_module, "adapter_batch", lambda *a, **k: built.append(1) or real_build(*a, **k))
    monkeypatch.setattr(mixed_batch_module.MixedBatch, "for_input", lambda self, x: calls.append(1) or real(self, x))
    ids = _ids(2, 4, seed=16)
    with torch.no_grad():
        ours.generate(input_ids=ids, adapter_names=["r4", "r16"], max_new_tokens=3, do_sample=False, pad_token_id=0)
    layers = sum(isinstance(m, fastlora.LoraLinear) for m in ours.modules())
    assert len(calls) == 3 * layers  # every layer of each of the 3 forwards asks
    assert len(built) == 2  # the prompt's shape and the decode step's shape


def test_modules_to_save_is_refused_clearly_rather_than_routed_wrong(tiny_bert_cls):
    # PEFT routes rows through each adapter's copy of the head; fastlora does not do that yet, and says so
    # before running anything rather than giving every row the active adapter's head.
    model = _build(fastlora, tiny_bert_cls(), task_type="SEQ_CLS", targets=["query", "value"],
                   adapters={"first": dict(r=4, lora_alpha=8)}, modules_to_save=["classifier"])
    with pytest.raises(NotImplementedError, match="modules_to_save"), torch.no_grad():
        model(input_ids=_ids(2, 4), adapter_names=["first", "__base__"])
    assert all(m.mixed_batch is None for m in model.modules() if isinstance(m, fastlora.LoraLinear))
