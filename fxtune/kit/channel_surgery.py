"""Removing channels for real: every member of a group loses the removed units' positions.

Tensors (weights, biases, norm parameters and statistics, other parameters) become new, smaller
tensors at the same paths, so state_dict keys stay the model's; modules get matching attributes
(`out_features`, `in_channels`, `groups`, `num_features`, `normalized_shape`...); numbers in the
graph that count channels (a view's sizes, a split's sections, a slice's bounds) are rewritten;
adapters are sliced as their kinds declare (`AdapterKind.channel_axes`) and their code re-emitted.
All of it happens on the pass's own copy; the input GraphModule is never touched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx, nn
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ..adapter.base_weights import holds_replaced_weights
from ..adapter.kinds import get_kind
from ..adapter.realise import rebuild
from ..adapter.slots import AdapterSlot, all_slots
from ..adapter.strip import strip_sites
from ..errors import StructureError
from ..graph.channels.groups import ChannelGroup
from ..graph.channels.names import op_name, sizes_arg
from ..graph.discovery import is_conv1d, site_table
from ..graph.signatures import replace_argument
from ..graph.sites import SiteTable, join
from .channel_compensate import compensate_constants
from .restructure import Restructure

SIZE_ARITHMETIC = {"getitem", "floordiv", "mul", "add", "sub", "truediv", "getattr", "size", "sym_size"}
Removals = dict[tuple[str, int], Tensor]  # (tensor path or literal key, axis) -> removed positions


def removed_positions(groups: list[ChannelGroup], remove: dict[str, Tensor]) -> tuple[Removals, dict[tuple, list]]:
    """Per tensor axis, the positions to remove; per literal, the member entries with their removed positions."""
    tensors: dict[tuple[str, int], list[Tensor]] = {}
    literals: dict[tuple, list] = {}
    for group in groups:
        units = remove.get(group.name)
        if units is None or not bool(units.any()):
            continue
        for member in group.members:
            gone = member.positions[units[member.units]]
            if member.role == "consumed":
                continue
            if member.literal is not None:
                key = (member.literal.node, member.literal.kind, member.literal.dim)
                literals.setdefault(key, []).append((member, gone))
            elif gone.numel():
                tensors.setdefault((member.name, member.axis), []).append(gone)
    return {k: torch.cat(v).unique() for k, v in tensors.items()}, literals


def _kept(size: int, gone: Tensor) -> Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[gone] = False
    return keep.nonzero().flatten()


class Surgery:
    """Applies removals to the GraphModule `gm` (the pass's own copy)."""

    def __init__(self, gm: fx.GraphModule, sites: SiteTable, removals: Removals, literals: dict[tuple, list],
                 constants: dict | None = None, constant_sizes: list | None = None):
        self.gm, self.sites = gm, sites  # sites of gm as given (valid through stripping, until slicing)
        self.constant_sizes = constant_sizes or []
        self.removals = dict(removals)
        self.literals = literals
        self.constants = constants or {}
        self.modules = dict(gm.named_modules())
        self.indices: dict[str, list] = {}  # getitem node -> its index as edited so far (several dims may be sliced)

    def run(self) -> fx.GraphModule:
        slots = all_slots(self.gm)
        plans = []
        if slots:
            plans = check_adapters(self.gm, slots, self.removals, self.sites)
            strip_sites(self.gm, self.sites)
        self.by_name = {n.name: n for n in self.gm.graph.nodes}  # the base graph's nodes (edits add none it looks up)
        for site, delta in self.constants.values():
            self._add_to_bias(site, delta)
        before = {path: self._tensor(path).shape for path, _ in self.removals}
        self._slice_adapters(plans)
        by_path: dict[str, dict[int, Tensor]] = {}
        for (path, axis), gone in self.removals.items():
            by_path.setdefault(path, {})[axis] = gone
        for path, axes in by_path.items():
            self._slice_tensor(path, axes)
        owners = {path.rpartition(".")[0] for path in by_path}
        for owner in owners:
            module = self.modules.get(owner)
            if module is not None:
                fix_attributes(module, {path.rpartition(".")[2]: before[path] for path in by_path if path.rpartition(".")[0] == owner})
        for name, dim, value in self.constant_sizes:
            set_size(self.by_name[name], dim, value)
        for key, entries in self.literals.items():
            self._edit_literal(key, entries)
        self._drop_unused_sizes()
        refresh_shapes(self.gm)
        if slots:
            rebuild(self.gm, site_table(self.gm))  # sites found again: their layers are smaller now
        return self.gm

    def _drop_unused_sizes(self) -> None:
        """Size arithmetic that pinned sizes left without readers goes (`D // heads` once 8 is a constant)."""
        for node in reversed(list(self.gm.graph.nodes)):
            if not node.users and node.op in ("call_function", "call_method") and op_name(node) in SIZE_ARITHMETIC:
                self.gm.graph.erase_node(node)

    def _tensor(self, path: str) -> Tensor:
        owner, _, name = path.rpartition(".")
        module = self.modules[owner]
        found = module._parameters.get(name)
        return found if found is not None else module._buffers[name]

    def _add_to_bias(self, site: Any, delta: Tensor) -> None:
        """Adds `delta` to a site's bias, giving the layer a bias if it had none (its rows then follow the weight's)."""
        if site.use_ref.bias is not None:
            old = self._tensor(site.use_ref.bias)
            self._replace(old, nn.Parameter(old.detach() + delta.to(old.dtype), requires_grad=old.requires_grad))
            return
        owner = self.modules[site.use_ref.owner]
        name = "bias" if "bias" not in owner._parameters or owner._parameters["bias"] is None else f"{site.use_ref.param}_bias"
        owner._parameters[name] = nn.Parameter(delta.clone(), requires_grad=False)
        path = join(site.use_ref.owner, name)
        out_axis = 1 if site.use_ref.transposed else 0
        if (site.use_ref.path, out_axis) in self.removals:
            self.removals[(path, 0)] = self.removals[(site.use_ref.path, out_axis)]
        if site.call == "function":
            node = self.by_name[site.node.name]
            with self.gm.graph.inserting_before(node):
                getter = self.gm.graph.get_attr(path)
            replace_argument(node, "bias", getter)

    def _replace(self, old: Tensor, new: Tensor) -> None:
        for module in self.modules.values():
            for store in (module._parameters, module._buffers):
                for name, t in store.items():
                    if t is old:
                        store[name] = new

    def _slice_tensor(self, path: str, axes: dict[int, Tensor]) -> None:
        old = self._tensor(path)
        new = old.detach()
        for axis, gone in axes.items():
            new = new.index_select(axis, _kept(new.shape[axis], gone))
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(new.contiguous(), requires_grad=old.requires_grad)
        else:
            new = new.contiguous()
        self._replace(old, new)

    def _slice_adapters(self, plans: list[tuple[AdapterSlot, dict]]) -> None:
        for slot, plan in plans:
            for name, slices in plan.items():
                old = getattr(slot, name)
                new = old.detach()
                for axis, keep in slices:
                    new = new.index_select(axis, keep)
                new = new.contiguous()
                if name in slot._parameters:
                    slot._parameters[name] = nn.Parameter(new, requires_grad=old.requires_grad)
                else:
                    slot._buffers[name] = new

    def _edit_literal(self, key: tuple, entries: list) -> None:
        node_name, kind, dim = key
        gone = torch.cat([g for _, g in entries]).unique()
        if not gone.numel():
            return
        member = entries[0][0]
        literal = member.literal
        size = literal.ids.numel()
        if kind == "module":  # absolute: fix_attributes may already have set it from the new tensors
            module = self.modules[node_name]
            value = getattr(module, literal.extra)
            if isinstance(value, tuple):
                value = tuple(size - gone.numel() if i == dim else v for i, v in enumerate(value))
            else:
                value = size - gone.numel()
            setattr(module, literal.extra, value)
            return
        node = self.by_name[node_name]
        if kind in ("sizes", "unflatten"):
            _edit_sizes(node, kind, dim, gone.numel(), literal.extra, size)
        elif kind == "split":
            _edit_split(node, dim, literal.extra, gone)
        elif kind == "slice":
            _edit_slice(node, literal.extra, gone, self.indices)
        elif kind == "norm_shape":
            shape = list(node.args[1])
            shape[dim] -= gone.numel()
            node.args = (node.args[0], shape, *node.args[2:])
        elif kind == "groups":
            node.args = (node.args[0], node.args[1] - gone.numel(), *node.args[2:])


def remove_channels(
    gm: fx.GraphModule, groups: Any, remove: dict[str, Tensor], *, compensate: bool = False, example_inputs: Any = None,
    name: str = "prune",
) -> tuple[fx.GraphModule, list[tuple[str, str, str]]]:
    """A new GraphModule without the units `remove` marks ({group name: bool over its units, True = remove}),
    and, with `compensate`, a row (reader, group, "exact: ..." / "skipped: why") per layer reading them."""
    rs = Restructure(gm, name=name)
    tensors, literals = removed_positions(list(groups), remove)
    rows: list[tuple[str, str, str]] = []
    constants = compensate_constants(gm, groups, remove, example_inputs, rows) if compensate else None
    Surgery(rs.gm, rs.sites, tensors, literals, constants, getattr(groups, "constant_sizes", [])).run()
    return rs.finish(), rows


def refresh_shapes(gm: fx.GraphModule) -> None:
    """Shapes recorded on the nodes (torch.export's meta["val"]) follow the smaller layers: propagated again
    from the inputs' fake values, symbolic sizes kept; where that fails they are dropped, never left stale."""
    if not any("val" in n.meta or "tensor_meta" in n.meta for n in gm.graph.nodes):
        return
    inputs = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode(inputs) if all(v is not None for v in inputs) else None
    for n in gm.graph.nodes:
        n.meta.pop("tensor_meta", None)
    if mode is not None:
        try:
            FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)
            return
        except Exception:  # an op the fake mode cannot run: no shapes rather than wrong ones
            pass
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            n.meta.pop("val", None)


