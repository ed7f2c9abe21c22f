"""Weights fxtune cannot compute with give fxtune errors that say what to do, not internal ones.

Before (issue 11): an int8 weight raised `NotImplementedError ... 'Char'` (lora) or a RuntimeError
about requires_grad (ia3); `fuse` / `merge` on a meta-device model raised `Tensor.item() cannot
be called on meta tensors`; loading adapters onto a meta model silently dropped their values.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxtune
from fxtune.passes import fuse, ia3, lora, low_rank

pytestmark = pytest.mark.filterwarnings("ignore::fxtune.FxtuneWarning")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _int8_net() -> Net:
    model = Net()
    model.fc1.weight = nn.Parameter(torch.randint(-8, 8, (8, 8), dtype=torch.int8), requires_grad=False)
    return model


@pytest.mark.parametrize("run", [lambda gm: lora(gm, r=2), lambda gm: ia3(gm), lambda gm: low_rank(gm, rank=2)],
                         ids=["lora", "ia3", "low_rank"])
def test_an_integer_weight_is_an_fxtune_error_naming_the_site(run):
    with pytest.raises(fxtune.FxtuneError, match=r"'fc1' has a weight of dtype int8.*Dequantize the model first.*exclude"):
        run(fxtune.trace(_int8_net()))


def test_other_sites_of_a_model_with_an_integer_weight_still_work():
    gm = lora(fxtune.trace(_int8_net()), r=2, exclude="fc1")
    assert [name for name, _ in gm.fxtune.default.named_children()] == ["fc2"]


def _meta_adapted():
    with torch.device("meta"):
        model = Net()
    return lora(fxtune.trace(model), r=2)


@pytest.mark.parametrize("run", [fuse, fxtune.merge], ids=["fuse", "merge"])
def test_folding_meta_weights_is_an_fxtune_error_saying_to_load_values(run):
    gm = _meta_adapted()
    with pytest.raises(fxtune.FusionError, match=r"'fc1': the base weight, .* on the meta device .*Load real weights first"):
        run(gm)


def test_loading_adapters_onto_a_meta_model_is_refused(tmp_path):
    torch.manual_seed(0)
    fxtune.save_adapters(lora(fxtune.trace(Net()), r=2), str(tmp_path))
    with torch.device("meta"):
        model = Net()
    with pytest.raises(fxtune.AdapterError, match=r"'fc1' .*meta device .*values would be lost"):
        fxtune.load_adapters(fxtune.trace(model), str(tmp_path))
