"""What `fxtune apply` does with its result: compare it with the model, and write it to a directory."""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import fx, nn

from ..adapter.fusion import fold
from ..adapter.lifecycle import adapters
from ..errors import FxtuneError
from ..inspection import trainable_parameters
from ..io.adapter_files import save_adapters
from ..io.graph_files import save
from .saved import GRAPH_DIR



def first_tensor(output: Any) -> torch.Tensor:
    """The first tensor of a model output (a tensor, a tuple, a dict or a transformers ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise FxtuneError(f"the model's output ({type(output).__name__}) holds no tensor to compare")


def _max_difference(a: Any, b: Any) -> float:
    return (first_tensor(a).double() - first_tensor(b).double()).abs().max().item()


def change_report(model: nn.Module, result: fx.GraphModule, x: torch.Tensor) -> list[str]:
    """Lines comparing result and model on `x`. Adapters as created mostly leave the output as it
    was (LoRA's B starts at zero), so on a copy whose trainable tensors are perturbed, as training
    would, the check also shows that they act and that fusing keeps what they compute."""
    shape = tuple(x.shape)
    with torch.no_grad():
        before = _max_difference(result.eval()(x), model(x))
        if not adapters(result):
            return [f"max |result - model| on a random input of shape {shape}: {before:.3g}"]
        perturbed = copy.deepcopy(result)
        g = torch.Generator().manual_seed(0)
        for p in trainable_parameters(perturbed):
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
        y = perturbed.eval()(x)
        return [
            f"max |result - model| on a random input of shape {shape}, adapters as created: {before:.3g}",
            f"the same with the adapters' trainable tensors moved as training would (+N(0, 0.02²)): {_max_difference(y, model(x)):.3g}",
            f"max |fuse(result) - result| with those tensors: {_max_difference(fold(perturbed)(x), y):.3g}",
        ]


def write_result(gm: fx.GraphModule, out: str, *, format: str = "fxtune", overwrite: bool = False) -> list[str]:
    """Writes every adapter of gm (the "default" one into `out`, others into `out/<name>`, PEFT's
    layout) and the GraphModule itself into `out/graph` (fxtune.save); returns what it wrote."""
    written = []
    for info in adapters(gm):
        path = out if info.name == "default" else os.path.join(out, info.name)
        save_adapters(gm, path, info.name, format=format, overwrite=overwrite)
        written.append(f"adapter '{info.name}' ({info.kind}, {format} format): {path}")
    graph = os.path.join(out, GRAPH_DIR)
    save(gm, graph)
    written.append(f"GraphModule: {graph} (fxtune.load({graph!r}) reads it back)")
    return written