def _edit_sizes(node: fx.Node, kind: str, dim: int, count: int, start: int | None, old: int) -> None:
    if kind == "unflatten":
        sizes = list(node.args[2])
        if isinstance(sizes[dim - start], int) and sizes[dim - start] != -1:
            sizes[dim - start] -= count
        node.args = (*node.args[:2], tuple(sizes), *node.args[3:])
        return
    sizes, _ = sizes_arg(node)
    if sizes[dim] != -1:
        set_size(node, dim, old - count)


def set_size(node: fx.Node, dim: int, value: int) -> None:
    """Puts a constant at position `dim` of a view/reshape/expand's size list."""
    sizes, index = sizes_arg(node)
    sizes[dim] = value
    if index is None:
        node.args = (node.args[0], *sizes)
    else:
        args = list(node.args)
        args[index] = type(node.args[index])(sizes) if not isinstance(node.args[index], torch.Size) else list(sizes)
        node.args = tuple(args)


def _edit_split(node: fx.Node, dim: int, sizes: list[int], gone: Tensor) -> None:
    """A split or chunk along channels becomes a split into the sizes that remain."""
    keep = torch.ones(sum(sizes), dtype=torch.bool)
    keep[gone] = False
    new, start = [], 0
    for size in sizes:
        new.append(int(keep[start:start + size].sum()))
        start += size
    x = node.args[0]
    if node.op == "call_method":
        node.target, node.args, node.kwargs = "split", (x, new, dim), {}
    elif isinstance(node.target, torch._ops.OpOverload):
        node.target, node.args, node.kwargs = torch.ops.aten.split_with_sizes.default, (x, new, dim), {}
    else:
        node.target, node.args, node.kwargs = torch.split, (x, new, dim), {}


