"""Fixtures for the PEFT-method tests.

A test module that defines ``CASES`` as a dict ``{id: dict(factory=<model fixture name>, task_type=...,
kwargs=...)}`` gets a ``case`` fixture parametrized over it (one test id per key): ``case["base"]`` is a
fresh model from that factory, in eval mode, and the spec's own keys come along (``case["kwargs"]`` ...).
A module with some other ``CASES`` (not a dict) defines its own ``case`` fixture and is left alone.
"""

from __future__ import annotations

import pytest
import torch


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    cases = getattr(metafunc.module, "CASES", None)
    if "case" in metafunc.fixturenames and isinstance(cases, dict):
        metafunc.parametrize("case", list(cases), ids=list(cases), indirect=True)


@pytest.fixture
def case(request: pytest.FixtureRequest) -> dict:
    spec = request.module.CASES[request.param]
    return dict(name=request.param, base=request.getfixturevalue(spec["factory"])().eval(), **spec)


@pytest.fixture
def assert_kernels_match_reference(monkeypatch):
    """``check(layer, x)``: the layer's outputs and every gradient (input and trainable parameters) are the
    same on the Triton kernels (interpreted on CPU) as on the reference."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def check(layer, x):
        results = []
        for backend in ("reference", "triton"):
            monkeypatch.setenv("FASTLORA_BACKEND", backend)
            layer.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(True)
            y = layer(xi)
            y.square().sum().backward()
            results.append([y, xi.grad, *(p.grad for p in layer.parameters() if p.requires_grad)])
        for ours, ref in zip(*results[::-1]):
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    return check


@pytest.fixture
def steerable_llama(tiny_llama):
    """``make()`` -> ``tiny_llama()`` with its matrices redrawn wider (std 0.15, seed 0): a model whose
    output an adapter or a prompt can steer within a few optimizer steps."""
    def make(**overrides):
        base = tiny_llama(**overrides)
        torch.manual_seed(0)
        with torch.no_grad():
            for param in base.parameters():
                if param.dim() > 1:
                    param.normal_(std=0.15)
        return base
    return make


@pytest.fixture
def train_losses():
    """``train_losses(model, batch, lr, steps=15)``: Adam on the trainable parameters, in train mode;
    returns the loss of every step."""
    def train(model, batch, lr, steps=15):
        model.train()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        losses = []
        for _ in range(steps):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses
    return train
