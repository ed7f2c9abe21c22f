"""modules_to_save, on graphs: a trainable full copy of selected layers (e.g. a classifier head).

The copy is an adapter like any other (kind "train_module": W' = the copy's weight, b' = its
bias), so it is saved with its adapter, switched by set_active, merged, and swapped in at fuse.
It is a companion kind: it joins a named adapter of any kind (`train_module(gm, "fc", adapter="task")`
next to LoRA adapter "task"). Also reachable as `fxtune.train_module`.
"""

from __future__ import annotations

import torch
from torch import fx

import fxtune
from fxtune import AdapterError, AdapterKind


def copied_weight(w: torch.Tensor, *, weight_copy: torch.Tensor) -> torch.Tensor:
    """The meaning on the weight: replaced by the trained copy."""
    return weight_copy


def copied_bias(b: torch.Tensor, *, bias_copy: torch.Tensor) -> torch.Tensor:
    """The meaning on the bias: replaced by the trained copy."""
    return bias_copy


KIND = fxtune.register_kind(AdapterKind("train_module", weight=copied_weight, bias=copied_bias, companion=True))


@fxtune.register_pass
def train_module(
    gm: fx.GraphModule, targets: fxtune.Selector, *, adapter: str = "default", exclude: fxtune.Selector = None
) -> fx.GraphModule:
    """A new GraphModule in which whole copies of the selected weights (and biases) train with `adapter`.

    Like PEFT's modules_to_save, e.g. `train_module(gm, "fc", adapter="task")` for a new head.
    Give it the adapter name of the adapter it belongs to; the base layer stays untouched.
    """
    rw = fxtune.Rewrite(gm, kind="train_module", adapter=adapter)
    for weight, found in rw.select(targets, exclude=exclude).items():
        copy, bias = rw.entering(weight)  # a copy of the layer as it is, adapters already on it included
        params = {"weight_copy": copy}
        if bias is not None:
            params["bias_copy"] = bias
        elif found[0].has_bias:
            raise AdapterError(
                f"'{found[0].name}': its bias is computed in the graph, not a parameter, so it cannot be copied "
                "and trained; exclude this site"
            )
        rw.attach(weight, params=params, form="weight")
    return rw.finish()
