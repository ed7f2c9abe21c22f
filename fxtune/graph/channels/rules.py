"""Following channels through one graph: every node becomes a Flow by the rule for its op.

Call sites make items (their output channels) and unite their input's channels with their weight's
input columns; BatchNorm, LayerNorm and other parameters are members along their channel axis;
shape ops move items between dims; whatever has no rule blocks the items it touches. The rules
are written for both the symbolic-trace graph (modules, torch functions, tensor methods) and the
torch.export graph (aten ops on get_attr weights).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx, nn

from . import flow as cf
from .flow import Flow
from .items import HARD, NORM, Items, Literal, Reason, TensorMember
from .names import SPATIAL
from .ops import OpRules, keeps_zero_of, spatial_dims
from .shape_ops import ShapeRules
from ...errors import SelectionError
from ..selection import sites as find_sites
from ..sites import Site


_NORM_ROLES = {"weight": "norm_weight", "bias": "norm_bias", "running_mean": "norm_stat", "running_var": "norm_stat"}


class Analysis(OpRules, ShapeRules):
    """One pass over a graph in order, keeping every node's value and what it found."""

    def __init__(self, gm: fx.GraphModule, shapes: dict[fx.Node, Any]):
        self.gm = gm
        self.shapes = shapes
        self.items = Items()
        self.members: dict[tuple[str, int], TensorMember] = {}
        self.literals: list[Literal] = []
        self.constant_sizes: list[tuple[str, int, int]] = []  # (node, size index, value) computed sizes to pin
        self.modules = dict(gm.named_modules())
        self.env: dict[fx.Node, Any] = {}
        self._params: dict[int, tuple[str, dict[int, Tensor]]] = {}
        try:
            found = find_sites(gm)
        except SelectionError:
            found = []
        self.sites = found
        self.site_of = {s.node: s for s in found if s.call in ("module", "function") and s.use_ref.rows is None}

    def run(self) -> "Analysis":
        for node in self.gm.graph.nodes:
            self.env[node] = self.visit(node)
        return self

    # values -----------------------------------------------------------------------------------

    def value(self, arg: Any) -> Any:
        return fx.node.map_aggregate(arg, lambda a: self.env.get(a) if isinstance(a, fx.Node) else a)

    def flows_in(self, node: fx.Node) -> list[Flow]:
        found: list[Flow] = []

        def collect(v: Any) -> None:
            if isinstance(v, Flow):
                found.append(v)
            elif isinstance(v, (tuple, list)):
                for x in v:
                    collect(x)

        for a in (*node.args, *node.kwargs.values()):
            collect(self.value(a))
        return found

    def shaped(self, tree: Any) -> Any:
        """An untracked value for a shape tree (tensor shapes become Flows without items)."""
        if isinstance(tree, tuple) and all(isinstance(s, int) for s in tree):
            return cf.untracked(tree)
        if isinstance(tree, tuple):
            return tuple(self.shaped(t) for t in tree)
        return None

    def out_shape(self, node: fx.Node) -> tuple[int, ...] | None:
        tree = self.shapes.get(node)
        return tree if isinstance(tree, tuple) and all(isinstance(s, int) for s in tree) else None

    def tensor(self, path: str) -> Tensor | None:
        owner, _, name = path.rpartition(".")
        module = self.modules.get(owner)
        if module is None:
            return None
        found = module._parameters.get(name)
        return found if found is not None else module._buffers.get(name)

    def param_items(self, path: str, tensor: Tensor, *, every_axis: bool = False) -> dict[int, Tensor]:
        """Items of a parameter's or buffer's axes (one set per tensor, shared by every name it has)."""
        known = self._params.get(id(tensor))
        if known is None:
            known = (path, {})
            self._params[id(tensor)] = known
        first, axes = known
        for axis, size in enumerate(tensor.shape):
            if axis not in axes and (size > 1 or every_axis):
                axes[axis] = self.items.new(size)
                self.members[(first, axis)] = TensorMember(first, axis, axes[axis], "param")
        return axes

    def role(self, tensor: Tensor, axis: int, role: str) -> None:
        path = self._params[id(tensor)][0]
        if (path, axis) in self.members:
            self.members[(path, axis)].role = role

    def param_flow(self, path: str, tensor: Tensor) -> Flow:
        flow = Flow(tuple(tensor.shape))
        for axis, ids in self.param_items(path, tensor).items():
            flow.carry(axis, ids, True)
        return flow

    def unknown(self, node: fx.Node, label: str) -> Any:
        """An op the analysis does not follow: the channels it reads are blocked, its outputs untracked."""
        tree = self.shapes.get(node)
        if tree is None or (isinstance(tree, tuple) and not _has_tensor(tree)):
            return None
        cf.block_all(self.items, self.flows_in(node), Reason(HARD, f"they pass through {label}, which the analysis does not follow"))
        return self.shaped(tree)

    # nodes ------------------------------------------------------------------------------------

    def visit(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return self.shaped(self.shapes.get(node))
        if node.op == "get_attr":
            t = self.tensor(node.target)
            return self.param_flow(node.target, t) if isinstance(t, Tensor) else None
        if node.op == "output":
            cf.block_all(self.items, self.flows_in(node), Reason(HARD, "they reach the graph's output"))
            return None
        site = self.site_of.get(node)
        if site is not None:
            return self.site_call(node, site)
        if node.op == "call_module":
            return self.module_call(node, self.modules[node.target])
        return self.function_call(node)

    def site_call(self, node: fx.Node, site: Site) -> Flow:
        """A linear/conv/embedding: its rows are new items, its input channels meet its weight's columns."""
        weight = self.tensor(site.use_ref.path)
        raw = self.param_items(site.use_ref.path, weight, every_axis=True)
        out_axis, in_axis = (1, 0) if site.use_ref.transposed else (0, 1)
        self.role(weight, out_axis, "out")
        self.role(weight, in_axis, "in")
        rows = raw[out_axis]
        if site.use_ref.bias is not None:
            bias = self.tensor(site.use_ref.bias)
            self.items.union(rows, self.param_items(site.use_ref.bias, bias, every_axis=True)[0])
            self.role(bias, 0, "bias")
        shape = self.out_shape(node)
        out = Flow(shape)
        x = self.value(site.input)
        if site.layer == "embedding":
            if isinstance(x, Flow):
                for d, ids in x.ids.items():
                    out.carry(d, ids, x.zero[d])
            out.carry(len(shape) - 1, rows, True)
            return out
        spatial = len(site.shape) - 2 if site.is_conv else 0
        cdim = len(shape) - 1 - spatial
        if not isinstance(x, Flow) or x.rank != len(shape):
            return self.unknown(node, f"'{site.name}'")
        read = x.ids.get(cdim)
        if read is not None:
            nonzero = read[~x.zero[cdim]]
            if nonzero.numel():
                self.items.block(nonzero, Reason(HARD, f"'{site.name}' reads them while a removed channel would not be zero there (e.g. after a sigmoid)"))
        if site.groups == 1:
            if read is not None:
                self.items.union(read, raw[in_axis])
            elif x.shape[cdim] > 1:
                self.items.block(raw[in_axis], Reason(HARD, f"'{site.name}' also reads channels that are not traced (e.g. a graph input)"))
        else:
            if read is None:
                self.items.block(rows, Reason(HARD, f"'{site.name}' is a grouped conv whose input channels are not traced"))
            per, width = weight.shape[1], rows.numel() // site.groups
            for g in range(site.groups):
                unit = rows[g * width:(g + 1) * width]
                if read is not None and bool((read[g * per:(g + 1) * per] < 0).any()):
                    self.items.block(unit, Reason(HARD, f"'{site.name}' reads untraced channels in this conv group"))
                self.items.union_all(unit if read is None else torch.cat([read[g * per:(g + 1) * per], unit]))
        for d, ids in x.ids.items():
            if d < cdim:
                out.carry(d, ids, x.zero[d])
            elif d > cdim:
                self.items.block(ids, Reason(HARD, f"'{site.name}' mixes them with its kernel"))
        out.carry(cdim, rows, True)
        return out

    def module_call(self, node: fx.Node, module: nn.Module) -> Any:
        x = self.value(node.args[0]) if node.args else None
        shape = self.out_shape(node)
        label = f"'{node.target}' ({type(module).__name__})"
        if not isinstance(x, Flow) or shape is None:
            return self.unknown(node, label)
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
            return self.channel_norm(x, module, node.target, affine=module.affine)
        if isinstance(module, nn.LayerNorm):
            return self.layer_norm(node, x, len(module.normalized_shape), module.weight, module.bias, f"{node.target}.", label)
        if isinstance(module, nn.GroupNorm):
            return self.group_norm(node, x, module.num_groups, module.weight, module.bias, f"{node.target}.", label)
        if isinstance(module, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)):
            return cf.unary(x, True)
        if module.__module__.startswith("torch.nn.modules.activation") and not isinstance(module, (nn.MultiheadAttention, nn.PReLU)):
            if isinstance(module, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
                return cf.reduce(self.items, x, [module.dim if module.dim is not None else -1], True, "softmax", label)
            return cf.unary(x, keeps_zero_of((type(module), repr(module)), module))
        if isinstance(module, (nn.Flatten, nn.Unflatten)):
            return cf.reshape(self.items, x, shape, label)
        if SPATIAL.search(type(module).__name__.lower()):
            return self.spatial(x, shape, spatial_dims(type(module).__name__, x.rank), label)
        return self.unknown(node, label)

    # norms and spatial ops ---------------------------------------------------------------------

    def channel_norm(self, x: Flow, module: nn.Module | None, prefix: str, *, affine: bool, tensors: dict | None = None) -> Flow:
        """BatchNorm/InstanceNorm: per channel (dim 1); weight, bias and running statistics are members.
        A masked channel leaves it as zero when the affine weight and bias are zeroed with it."""
        out = Flow(x.shape)
        for d, ids in x.ids.items():
            out.carry(d, ids, torch.full(ids.shape, bool(affine)) if d == 1 else x.zero[d])
        found = tensors if tensors is not None else {k: getattr(module, k, None) for k in _NORM_ROLES}
        for name, t in found.items():
            if isinstance(t, Flow):
                if 0 in t.ids and 1 in x.ids:
                    self.items.union(x.ids[1], t.ids[0])
                continue
            if not isinstance(t, Tensor):
                continue
            path = self._params[id(t)][0] if id(t) in self._params else f"{prefix}.{name}"
            items = self.param_items(path, t, every_axis=True)[0]
            self.role(t, 0, _NORM_ROLES[name])
            if 1 in x.ids:
                self.items.union(x.ids[1], items)
        return out

    def layer_norm(self, node: fx.Node, x: Flow, count: int, weight, bias, prefix: str, label: str, literal: bool = False) -> Flow:
        """LayerNorm over the last `count` dims: normalising over channels is a NORM reason."""
        out = Flow(x.shape)
        first = x.rank - count
        for d, ids in x.ids.items():
            out.carry(d, ids, x.zero[d] if d < first else torch.full(ids.shape, weight is not None))
            if d >= first:
                self.items.block(ids, Reason(NORM, f"{label} normalises over them"))
                self.literals.append(Literal(node.target if node.op == "call_module" else node.name,
                                             "norm_shape" if literal else "module", d - first, ids, "normalized_shape"))
        for name, t in (("weight", weight), ("bias", bias)):
            if isinstance(t, Tensor):
                axes = self.param_items(f"{prefix}{name}", t, every_axis=True)
                for axis, items in axes.items():
                    self.role(t, axis, _NORM_ROLES[name])
                    if first + axis in x.ids:
                        self.items.union(x.ids[first + axis], items)
        return out

    def group_norm(self, node: fx.Node, x: Flow, groups: int, weight, bias, prefix: str, label: str) -> Flow:
        """GroupNorm over dim 1: one group per channel is per-channel; one group is a LayerNorm; else blocked."""
        channels = x.shape[1]
        if 1 in x.ids and groups != channels:
            kind = NORM if groups == 1 else HARD
            self.items.block(x.ids[1], Reason(kind, f"{label} normalises them in {groups} group(s)"))
        if 1 in x.ids and groups == channels:
            self.literals.append(Literal(node.target if node.op == "call_module" else node.name,
                                         "groups" if node.op != "call_module" else "module", 1, x.ids[1], "num_groups"))
        tensors = {"weight": weight, "bias": bias}
        return self.channel_norm(x, None, prefix.rstrip("."), affine=weight is not None, tensors=tensors)

    def spatial(self, x: Flow, shape: tuple[int, ...], nd: int, label: str, keeps_zero: bool = True) -> Flow:
        """Pooling, upsampling, padding: the last `nd` dims change; leading dims (channels) pass."""
        out = Flow(shape)
        for d, ids in x.ids.items():
            if d < x.rank - nd and x.shape[d] == shape[d]:
                out.carry(d, ids, x.zero[d] & keeps_zero)
            else:
                self.items.block(ids, Reason(HARD, f"{label} acts along them"))
        return out


def _has_tensor(tree: Any) -> bool:
    if isinstance(tree, tuple) and all(isinstance(s, int) for s in tree):
        return True
    return isinstance(tree, tuple) and any(_has_tensor(t) for t in tree)