def _edit_slice(node: fx.Node, extra: tuple, gone: Tensor, indices: dict[str, list]) -> None:
    """Moves a slice's bounds past the removed positions; a getitem's index keeps earlier edits of other dims."""
    name, start, stop = extra[:3]
    before = lambda i: int((gone < i).sum())  # noqa: E731 - removed positions before index i
    new_start, new_stop = start - before(start), stop - before(stop)
    if name == "getitem":
        position, parts = extra[3], indices.setdefault(node.name, list(extra[4]))
        parts[position] = slice(new_start, new_stop, None)
        node.args = (node.args[0], tuple(parts))
    elif name == "narrow":
        node.args = (node.args[0], node.args[1], new_start, new_stop - new_start)
    else:
        args = list(node.args) + [None] * (5 - len(node.args))
        args[2], args[3] = new_start, new_stop
        node.args = tuple(args[:max(len(node.args), 4)])


def fix_attributes(module: nn.Module, old_shapes: dict[str, tuple[int, ...]]) -> None:
    """Module attributes that count channels follow the module's new tensor shapes."""
    weight = module._parameters.get("weight")
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        old_out = old_shapes.get("weight", weight.shape)[0]
        per_group_out = old_out // module.groups
        if module.groups > 1:
            module.groups = weight.shape[0] // per_group_out
        module.out_channels, module.in_channels = weight.shape[0], weight.shape[1] * module.groups
    elif isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        found = next((t for t in (weight, module.running_mean) if t is not None), None)
        if found is not None:
            module.num_features = found.shape[0]
    elif isinstance(module, nn.LayerNorm) and weight is not None:
        module.normalized_shape = tuple(weight.shape)
    elif isinstance(module, nn.GroupNorm) and weight is not None:
        module.num_channels = weight.shape[0]
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = weight.shape
    elif is_conv1d(module) and hasattr(module, "nf"):
        module.nf = weight.shape[1]


