"""The reference's handler table (``razorpass/reference/handlers.py``): one handler per
torch function, a second registration refused; the mode makes the plain call for a
function without a handler or one its handler declines; and the reference stays
independent of the compiled path."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from razorpass import RazorConfig, reference
from razorpass.reference.handlers import DECLINED, HANDLERS, implements
from razorpass.reference.ops import _DERIVING, _DROPOUT

from .test_layering import ROOT, _imports


def _declines(mode, func, args, kwargs):
    return DECLINED


@pytest.mark.parametrize("funcs", [[torch.tanh, F.linear], [torch.tanh, torch.tanh]], ids=["taken", "listed-twice"])
def test_a_second_registration_raises_and_registers_nothing(funcs):
    before = dict(HANDLERS)
    with pytest.raises(ValueError, match="registered twice"):
        implements(funcs)(_declines)
    assert HANDLERS == before and torch.tanh not in HANDLERS


def test_every_handled_function_is_listed_once():
    """The table, function by function: each under the one handler that takes it."""
    listed = [
        ("_layer_norm", [F.layer_norm]),
        ("_batch_norm", [F.batch_norm]),
        ("_gelu", [F.gelu]),
        ("_softmax", [F.softmax, torch.softmax, torch.Tensor.softmax]),
        ("_weight_matmul", [torch.addmm, torch.Tensor.addmm, torch.mm, torch.Tensor.mm]),
        ("_activation_matmul", [torch.bmm, torch.Tensor.bmm]),
        ("_matmul", [torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__]),
        ("_attention", [F.scaled_dot_product_attention]),
        ("_linear", [F.linear]),
        ("_conv", [F.conv1d, F.conv2d, F.conv3d]),
        ("_pointwise", list(_DERIVING)),
        ("_dropout", list(_DROPOUT)),
        ("_getitem", [torch.Tensor.__getitem__]),
        ("_pad", [F.pad]),
    ]
    funcs = [f for _, fs in listed for f in fs]
    assert len(funcs) == len(set(funcs)) == len(HANDLERS)
    assert {f: h.__name__ for f, h in HANDLERS.items()} == {f: name for name, fs in listed for f in fs}


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.frozen = nn.Linear(8, 8).requires_grad_(False)

    def forward(self, x):
        h = self.fc(x)
        return torch.tanh(h), self.frozen(h)


def _under_reference(model, x):
    with reference.apply(model, RazorConfig(policy="backrazor", sparsity=0.5, block_size=8, targets=("linear",))):
        return model(x)


def test_the_mode_makes_the_plain_call_without_a_handler_or_when_it_declines():
    torch.manual_seed(0)
    model, x = _Net(), torch.randn(4, 8)
    t, y = _under_reference(model, x)
    h = model.fc(x)
    # tanh has no handler; F.linear's declines a weight that is not trained
    assert torch.tanh not in HANDLERS and F.linear in HANDLERS
    assert type(t.grad_fn).__name__ == "TanhBackward0" and torch.equal(t, torch.tanh(h))
    assert type(y.grad_fn).__name__ == "AddmmBackward0" and torch.equal(y, model.frozen(h))
    # the trained layer is the handler's
    assert type(t.grad_fn.next_functions[0][0]).__name__ == "_LinearBackward"


def test_a_handler_is_called_with_the_mode_and_the_call(monkeypatch):
    torch.manual_seed(0)
    model, x = _Net(), torch.randn(4, 8)
    calls = []

    def spy(mode, func, args, kwargs):
        calls.append((type(mode).__name__, func, len(args), kwargs))
        return DECLINED

    monkeypatch.setitem(HANDLERS, torch.tanh, spy)
    t, _ = _under_reference(model, x)
    assert calls == [("_ReferenceMode", torch.tanh, 1, {})]
    assert type(t.grad_fn).__name__ == "TanhBackward0" and torch.equal(t, torch.tanh(model.fc(x)))


def test_the_reference_imports_nothing_of_the_compiled_path():
    """It restates the compiled path's rules on purpose: razorpass.config is all it reads
    of razorpass outside itself."""
    folder = ROOT / "razorpass" / "reference"
    for path in sorted(folder.glob("*.py")):
        for module, _ in _imports(path, "razorpass.reference"):
            if module.startswith("razorpass"):
                assert module == "razorpass.config" or module.startswith("razorpass.reference"), (
                    f"{path.name} imports {module}")
