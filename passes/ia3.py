"""IA³: a learned scale vector (initialised to ones) on a weight's output rows or input columns.

position="output": W' = diag(s)·W and b' = s·b, i.e. y' = y·s over the output channels.
position="input" (the feed-forward variant): W' = W·diag(s), i.e. the site reads x·s; on a
grouped conv, weight column j of output o (in group g) is input channel g·(in/groups) + j.

After `ia3(gm, targets="layer4.*")` (output position, activation form) a site reads:

    layer4_0_conv1_scale = self.fxtune.default.layer4_0_conv1.scale
    layer4_0_conv1 = getattr(self.layer4, "0").conv1(x);  x = None
    layer4_0_conv1_ia3_scale_view = layer4_0_conv1_scale.view(-1, 1, 1);  layer4_0_conv1_scale = None
    layer4_0_conv1_ia3 = layer4_0_conv1 * layer4_0_conv1_ia3_scale_view;  layer4_0_conv1 = layer4_0_conv1_ia3_scale_view = None

and after `ia3(gm, targets="fc", position="input")`:

    fc_scale = self.fxtune.default.fc.scale
    fc_ia3_input = mean * fc_scale;  mean = fc_scale = None
    fc = self.fc(fc_ia3_input);  fc_ia3_input = None

form="weight" calls `ia3_weight` / `ia3_bias` on the weight and bias before the op instead.
"""

from __future__ import annotations

import torch
from torch import fx

import fxtune
from fxtune import AdapterError, AdapterKind


def ia3_weight(w: torch.Tensor, *, scale: torch.Tensor, position: str) -> torch.Tensor:
    """The meaning on W (out, in/groups, *kernel): rows times s (output) or columns times s (input)."""
    if position == "output":
        return w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    groups = scale.numel() // w.shape[1]
    grouped = w.reshape(groups, -1, *w.shape[1:]) * scale.reshape(groups, 1, -1, *([1] * (w.dim() - 2)))
    return grouped.reshape(w.shape)


def ia3_bias(b: torch.Tensor, *, scale: torch.Tensor, position: str) -> torch.Tensor:
    """The meaning on b: scaled with the output channels; input scaling leaves it alone."""
    return b * scale if position == "output" else b


def _changes_bias(position: str) -> bool:
    return position == "output"


def _channel_axes(site: fxtune.Site, config: dict) -> dict:
    """The scale follows the output channels, or the input channels (all groups) on the input side."""
    return {"scale": {"out": 0} if config["position"] == "output" else {"in": 0}}


def _activation(em: fxtune.Emitter, x: fx.Node, y: fx.Node, inputs: dict) -> fx.Node:
    """Output position: y · s over the channel dimension (last for linear, 1 for conv)."""
    if inputs["position"] != "output":
        return y
    return em.mul(y, em.channel_view(inputs["scale"], role="ia3_scale_view"), role="ia3")


def _activation_input(em: fxtune.Emitter, x: fx.Node, inputs: dict) -> fx.Node:
    """Input position: x · s, which the call (and every adapter inside this one) then reads."""
    if inputs["position"] != "input":
        return x
    return em.mul(x, em.channel_view(inputs["scale"], role="ia3_scale_view"), role="ia3_input")


KIND = fxtune.register_kind(
    AdapterKind("ia3", weight=ia3_weight, bias=ia3_bias, activation=_activation, activation_input=_activation_input,
                changes_bias=_changes_bias, channel_axes=_channel_axes)
)


@fxtune.register_pass
def ia3(
    gm: fx.GraphModule,
    targets: fxtune.Selector = None,
    *,
    position: str = "output",
    form: str = "activation",
    adapter: str = "default",
    exclude: fxtune.Selector = None,
) -> fx.GraphModule:
    """Adds one IA³ scale vector (ones) per selected weight; returns a new GraphModule.

    position: "output" (out channels, bias too) or "input" (in features / in channels).
    form: "activation" (a broadcast multiply; the default, it is cheap) or "weight".
    """
    if position not in ("output", "input"):
        raise AdapterError(f"position must be 'output' or 'input' (the feed-forward variant), got {position!r}")
    if form not in ("activation", "weight"):
        raise AdapterError(f"form must be 'activation' or 'weight', got {form!r}")
    rw = fxtune.Rewrite(gm, kind="ia3", adapter=adapter)
    for target, found in rw.select(targets, exclude=exclude).items():
        site = found[0]
        weight = rw.weight(target)
        n = site.out_features if position == "output" else site.in_features
        rw.attach(
            target,
            params={"scale": torch.ones(n, dtype=weight.dtype, device=weight.device)},
            config={"position": position},
            form=form,
        )
    return rw.finish()
