"""The fused graph ops against the op sequences they replace, written out in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fxtune.ops import add_channel_mix, add_feature_mix

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@pytest.mark.parametrize("spatial", [1, 2, 3])
@pytest.mark.parametrize("batch", [3, 0, None])
def test_add_channel_mix_is_a_1x1_conv_scaled_and_added(spatial, batch):
    g = torch.Generator().manual_seed(spatial)
    lead = () if batch is None else (batch,)
    size = (5, 4, 3)[:spatial]
    y = torch.randn(*lead, 7, *size, dtype=torch.float64, generator=g)
    h = torch.randn(*lead, 2, *size, dtype=torch.float64, generator=g)
    weight = torch.randn(7, 2, *([1] * spatial), dtype=torch.float64, generator=g)
    expected = y + 0.75 * CONV[spatial](h, weight)
    got = add_channel_mix(y, h, weight, 0.75)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lead", [(), (4,), (2, 3), (0, 3)])
def test_add_feature_mix_is_a_linear_scaled_and_added(lead):
    g = torch.Generator().manual_seed(len(lead))
    y = torch.randn(*lead, 6, dtype=torch.float64, generator=g)
    h = torch.randn(*lead, 3, dtype=torch.float64, generator=g)
    weight = torch.randn(6, 3, dtype=torch.float64, generator=g)
    torch.testing.assert_close(add_feature_mix(y, h, weight, -2.0), y - 2.0 * h @ weight.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_gradients_reach_all_three_inputs(layout):
    y = torch.randn(2, 4, 3, 3).to(memory_format=layout).requires_grad_(True)
    h = torch.randn(2, 2, 3, 3).to(memory_format=layout).requires_grad_(True)
    weight = torch.randn(4, 2, 1, 1, requires_grad=True)
    add_channel_mix(y, h, weight, 0.5).square().sum().backward()
    expected = [t.grad.clone() for t in (y, h, weight)]
    for t in (y, h, weight):
        t.grad = None
    (y + 0.5 * F.conv2d(h, weight)).square().sum().backward()
    for got, t in zip(expected, (y, h, weight)):
        torch.testing.assert_close(got, t.grad)


@pytest.mark.parametrize("spatial", [2, 3])
def test_add_channel_mix_keeps_a_channels_last_layout(spatial):
    g = torch.Generator().manual_seed(10 + spatial)
    fmt = torch.channels_last if spatial == 2 else torch.channels_last_3d
    size = (5, 4, 3)[:spatial]
    y = torch.randn(3, 7, *size, dtype=torch.float64, generator=g).to(memory_format=fmt)
    h = torch.randn(3, 2, *size, dtype=torch.float64, generator=g).to(memory_format=fmt)
    weight = torch.randn(7, 2, *([1] * spatial), dtype=torch.float64, generator=g)
    got = add_channel_mix(y, h, weight, -0.5)
    torch.testing.assert_close(got, y - 0.5 * CONV[spatial](h, weight), rtol=1e-12, atol=1e-12)
    assert got.is_contiguous(memory_format=fmt)


def test_add_channel_mix_accepts_mixed_layouts():
    g = torch.Generator().manual_seed(3)
    y = torch.randn(2, 6, 4, 5, dtype=torch.float64, generator=g).to(memory_format=torch.channels_last)
    h = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g)
    weight = torch.randn(6, 3, 1, 1, dtype=torch.float64, generator=g)
    torch.testing.assert_close(add_channel_mix(y, h, weight, 2.0), y + 2.0 * F.conv2d(h, weight), rtol=1e-12, atol=1e-12)
