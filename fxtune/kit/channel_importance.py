"""How much each unit of a channel group matters, summed over the group's members.

A unit's score adds up, over every member tensor the rule reads (the producers' weight rows, the
consumers' weight columns, norm scales), a reduction of that unit's slice of the tensor: Σ|w|
("l1"), Σw² ("l2"), |γ| ("bn_scale") or Σ|w·∂L/∂w| ("taylor", first-order Taylor on data).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor, fx
from torch.func import functional_call

from ..graph.channels.groups import ChannelGroup
from ..errors import StructureError

WEIGHT_ROLES = ("out", "in", "norm_weight")


def tensor_at(gm: fx.GraphModule, path: str) -> Tensor:
    owner, _, name = path.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    found = module._parameters.get(name)
    return (found if found is not None else module._buffers[name]).detach()


def unit_sum(
    gm: fx.GraphModule,
    group: ChannelGroup,
    reduce: Callable[[Tensor], Tensor],
    roles: Iterable[str] = WEIGHT_ROLES,
    tensors: dict[str, Tensor] | None = None,
) -> Tensor:
    """Per unit, Σ over members with these roles of reduce(slice) (reduce maps a slice to per-position numbers).

    `tensors` replaces members' tensors by path (e.g. w·∂L/∂w for Taylor)."""
    scores = torch.zeros(group.units, dtype=torch.float64)
    roles = set(roles)
    for member in group.members:
        if member.literal is not None or member.role not in roles:
            continue
        t = (tensors or {}).get(member.name)
        t = tensor_at(gm, member.name) if t is None else t
        per_position = reduce(t.double().movedim(member.axis, 0)[member.positions].reshape(member.channels, -1))
        scores.index_add_(0, member.units, per_position)
    return scores


def taylor_products(gm: fx.GraphModule, groups: list[ChannelGroup], data: Iterable, loss: Callable[..., Tensor]) -> dict[str, Tensor]:
    """|w·∂L/∂w| summed over the batches of `data` for every member tensor, computed on copies (gm untouched).

    `loss(model, batch)` returns a scalar; `model` runs gm with the copies."""
    paths = sorted({m.name for g in groups for m in g.members if m.literal is None and m.role in WEIGHT_ROLES})
    leaves = {p: tensor_at(gm, p).clone().requires_grad_(True) for p in paths}
    buffers = {name: b.detach().clone() for name, b in gm.named_buffers()}
    totals = {p: torch.zeros_like(t) for p, t in leaves.items()}

    def model(*args: Any, **kwargs: Any) -> Any:
        return functional_call(gm, {**buffers, **leaves}, args, kwargs, tie_weights=True, strict=False)

    seen = 0
    for batch in data:
        for t in leaves.values():
            t.grad = None
        value = loss(model, batch)
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise StructureError(f"loss(model, batch) must return a scalar tensor, got {type(value).__name__}")
        value.backward()
        for p, t in leaves.items():
            if t.grad is not None:
                totals[p] += (t.detach() * t.grad).abs()
        seen += 1
    if not seen:
        raise StructureError("importance='taylor' got no batches: data= must hold at least one batch")
    return totals


def unit_importance(
    gm: fx.GraphModule, groups: list[ChannelGroup], rule: Any, *, seed: int = 0, data: Iterable | None = None,
    loss: Callable[..., Tensor] | None = None,
) -> dict[str, Tensor]:
    """{group name: one score per unit} by `rule` ("l1", "l2", "bn_scale", "random", "taylor" or a callable)."""
    products = taylor_products(gm, groups, data, loss) if rule == "taylor" and groups else None
    return {g.name: scores_for(gm, g, rule, seed=seed, products=products) for g in groups}


def scores_for(gm: fx.GraphModule, group: ChannelGroup, rule: Any, *, seed: int = 0, products: dict | None = None) -> Tensor:
    """One score per unit of `group` by `rule` ("l1", "l2", "bn_scale", "random", "taylor" or a callable)."""
    if callable(rule):
        scores = torch.as_tensor(rule(group, gm), dtype=torch.float64).flatten()
        if scores.numel() != group.units:
            raise StructureError(f"importance callable returned {scores.numel()} scores for group '{group.name}', which has {group.units} units")
        return scores
    if rule == "l1":
        return unit_sum(gm, group, lambda s: s.abs().sum(1))
    if rule == "l2":
        return unit_sum(gm, group, lambda s: s.square().sum(1))
    if rule == "bn_scale":
        if not any(m.role == "norm_weight" for m in group.members):
            return unit_sum(gm, group, lambda s: s.square().sum(1))
        return unit_sum(gm, group, lambda s: s.abs().sum(1), roles=("norm_weight",))
    if rule == "taylor":
        return unit_sum(gm, group, lambda s: s.sum(1), tensors=products)
    if rule == "random":
        g = torch.Generator().manual_seed(seed + sum(map(ord, group.name)))
        return torch.rand(group.units, generator=g, dtype=torch.float64)
    raise StructureError(f"importance must be 'l1', 'l2', 'bn_scale', 'random', 'taylor' or a callable (group, gm) -> scores, got {rule!r}")
