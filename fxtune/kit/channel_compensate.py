"""Compensation: what a removed channel would still emit with its weights zeroed, folded into the consumers' biases.

With a producer's weight rows zeroed, its channel still carries a constant (its bias through
BatchNorm and the activation). A layer reading that channel adds W[:, c]·constant to every
output, which its bias can absorb exactly when the layer is a linear, or a conv whose padding
repeats the constant (no zero padding). The constants are measured: the model with only the
removed channels' weights zeroed runs on the example inputs and on a perturbed copy, and a
channel counts as constant only if it is the same everywhere in both runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx

from .channel_importance import tensor_at
from ..graph.channels.groups import ChannelGroups
from ..graph.ownership import clone_graph_module
from ..graph.selection import sites as find_sites
from ..graph.sites import Site
from ..errors import StructureError

TOLERANCE = 1e-5


class _Inputs(fx.Interpreter):
    """Runs a graph and keeps the input of chosen site nodes."""

    def __init__(self, gm: fx.GraphModule, watched: dict[str, Site]):
        super().__init__(gm)
        by_name = {n.name: n for n in gm.graph.nodes}
        self.inputs = {name: by_name[s.input.name] for name, s in watched.items() if isinstance(s.input, fx.Node)}
        self.seen: dict[str, Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.inputs:
            x = self.env.get(self.inputs[n.name])
            if isinstance(x, Tensor):
                self.seen[n.name] = x.detach()
        return super().run_node(n)


def _zeroed(gm: fx.GraphModule, groups: ChannelGroups, remove: dict[str, Tensor]) -> fx.GraphModule:
    """A copy of gm whose removed channels' producer weight rows are zero (new tensors; gm's untouched)."""
    copy = clone_graph_module(gm)
    rows: dict[tuple[str, int], list[Tensor]] = {}
    for group in groups:
        units = remove.get(group.name)
        if units is None:
            continue
        for m in group.members:
            if m.role == "out":
                rows.setdefault((m.name, m.axis), []).append(m.positions[units[m.units]])
    for (path, axis), parts in rows.items():
        owner, _, name = path.rpartition(".")
        module = copy.get_submodule(owner)
        new = module._parameters[name].detach().clone()
        new.index_fill_(axis, torch.cat(parts), 0.0)
        module._parameters[name] = torch.nn.Parameter(new, requires_grad=False)
    return copy


def _perturbed(inputs: tuple) -> tuple:
    g = torch.Generator().manual_seed(1234)
    return tuple(x + 0.5 * torch.randn(x.shape, generator=g, dtype=x.dtype) if isinstance(x, Tensor) and x.is_floating_point() else x
                 for x in inputs)


def _exactness(site: Site) -> str | None:
    if not site.is_conv:
        return None
    padding = site.geometry.padding
    pads = [padding] if isinstance(padding, (int, str)) else list(padding)
    zero_pad = site.geometry.padding_mode == "zeros" and any(p == "same" or (isinstance(p, int) and p > 0) for p in pads)
    return "it pads with zeros, so border outputs would see 0 instead of the constant" if zero_pad else None


def compensate_constants(
    gm: fx.GraphModule, groups: ChannelGroups, remove: dict[str, Tensor], example_inputs: Any, report: list
) -> dict[str, tuple[Site, Tensor]]:
    """{consumer weight path: (site, bias delta over its rows)} where folding is exact; a row in `report`
    (reader, group, "exact: ..." or "skipped: why") for every layer that reads removed channels."""
    if example_inputs is None:
        raise StructureError("compensate=True measures the removed channels' constants by running the model: pass example_inputs=(x,)")
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    consumers: dict[str, list[tuple[str, Tensor]]] = {}
    for group in groups:
        units = remove.get(group.name)
        if units is None or not bool(units.any()):
            continue
        for m in group.members:
            gone = m.positions[units[m.units]]
            if m.role == "in" and gone.numel():
                consumers.setdefault(m.name, []).append((group.name, gone))
            elif m.role == "consumed" and gone.numel():
                report.append((m.name, group.name, "skipped: summed there (no layer's bias can take it)"))
    sites = {s.use_ref.path: s for s in reversed(find_sites(gm)) if s.call in ("module", "function") and s.groups == 1}
    watched = {sites[p].node.name: sites[p] for p in consumers if p in sites}
    zeroed = _zeroed(gm, groups, remove)
    runs = []
    with torch.no_grad():
        for args in (inputs, _perturbed(inputs)):
            recorder = _Inputs(zeroed, watched)
            recorder.run(*args)
            runs.append(recorder.seen)
    deltas = {}
    for path, entries in consumers.items():
        site = sites.get(path)
        for group_name, gone in entries:
            why = None if site is not None else "it is no plain layer call"
            why = why or _exactness(site)
            constant = None
            if why is None:
                constant = _constant(site, gone, [run.get(site.node.name) for run in runs])
                why = None if constant is not None else "the removed channels are not constant at its input"
            if why:
                report.append((site.name if site else path, group_name, f"skipped: {why}"))
                continue
            weight = tensor_at(gm, path)
            canonical = weight.t() if site.use_ref.transposed else weight
            columns = canonical.double().index_select(1, gone).reshape(canonical.shape[0], gone.numel(), -1).sum(2)
            delta = columns @ constant.double()
            old = deltas.get(path, (site, torch.zeros(canonical.shape[0], dtype=torch.float64)))[1]
            deltas[path] = (site, old + delta)
            report.append((site.name, group_name, f"exact: {gone.numel()} constant channel(s) folded into its bias"))
    return {p: (s, d.to(tensor_at(gm, p).dtype)) for p, (s, d) in deltas.items()}


def _constant(site: Site, gone: Tensor, values: list[Tensor | None]) -> Tensor | None:
    """The per-channel constant at a site's input, if the removed channels are constant in every run."""
    found = []
    for x in values:
        if x is None:
            return None
        cdim = x.dim() - 1 - (len(site.shape) - 2 if site.is_conv else 0)
        v = x.movedim(cdim, 0).index_select(0, gone).flatten(1).double()
        c = v[:, 0]
        scale = 1.0 + float(v.abs().max()) if v.numel() else 1.0
        if bool(((v - c[:, None]).abs() > TOLERANCE * scale).any()):
            return None
        found.append(c)
    if any(not torch.allclose(found[0], c, atol=TOLERANCE * (1 + float(c.abs().max()))) for c in found[1:]):
        return None
    return found[0]
