"""``ModulesToSaveWrapper``: a trainable copy per adapter of a whole module (e.g. a classifier head),
with PEFT's attribute names and state_dict keys.
"""

from __future__ import annotations

import pytest
import torch
from peft.utils.other import ModulesToSaveWrapper as PeftModulesToSaveWrapper
from torch import nn

from fastlora import ModulesToSaveWrapper


def _head(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(8, 3)


def _x():
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(1))


def _trainable(module):
    return {name: p.requires_grad for name, p in module.named_parameters()}


def test_state_dict_keys_and_trainability_equal_peft():
    ours, theirs = ModulesToSaveWrapper(_head(), "default"), PeftModulesToSaveWrapper(_head(), "default")
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    assert _trainable(ours) == _trainable(theirs)
    ours.update("other")
    theirs.update("other")
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    assert _trainable(ours) == _trainable(theirs)
    ours.set_adapter("other")
    theirs.set_adapter("other")
    assert _trainable(ours) == _trainable(theirs)


def test_forward_uses_the_copy_and_only_the_copy_trains():
    head = _head()
    wrapper = ModulesToSaveWrapper(head, "default")
    assert wrapper.original_module is head
    copy = wrapper.modules_to_save["default"]
    assert copy is not head and copy.weight.data_ptr() != head.weight.data_ptr()
    x = _x()
    torch.testing.assert_close(wrapper(x), head(x), rtol=0, atol=0)  # starts as an exact copy
    with torch.no_grad():
        copy.weight.add_(1.0)
    torch.testing.assert_close(wrapper(x), copy(x), rtol=0, atol=0)
    assert not torch.allclose(wrapper(x), head(x))
    assert wrapper.weight is copy.weight  # models that read head.weight see the active copy

    assert all(not p.requires_grad for p in head.parameters())
    assert all(p.requires_grad for p in copy.parameters())
    wrapper(x).sum().backward()
    assert head.weight.grad is None and copy.weight.grad is not None


def test_disabled_wrapper_uses_the_original():
    head = _head()
    wrapper = ModulesToSaveWrapper(head, "default")
    with torch.no_grad():
        wrapper.modules_to_save["default"].bias.add_(5.0)
    x = _x()
    wrapper.enable_adapters(False)
    torch.testing.assert_close(wrapper(x), head(x), rtol=0, atol=0)
    assert wrapper.weight is head.weight
    wrapper.enable_adapters(True)
    assert not torch.allclose(wrapper(x), head(x))


def test_set_adapter_switches_the_copy_used():
    wrapper = ModulesToSaveWrapper(_head(), "default")
    wrapper.update("other")
    with torch.no_grad():
        wrapper.modules_to_save["other"].bias.fill_(100.0)
    x = _x()
    default_out = wrapper(x)
    wrapper.set_adapter("other")
    assert wrapper.active_adapter == "other"
    torch.testing.assert_close(wrapper(x), wrapper.modules_to_save["other"](x), rtol=0, atol=0)
    assert not torch.allclose(wrapper(x), default_out)
    assert not wrapper.modules_to_save["default"].weight.requires_grad
    assert wrapper.modules_to_save["other"].weight.requires_grad
    wrapper.set_adapter(["default", "not-a-modules-to-save-adapter"])  # a LoRA-only name is ignored
    assert wrapper.active_adapter == "default"


def test_only_one_copy_can_be_active():
    wrapper = ModulesToSaveWrapper(_head(), "default")
    wrapper.update("other")
    with pytest.raises(ValueError, match="only one"):
        wrapper.set_adapter(["default", "other"])


def test_delete_adapter():
    wrapper = ModulesToSaveWrapper(_head(), "default")
    wrapper.update("other")
    wrapper.delete_adapter("default")
    assert list(wrapper.modules_to_save) == ["other"]
    assert wrapper.active_adapter == "other"
    wrapper.delete_adapter("missing")  # unknown names are ignored
    assert list(wrapper.modules_to_save) == ["other"]
