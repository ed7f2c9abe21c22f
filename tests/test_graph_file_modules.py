"""Module types in graph files: torch.nn layers the graph calls are rebuilt from their constructor
arguments (checked against the saved module, value by value); layers it does not call fall back to
the torch.nn class they derive from; what cannot be written as data is refused when saving.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxtune
from fxtune import load, save
from fxtune import GraphFileError
from fxtune.passes import lora
from graph_file_helpers import assert_same_graph_module

pytestmark = pytest.mark.filterwarnings("ignore::fxtune.FxtuneWarning")


class Calls(nn.Module):
    """Calls one layer (kept a leaf, so the graph calls the module itself) on one, two or three inputs."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, a, b=None, c=None):
        if c is not None:
            return self.layer(a, b, c)
        return self.layer(a) if b is None else self.layer(a, b)


def _r(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


LAYERS = {
    "encoder_layer": (lambda: nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=True,
                                                         activation="gelu"), (_r(2, 5, 16),)),
    "encoder_layer_no_bias": (lambda: nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, bias=False, layer_norm_eps=1e-3),
                              (_r(5, 2, 16),)),
    "attention": (lambda: nn.MultiheadAttention(16, 4, bias=False, add_bias_kv=True, kdim=8, vdim=8, batch_first=True),
                  (_r(2, 5, 16), _r(2, 5, 8), _r(2, 5, 8))),
    "lstm": (lambda: nn.LSTM(4, 8, num_layers=2, proj_size=3, batch_first=True), (_r(2, 5, 4),)),
    "gru": (lambda: nn.GRU(4, 8, bidirectional=True), (_r(5, 2, 4),)),
    "rnn": (lambda: nn.RNN(4, 8, nonlinearity="relu", bias=False), (_r(5, 2, 4),)),
    "embedding": (lambda: nn.Embedding(10, 4, padding_idx=0), (torch.tensor([[0, 3, 9]]),)),
    "embedding_bag": (lambda: nn.EmbeddingBag(10, 4, mode="max"), (torch.tensor([[1, 2], [3, 4]]),)),
    "layer_norm": (lambda: nn.LayerNorm((4,), bias=False), (_r(2, 4),)),
    "group_norm": (lambda: nn.GroupNorm(2, 4, affine=False), (_r(2, 4, 3),)),
    "batch_norm": (lambda: nn.BatchNorm2d(4, affine=False).eval(), (_r(2, 4, 3, 3),)),
    "max_pool": (lambda: nn.MaxPool2d(2, stride=1, padding=1, ceil_mode=True), (_r(1, 2, 5, 5),)),
    "upsample": (lambda: nn.Upsample(scale_factor=2, mode="bilinear"), (_r(1, 2, 3, 3),)),
    "conv_transpose": (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, output_padding=1), (_r(1, 3, 5, 5),)),
    "prelu": (lambda: nn.PReLU(3), (_r(2, 3),)),
    "bilinear": (lambda: nn.Bilinear(3, 4, 5), (_r(2, 3), _r(2, 4))),
    "flatten": (lambda: nn.Flatten(0, 1), (_r(2, 3, 4),)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_called_torch_nn_layers_round_trip(name, tmp_path):
    torch.manual_seed(0)
    make, inputs = LAYERS[name]
    layer = make()
    given = dict(zip("bc", inputs[1:]))  # optional inputs the call gives stay inputs; the others are fixed to None
    gm = fxtune.trace(Calls(layer), leaf_modules=[type(layer)], example_kwargs=given or None)
    save(gm, tmp_path / "d")
    loaded = load(tmp_path / "d")
    assert type(loaded.layer) is type(layer) and repr(loaded.layer) == repr(layer)
    with torch.no_grad():
        ours, theirs = loaded(*inputs), layer(*inputs)
    ours, theirs = (ours[0], theirs[0]) if isinstance(ours, tuple) else (ours, theirs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)  # the user's layer itself is the reference
    assert_same_graph_module(loaded, gm, *inputs)  # and the saved GraphModule, bit for bit


class PlainConv(nn.Conv2d):
    """A conv subclass of the user's (symbolic tracing goes through it: the graph calls F.conv2d on its weight)."""


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = PlainConv(3, 4, 3, padding=1)
        self.scale = nn.Parameter(torch.tensor([2.0]))
        self.config = {"made_by": object()}  # not data: left out (the graph never calls this module)

    def forward(self, x):
        return self.conv(x) * self.scale


def test_uncalled_modules_fall_back_to_torch_nn_bases_and_stay_sites(tmp_path):
    gm = fxtune.trace(nn.Sequential(Block(), nn.ReLU()))
    save(gm, tmp_path / "d")
    loaded = load(tmp_path / "d")
    block = loaded.get_submodule("0")
    assert type(block) is nn.Module and type(block.conv) is nn.Conv2d and block.conv.padding == (1, 1)
    assert "config" not in block.__dict__ and torch.equal(block.scale, gm.get_submodule("0").scale)
    x = torch.randn(1, 3, 8, 8)
    assert_same_graph_module(loaded, gm, x)
    torch.manual_seed(5)
    theirs = lora(gm, r=2, init="gaussian")
    torch.manual_seed(5)
    ours = lora(loaded, r=2, init="gaussian")
    assert [s.name for s in fxtune.sites(ours)] == [s.name for s in fxtune.sites(theirs)] == ["0.conv"]
    with torch.no_grad():
        fxtune.trainable_parameters(ours)[1].fill_(0.5)
        fxtune.trainable_parameters(theirs)[1].fill_(0.5)
    assert_same_graph_module(ours, theirs, x)


def test_what_cannot_be_data_is_refused_when_saving(tmp_path):
    gm = lora(fxtune.trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU())), r=2)
    gm.get_submodule("1").register_forward_hook(lambda module, args, out: out)
    with pytest.raises(GraphFileError, match=r"module '1' has hooks"):
        save(gm, tmp_path / "hooks")
    local = fxtune.trace(nn.Sequential(nn.Linear(4, 4)))
    node = next(n for n in local.graph.nodes if n.op == "output")
    with local.graph.inserting_before(node):
        node.args = (local.graph.call_function(lambda t: t, node.args),)
    local.recompile()
    with pytest.raises(GraphFileError, match="no importable name"):
        save(local, tmp_path / "lambda")
    with torch.device("meta"):
        lazy = fxtune.trace(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(GraphFileError, match=r"0\.weight.*meta device"):
        save(lazy, tmp_path / "meta")
    assert not any((tmp_path / d).exists() for d in ("hooks", "lambda", "meta"))


def test_unregistered_adapter_kinds_are_named_on_load(tmp_path):
    gm = lora(fxtune.trace(nn.Sequential(nn.Linear(4, 4))), r=2, form="activation")
    save(gm, tmp_path / "d")
    from fxtune.adapter.kinds import _REGISTRY

    kind = _REGISTRY.pop("lora")
    try:
        with pytest.warns(fxtune.FxtuneWarning, match=r"\['lora'\] are not registered.*import fxtune.passes"):
            loaded = load(tmp_path / "d")
    finally:
        _REGISTRY["lora"] = kind
    assert_same_graph_module(loaded, gm, torch.randn(2, 4))


def test_dtypes_and_memory_layouts_survive(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).to(torch.bfloat16)
    model = model.to(memory_format=torch.channels_last)
    gm = lora(fxtune.trace(model), r=2)
    save(gm, tmp_path / "d")
    loaded = load(tmp_path / "d")
    weight = loaded.get_submodule("0").weight
    assert weight.dtype is torch.bfloat16 and weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_graph_module(loaded, gm, torch.randn(1, 3, 6, 6, dtype=torch.bfloat16))
