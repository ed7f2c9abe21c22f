"""DistributedDataParallel for fxtune GraphModules: synchronise what trains, never the base weights.

Plain DDP broadcasts every parameter from rank 0 when it starts. A traced GraphModule shares its
base weights' storage with the user's model, so on the other ranks that broadcast writes into
the user's tensors (and moves the whole base model over the network). `data_parallel` leaves
frozen parameters, and adapters the code does not read, out of DDP; it checks instead that every
rank holds the same frozen weights, and refuses to train if not.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import fx, nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import FxtuneError


def data_parallel(gm: fx.GraphModule, **ddp_options: Any) -> DistributedDataParallel:
    """`DistributedDataParallel(gm, **ddp_options)` over the parameters gm trains and its code reads.

    Needs an initialised process group. Raises FxtuneError (on every rank) when the ranks' frozen
    weights differ: load the same base model on every rank, since nothing broadcasts it.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise FxtuneError("fxtune.data_parallel needs torch.distributed.init_process_group(...) to have been called first")
    if not isinstance(gm, fx.GraphModule):
        raise FxtuneError(f"fxtune.data_parallel takes an fxtune GraphModule, got {type(gm).__name__}")
    read = _read_by_code(gm)
    ignored, frozen = [], []
    for name, p in gm.named_parameters():
        if not p.requires_grad:
            frozen.append((name, p))
        if not p.requires_grad or id(p) not in read:
            ignored.append(name)
    _check_same_everywhere(frozen, ddp_options.get("process_group"))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(gm, ignored)
    return DistributedDataParallel(gm, **ddp_options)


def _read_by_code(gm: fx.GraphModule) -> set[int]:
    """ids of the parameters gm's code reads: get_attr'd tensors and everything of called or read modules."""
    read: set[int] = set()
    for node in gm.graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        value = _attribute(gm, node.target)
        if isinstance(value, nn.Module):
            read.update(id(p) for p in value.parameters())
        elif isinstance(value, torch.Tensor):
            read.add(id(value))
    return read


def _attribute(gm: nn.Module, path: str) -> Any:
    value: Any = gm
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _check_same_everywhere(frozen: list[tuple[str, torch.Tensor]], group: Any) -> None:
    """Compares per-tensor checksums (sum, sum of squares and a position-weighted sum, in float64)
    across ranks with two all-reduces; raises naming the first tensor that differs."""
    if not frozen:
        return
    rows = []
    for _, p in frozen:
        flat = p.detach().reshape(-1).double()
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device).remainder_(97).add_(1)
        rows.append(torch.stack([flat.sum(), flat.square().sum(), (flat * weights).sum()]))
    local = torch.stack(rows)
    low, high = local.clone(), local.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    differs = ((low != high) & ~(low.isnan() & high.isnan())).any(dim=1).nonzero().flatten().tolist()
    if differs:
        names = [frozen[i][0] for i in differs]
        raise FxtuneError(
            f"the ranks hold different frozen weights ({len(names)} tensors, first '{names[0]}'); data_parallel does not "
            "broadcast them (that would write into your model on other ranks): load the same base model "
            "on every rank (trainable adapters are broadcast from rank 0 as usual)"
        )
