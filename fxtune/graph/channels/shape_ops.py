"""Channel rules for shape ops: views, permutes, repeats, concatenation, splits, slices, indexing, sizes.

Mixed into the analysis next to `OpRules`. Literal sizes that count channels are recorded so
that pruning can rewrite them; sizes the graph computes from channel counts become constants.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from . import flow as cf
from .flow import Flow
from .items import HARD, Dyn, Literal, Reason
from .names import SIZED, arg, sizes_arg


class ShapeRules:
    """Mixed into Analysis: how shape ops move channel items between dims."""

    def size_of(self, node: fx.Node, x: Any) -> Any:
        """x.size(d) / x.shape / sym_size: numbers that follow channels if their dim carries items."""
        if not isinstance(x, Flow):
            return None

        def one(d: int) -> Dyn:
            return Dyn([x.ids[d]] if d in x.ids else [])

        dim = arg(node, 1, "dim") if node.args[1:2] != ("shape",) else None
        return one(dim % x.rank) if isinstance(dim, int) else tuple(one(d) for d in range(x.rank))

    def sizes_read(self, node: fx.Node) -> Dyn | None:
        """The channel sizes a node's arguments are computed from (None if it reads no computed size)."""
        found: list[Dyn] = []
        fx.node.map_aggregate((node.args, node.kwargs), lambda a: found.append(self.env.get(a)) if isinstance(a, fx.Node) and isinstance(self.env.get(a), Dyn) else None)
        if not found:
            return None
        return Dyn([ids for d in found for ids in d.ids])

    def record_sizes(self, node: fx.Node, name: str, out: Flow, start: int | None) -> None:
        """Literal sizes of a view/reshape/expand/unflatten that count channels (edited when channels go);
        sizes computed from channel counts elsewhere become constants (channel dims are static)."""
        if name not in SIZED and name != "unflatten":
            return
        for d, ids in out.ids.items():
            self.literals.append(Literal(node.name, "sizes" if name != "unflatten" else "unflatten", d, ids, start))
        if name == "unflatten":
            return
        sizes, _ = sizes_arg(node)
        for d, entry in enumerate(sizes):
            value = self.env.get(entry) if isinstance(entry, fx.Node) else None
            if isinstance(value, Dyn) and value.ids and d not in out.ids:
                self.constant_sizes.append((node.name, d, out.shape[d]))

    def permutation(self, node: fx.Node, name: str, rank: int) -> list[int]:
        if name in ("t", "numpy_T") or (name == "mT"):
            order = list(range(rank))
            if rank >= 2:
                order[-1], order[-2] = order[-2], order[-1]
            return order
        if name == "permute":
            dims, _ = sizes_arg(node)
            return [d % rank for d in dims]
        a, b = arg(node, 1, "dim0"), arg(node, 2, "dim1")
        order = list(range(rank))
        order[a % rank], order[b % rank] = order[b % rank], order[a % rank]
        return order

    def repeat(self, node: fx.Node, x: Flow, shape, label: str) -> Flow:
        counts, _ = sizes_arg(node)
        out, shift = Flow(shape), len(shape) - x.rank
        for d, ids in x.ids.items():
            times = counts[d + shift]
            out.carry(d + shift, ids.repeat(times), x.zero[d].repeat(times))
        return out

    def concat(self, node: fx.Node, name: str, shape, label: str) -> Flow:
        flows = [self.value(a) for a in node.args[0]]
        dim = arg(node, 1, "dim", 0)
        if not all(isinstance(f, Flow) for f in flows):
            return self.unknown(node, label)
        if name == "stack":
            dim = dim % len(shape)
            flows = [cf.reshape(self.items, f, f.shape[:dim] + (1,) + f.shape[dim:], label) for f in flows]
        return cf.cat(self.items, flows, dim % len(shape), shape, label)

    def split_call(self, node: fx.Node, name: str, x: Flow, label: str) -> Any:
        tree = self.shapes[node]
        dim = arg(node, 2, "dim", 0) % x.rank
        sizes = [s[dim] for s in tree]
        if dim in x.ids:
            self.literals.append(Literal(node.name, "split", dim, x.ids[dim], sizes))
        if name == "tensor_split" and dim in x.ids:
            return self.unknown(node, label)
        return tuple(cf.split(x, dim, sizes))

    def slice_call(self, node: fx.Node, name: str, x: Flow, label: str) -> Flow:
        dim = arg(node, 1, "dim", 0) % x.rank
        size = x.shape[dim]
        if name == "select":
            index = arg(node, 2, "index")
            if dim in x.ids:
                self.items.block(x.ids[dim], Reason(HARD, f"{label} reads one channel by its index"))
            out = cf.narrow(self.items, x, dim, index % size, index % size + 1, 1, label)
            return cf.reshape(self.items, out, self.out_shape(node), label)
        if name == "narrow":
            start, length = arg(node, 2, "start"), arg(node, 3, "length")
            stop, step = start + length, 1
        else:
            start, stop, step = arg(node, 2, "start"), arg(node, 3, "end"), arg(node, 4, "step", 1)
        if not all(v is None or isinstance(v, int) for v in (start, stop, step)):
            if dim in x.ids:
                return self.unknown(node, label)
            return Flow(self.out_shape(node), dict(x.ids), dict(x.zero))
        start, stop, _ = slice(start, stop, step).indices(size)
        if dim in x.ids:
            self.literals.append(Literal(node.name, "slice", dim, x.ids[dim], (name, start, stop)))
        return cf.narrow(self.items, x, dim, start, stop, step or 1, label)

    def getitem(self, node: fx.Node, x: Any, label: str) -> Any:
        index = node.args[1]
        if not isinstance(x, Flow):
            if isinstance(x, (tuple, list)) and isinstance(index, int):
                return x[index]
            if isinstance(x, (tuple, list)) and isinstance(index, slice):
                return tuple(x[index])
            return self.unknown(node, label) if x is not None else None
        return self.index_flow(node, x, index, label)

    def index_flow(self, node: fx.Node, x: Flow, index: Any, label: str) -> Any:
        """Basic indexing (ints, slices, None, Ellipsis) of a tensor; anything else is not followed."""
        parts = list(index) if isinstance(index, tuple) else [index]
        if any(not (p is None or p is Ellipsis or isinstance(p, (int, slice))) for p in parts):
            return self.unknown(node, label)
        if any(isinstance(p, slice) and not all(v is None or isinstance(v, int) for v in (p.start, p.stop, p.step)) for p in parts):
            return self.unknown(node, label)
        used = sum(1 for p in parts if p is not None and p is not Ellipsis)
        if Ellipsis in parts:
            e = parts.index(Ellipsis)
            parts = parts[:e] + [slice(None)] * (x.rank - used) + parts[e + 1:]
        parts += [slice(None)] * (x.rank - sum(1 for p in parts if p is not None))
        flow, d = x, 0
        for position, p in enumerate(parts):
            if p is None:
                continue
            if isinstance(p, int):
                if d in flow.ids:
                    self.items.block(flow.ids[d], Reason(HARD, f"{label} reads one channel by its index"))
                flow = cf.narrow(self.items, flow, d, p % flow.shape[d], p % flow.shape[d] + 1, 1, label)
            else:
                start, stop, step = p.indices(flow.shape[d])
                if d in flow.ids and (start, stop, step) != (0, flow.shape[d], 1):
                    self.literals.append(Literal(node.name, "slice", d, flow.ids[d], ("getitem", start, stop, position, tuple(parts))))
                flow = cf.narrow(self.items, flow, d, start, stop, step, label)
            d += 1
        return cf.reshape(self.items, flow, self.out_shape(node), label)