def _declared(slot: AdapterSlot, site: Any) -> dict:
    kind = get_kind(slot.kind)
    axes = kind.channel_axes
    return axes(site, dict(slot.config)) if callable(axes) else axes


def _site_removals(site: Any, removals: Removals) -> dict[str, Tensor]:
    """Removed rows ("out"), weight columns ("in_group") and input channels ("in") of a site's canonical weight."""
    path = site.weight_ref.path
    out_axis, in_axis = (1, 0) if site.weight_ref.transposed else (0, 1)
    rows = removals.get((path, out_axis), torch.zeros(0, dtype=torch.long))
    cols = removals.get((path, in_axis), torch.zeros(0, dtype=torch.long))
    if site.groups == 1:
        return {"out": rows, "in_group": cols, "in": cols}
    width, per = site.out_features // site.groups, site.shape[1]
    groups = (rows // width).unique()
    channels = (groups[:, None] * per + torch.arange(per)[None, :]).flatten()
    return {"out": rows, "in_group": torch.zeros(0, dtype=torch.long), "in": channels}


def adapter_plans(table: SiteTable, slots: list[AdapterSlot], removals: Removals) -> list[tuple[AdapterSlot, dict]]:
    """How each adapter's tensors are sliced: {tensor: [(axis, kept index)]}; refusals raise StructureError."""
    sites = {weight: group[0] for weight, group in table.by_weight.items()}
    plans = []
    for slot in slots:
        site = sites.get(slot.weight_name)
        if site is None:
            continue
        gone = _site_removals(site, removals)
        if not any(g.numel() for g in gone.values()):
            continue
        where = f"adapter '{slot.adapter}' ({slot.kind}) on '{site.name}'"
        if get_kind(slot.kind).channel_axes is None:
            raise StructureError(
                f"{where} does not declare how its tensors follow channels (AdapterKind.channel_axes), so pruning "
                f"cannot slice it; fuse it first (fxtune.passes.fuse), then prune"
            )
        sizes = {"out": site.out_features, "in": site.in_features, "in_group": site.shape[1]}
        plan: dict[str, list] = {}
        for name, roles in _declared(slot, site).items():
            tensor = getattr(slot, name, None)
            if not isinstance(tensor, Tensor):
                continue
            for role, spec in roles.items():
                positions = gone[role]
                if not positions.numel():
                    continue
                if spec is None:
                    raise StructureError(
                        f"{where}: its '{name}' depends on the {role} channels but cannot be sliced (its meaning would "
                        "change); fuse it first (fxtune.passes.fuse), then prune"
                    )
                axis, block = spec if isinstance(spec, tuple) else (spec, 1)
                entries, counts = (positions // block).unique(return_counts=True)
                if block > 1 and bool((counts != block).any()):
                    raise StructureError(
                        f"{where}: pruning removes some but not all of the {block} {role} channels one entry of its "
                        f"'{name}' covers; prune whole blocks, or fuse it first (fxtune.passes.fuse), then prune"
                    )
                plan.setdefault(name, []).append((axis, _kept(sizes[role] // block, entries)))
        plans.append((slot, plan))
    return plans


def check_adapters(
    gm: fx.GraphModule, slots: list[AdapterSlot], removals: Removals, table: SiteTable
) -> list[tuple[AdapterSlot, dict]]:
    """Refuses adapted graphs that slicing cannot keep exact (merged adapters, replaced base weights); else
    how each adapter's tensors are sliced (adapter_plans)."""
    merged = sorted({s.adapter for s in slots if s.merged})
    if merged:
        raise StructureError(f"adapters {merged} are merged into the weights; fxtune.unmerge(gm) or fuse first, then prune")
    for path, module in gm.named_modules():
        if holds_replaced_weights(module):
            raise StructureError(
                f"an adapter replaced the base weight of '{path}' (e.g. PiSSA) and fxtune keeps the original to restore it; "
                "fuse first (fxtune.passes.fuse), then prune"
            )
    return adapter_plans(table, slots, removals)
