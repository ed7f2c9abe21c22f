"""fxtune.trace: same outputs, the model untouched, parameters shared, buffers copied, clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxtune
from core_helpers import Gate, Outer, assert_unchanged, frozen, small_net, snapshot, vision_model
from fxtune.graph.ownership import same_storage


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, double: bool = False):
        y = self.fc(x)
        if double:
            return y * 2
        return y


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 4)

    def forward(self, x, scale: float = 2.0):
        return self.fc(x) * scale


@pytest.mark.parametrize("build", [small_net, lambda: vision_model("resnet18")], ids=["small", "resnet18"])
def test_trace_output_and_model_untouched(build):
    model = build()
    snap = snapshot(model)
    children = dict(model.named_modules())
    gm = fxtune.trace(model)
    assert isinstance(gm, fx.GraphModule)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(gm(x), frozen(model)(x))
    torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-7)
    assert_unchanged(model, snap)
    assert all(model.get_submodule(k) is m for k, m in children.items() if k)
    assert gm.training == model.training
    assert list(gm.state_dict()) == list(model.state_dict())


def test_parameters_shared_buffers_copied():
    model = vision_model("resnet18")
    gm = fxtune.trace(model)
    model_params = dict(model.named_parameters())
    for name, p in gm.named_parameters():
        q = model_params[name]
        assert p is not q
        assert same_storage(p, q) and p.data_ptr() == q.data_ptr(), name  # no extra memory
        assert not p.requires_grad and q.requires_grad  # read-only in gm, the user's flag untouched
    for name, b in gm.named_buffers():
        mb = model.get_buffer(name)
        assert torch.equal(b, mb) and not same_storage(b, mb), name
    # the module objects are fxtune's own
    assert gm.get_submodule("layer1.0.conv1") is not model.layer1[0].conv1


def test_training_traced_module_keeps_users_batchnorm():
    model = small_net()
    snap = snapshot(model)
    gm = fxtune.trace(model)
    gm.train()
    before = gm.bn.running_mean.clone()
    with torch.no_grad():
        gm(torch.randn(4, 3, 16, 16) + 1.0)
    assert not torch.equal(gm.bn.running_mean, before)
    assert int(gm.bn.num_batches_tracked) == 1
    assert_unchanged(model, snap)
    assert not model.training


def test_untraceable_model_names_module_and_line():
    model = Outer()
    snap = snapshot(model)
    with pytest.raises(fxtune.TraceError) as info:
        fxtune.trace(model)
    message = str(info.value)
    assert "block.1" in message  # the failing module's path
    assert "Gate" in message
    assert "if x.sum() > 0:" in message  # the source line
    assert "core_helpers.py" in message
    assert "leaf_modules" in message and "concrete_args" in message
    assert_unchanged(model, snap)


@pytest.mark.parametrize("leaf", [Gate, "block.1"], ids=["type", "name"])
def test_leaf_modules_make_it_traceable(leaf):
    model = Outer()
    gm = fxtune.trace(model, leaf_modules=[leaf])
    for sign in (1.0, -1.0):
        x = sign * (torch.rand(3, 4) + 0.5)
        assert torch.equal(gm(x), model(x))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "block.1" in targets
    assert [s.name for s in fxtune.sites(gm)] == ["fc", "block.0", "head"]


def test_layers_inside_a_leaf_module_stay_sites_called_through_it():
    model = Outer()
    gm = fxtune.trace(model, leaf_modules=[nn.Sequential])
    assert [(s.name, s.call) for s in fxtune.sites(gm)] == [("fc", "module"), ("block.0", "opaque"), ("head", "module")]


@pytest.mark.parametrize("value", [True, False])
def test_concrete_args(value):
    model = Flagged()
    gm = fxtune.trace(model, concrete_args={"double": value})
    x = torch.randn(3, 4)
    assert torch.equal(gm(x, value), model(x, double=value))
    assert [s.name for s in fxtune.sites(gm)] == ["fc"]


def test_a_flag_left_out_is_fixed_to_its_default_only_where_tracing_needs_it():
    """`if double:` stops symbolic tracing on a Proxy; the call `model(x)` means double=False, so it is
    fixed to that, and the graph refuses another value with a message saying how to keep it an input."""
    model = Flagged()
    gm = fxtune.trace(model, frontend="fx")
    assert gm.meta["fxtune_trace"]["fixed_inputs"] == {"double": False}
    x = torch.randn(3, 4)
    assert torch.equal(gm(x), model(x))
    with pytest.raises(AssertionError, match=r"double was fixed to False .* example_kwargs=\{'double': \.\.\.\}"):
        gm(x, True)
    scaled = fxtune.trace(Scaled(), frontend="fx")  # traces with the Proxy: stays an input
    assert "fixed_inputs" not in scaled.meta["fxtune_trace"]
    assert torch.equal(scaled(x, 3.0), Scaled()(x, 3.0))
    with pytest.raises(fxtune.TraceError, match="if double:"):
        fxtune.trace(model, frontend="fx", example_kwargs={"double": True})  # given, so an input: tracing stops on it


def test_parameter_used_functionally_is_shared():
    """A weight used through F.linear in the traced forward is a get_attr on the shared storage."""

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4))
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(F.linear(x, self.w))

    model = Functional()
    gm = fxtune.trace(model)
    x = torch.randn(2, 4)
    assert torch.equal(gm(x), model(x))
    assert same_storage(gm.w, model.w)


@pytest.mark.parametrize(
    "call",
    [
        lambda: fxtune.trace("not a model"),
        lambda: fxtune.trace(nn.Linear(2, 2), frontend="nope"),
        lambda: fxtune.trace(Outer(), leaf_modules=["no.such.module"]),
    ],
    ids=["not-module", "frontend", "leaf-name"],
)
def test_trace_argument_errors(call):
    with pytest.raises(fxtune.TraceError):
        call()


def test_trace_error_keeps_model_intact():
    model = Outer()
    snap = snapshot(model)
    with pytest.raises(fxtune.TraceError):
        fxtune.trace(model, leaf_modules=["nope"])
    assert_unchanged(model, snap)


def test_trace_a_graph_module():
    """An fx.GraphModule (from symbolic_trace, or torch.export's ep.module()) is an nn.Module too."""
    model = small_net()
    sym = fx.symbolic_trace(model)
    gm = fxtune.trace(sym)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(gm(x), frozen(model)(x))
    assert [s.name for s in fxtune.sites(gm)] == [s.name for s in fxtune.sites(fxtune.trace(model))]


def test_full_finetune_of_traced_module_leaves_model():
    """DESIGN: parameters are shared read-only; training (BatchNorm statistics included) leaves the model.

    The traced module's parameters do not require grad; full fine-tuning goes through trainable
    copies (fxtune.train_module over every site), which never write the shared storage.
    """
    model = small_net()
    snap = snapshot(model)
    gm = fxtune.trace(model)
    assert not any(p.requires_grad for p in gm.parameters()) and fxtune.trainable_parameters(gm) == []
    full = fxtune.train_module(gm, None).train()
    opt = torch.optim.SGD(fxtune.trainable_parameters(full), lr=0.1)
    x = torch.randn(2, 3, 16, 16)
    before = full(x).detach()
    for _ in range(2):
        opt.zero_grad()
        full(x).square().mean().backward()
        opt.step()
    assert not torch.equal(full(x), before)
    assert_unchanged(model, snap)


def test_an_owned_rnn_runs_on_its_own_parameters():
    """nn.LSTM keeps a list of its Parameter objects (_flat_weights); the owned copy's list is its own."""
    model = nn.Sequential(nn.LSTM(4, 6, batch_first=True)).eval()
    gm = fxtune.trace(model)
    lstm = gm.get_submodule("0")
    assert all(w is getattr(lstm, n) for w, n in zip(lstm._flat_weights, lstm._flat_weights_names))
    assert not any(w is p for w in lstm._flat_weights for p in model.parameters())
    x = torch.randn(2, 3, 4)
    assert torch.equal(gm(x)[0], model(x)[0])
