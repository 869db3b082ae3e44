"""Fixtures for the PEFT-method tests.

A test module that defines ``CASES`` as a dict ``{id: dict(factory=<model fixture name>, task_type=...,
kwargs=...)}`` gets a ``case`` fixture parametrized over it (one test id per key): ``case["base"]`` is a
fresh model from that factory, in eval mode, and the spec's own keys come along (``case["kwargs"]`` ...).
A module with some other ``CASES`` (not a dict) defines its own ``case`` fixture and is left alone.
"""

from __future__ import annotations

import pytest


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    cases = getattr(metafunc.module, "CASES", None)
    if "case" in metafunc.fixturenames and isinstance(cases, dict):
        metafunc.parametrize("case", list(cases), ids=list(cases), indirect=True)


@pytest.fixture
def case(request: pytest.FixtureRequest) -> dict:
    spec = request.module.CASES[request.param]
    return dict(name=request.param, base=request.getfixturevalue(spec["factory"])().eval(), **spec)
