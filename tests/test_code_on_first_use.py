"""fxtune's GraphModules generate their Python code on first use: a chain of passes generates it once,
and until then every way of reading or running the code behaves as if it had been generated."""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch
from torch import fx, nn

import fxtune
from fxtune.passes import fuse, ia3, lora


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, image, shift: float = 0.0):
        return self.fc(torch.relu(self.conv(image)).mean((2, 3)) + shift)


@pytest.fixture
def codegen_count(monkeypatch):
    """How many times code was generated for a non-empty graph (fx.GraphModule.__init__ also
    generates the code of the empty graph it starts from; that one is not counted)."""
    calls = []
    original = fx.Graph.python_code

    def counting(self, *args, **kwargs):
        if len(self.nodes):
            calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(fx.Graph, "python_code", counting)
    return calls


def _adapted(model: nn.Module) -> fx.GraphModule:
    torch.manual_seed(0)
    gm = ia3(lora(fxtune.trace(model), r=2), targets=["fc"], adapter="scales")
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if name.startswith("fxtune."):
                p.copy_(torch.randn_like(p))
    return gm


def _eager_reference(gm: fx.GraphModule) -> fx.GraphModule:
    """The same graph as a GraphModule built the plain fx way, its code generated at once."""
    return fx.GraphModule(gm, copy.deepcopy(gm.graph))


def test_a_chain_of_passes_generates_code_once_when_the_result_is_first_called(codegen_count):
    model, x = Net(), torch.randn(2, 3, 6, 6)
    gm = fuse(ia3(lora(fxtune.trace(model), r=2), targets=["fc"], adapter="scales"))
    assert codegen_count == []
    out = gm(x)
    assert len(codegen_count) == 1
    gm(x)
    assert len(codegen_count) == 1
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)
    assert gm.code == fxtune.trace(model).code  # the fused model's code is the traced model's


def test_reading_the_code_generates_it_from_the_current_graph():
    gm = _adapted(Net())
    assert "_code" not in gm.__dict__
    assert gm.code == gm.graph.python_code("self").src
    assert "def forward(self, image, shift" in str(gm)


def test_before_first_use_forward_has_the_model_signature_and_the_type_is_unchanged():
    gm = _adapted(Net())
    assert list(inspect.signature(gm.forward).parameters) == ["image", "shift"]
    assert list(inspect.signature(type(_adapted(Net())).forward).parameters) == ["self", "image", "shift"]
    assert type(gm).__name__ == "Net" and type(gm).__mro__[1] is fx.GraphModule


def test_running_before_and_after_generation_matches_an_eagerly_built_graphmodule():
    gm, x = _adapted(Net()), torch.randn(2, 3, 6, 6)
    reference = _eager_reference(gm)
    torch.testing.assert_close(type(gm).forward(gm, x, 0.5), reference(x, 0.5))  # read on the class first
    torch.testing.assert_close(gm(x), reference(x))


@pytest.mark.parametrize("copy_fn", [copy.deepcopy, lambda gm: pickle.loads(pickle.dumps(gm))], ids=["deepcopy", "pickle"])
def test_copies_of_a_graphmodule_without_code_yet_compute_the_same(copy_fn):
    gm, x = _adapted(Net()), torch.randn(2, 3, 6, 6)
    copied = copy_fn(gm)
    torch.testing.assert_close(copied(x), _eager_reference(gm)(x))
    assert copied.code == gm.code


def test_an_explicit_recompile_after_editing_the_graph_takes_effect():
    gm, x = _adapted(Net()), torch.randn(2, 3, 6, 6)
    before = gm(x)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        doubled = gm.graph.call_function(torch.mul, (output.args[0], 2.0))
    output.args = (doubled,)
    gm.recompile()
    torch.testing.assert_close(gm(x), 2 * before)
    assert "torch.mul(" in gm.code


def test_fx_symbolic_trace_of_a_graphmodule_without_code_yet():
    """fx's tracer reads forward on the class; it gets the generated one, not a stand-in taking *args
    (a traced model: adapted code calls fxtune.ops functions that fx would trace into)."""
    model, x = Net(), torch.randn(2, 3, 6, 6)
    gm = fxtune.trace(model)
    retraced = fx.symbolic_trace(gm)
    torch.testing.assert_close(retraced(x, 0.5), model(x, 0.5))


def test_torch_export_of_a_graphmodule_without_code_yet():
    gm, x = _adapted(Net()), torch.randn(2, 3, 6, 6)
    program = torch.export.export(gm, (x,))
    torch.testing.assert_close(program.module()(x), _eager_reference(gm)(x))
