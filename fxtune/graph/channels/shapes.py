"""Static shapes of every value in a graph, which the channel analysis needs (what a view splits, what broadcasts).

torch.export graphs carry them (`node.meta["val"]`, sizes that stayed dynamic are symbols); graphs
that went through ShapeProp carry `meta["tensor_meta"]`; a symbolic trace has none, so its graph is
run once on fake copies of the example inputs (no arithmetic, no weights touched). Symbolic sizes
become distinct large primes, so products of sizes still compare correctly and never equal a
channel count.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ..ownership import clone_graph_module
from ...errors import StructureError

_PRIMES = (1000003, 1000033, 1000037, 1000039, 1000081, 1000099, 1000117, 1000121, 1000133, 1000151)


class _Sizes:
    """Turns symbolic sizes into stable integers (one prime per free symbol)."""

    def __init__(self):
        self.symbols: dict[Any, int] = {}

    def size(self, s: Any) -> int:
        if isinstance(s, int):
            return s
        expr = getattr(getattr(s, "node", None), "expr", None)
        if expr is None:
            return int(s)
        if expr.is_number:
            return int(expr)
        values = {}
        for symbol in sorted(expr.free_symbols, key=str):
            if symbol not in self.symbols:
                self.symbols[symbol] = _PRIMES[len(self.symbols) % len(_PRIMES)] + 2 * (len(self.symbols) // len(_PRIMES))
            values[symbol] = self.symbols[symbol]
        return int(expr.subs(values))

    def tree(self, value: Any) -> Any:
        """A tensor's shape as a tuple of ints, tuples/lists element-wise, anything else None."""
        if isinstance(value, torch.Tensor):
            return tuple(self.size(s) for s in value.shape)
        if isinstance(value, (tuple, list)):
            return tuple(self.tree(v) for v in value)
        return None


def _from_meta(gm: fx.GraphModule, sizes: _Sizes) -> dict[fx.Node, Any] | None:
    found = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        if "val" in node.meta:
            found[node] = sizes.tree(node.meta["val"])
        elif "tensor_meta" in node.meta:
            found[node] = _tensor_meta(node.meta["tensor_meta"])
        elif node.users:  # a node nothing reads (torch.export's _guards_fn) needs no shape
            return None
        else:
            found[node] = None
    return found


def _tensor_meta(meta: Any) -> Any:
    if hasattr(meta, "shape"):
        return tuple(int(s) for s in meta.shape)
    if isinstance(meta, (tuple, list)):
        return tuple(_tensor_meta(m) for m in meta)
    if isinstance(meta, dict):
        return None
    return None


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, sizes: _Sizes):
        super().__init__(gm)
        self.sizes = sizes
        self.found: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.found[n.name] = self.sizes.tree(result)
        return result


def _copy_on(gm: fx.GraphModule, convert) -> fx.GraphModule:
    """A copy of `gm` whose parameters and buffers are `convert`ed (the GraphModule's own are not touched)."""
    copy = clone_graph_module(gm, freeze=False)
    for module in copy.modules():
        for store in (module._parameters, module._buffers):
            for name, t in list(store.items()):
                if t is not None:
                    new = convert(t.detach())
                    store[name] = nn.Parameter(new, requires_grad=False) if isinstance(t, nn.Parameter) else new
    return copy


def _record(gm: fx.GraphModule, example_inputs: tuple, sizes: _Sizes) -> dict[str, Any]:
    """Runs gm once on meta tensors (fast), or on fake tensors where an op needs real devices (factories)."""
    try:
        recorder = _Recorder(_copy_on(gm, lambda t: torch.empty_like(t, device="meta")), sizes)
        recorder.run(*[x.to("meta") if isinstance(x, torch.Tensor) else x for x in example_inputs])
        return recorder.found
    except Exception:  # an op mixed devices or needs values: fake tensors behave like the real ones
        pass
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    recorder = _Recorder(_copy_on(gm, mode.from_tensor), sizes)
    with mode:
        recorder.run(*[mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs])
    return recorder.found


def value_shapes(gm: fx.GraphModule, example_inputs: Any = None) -> dict[fx.Node, Any]:
    """{node: shape tree} for every node of gm (tensor shapes as int tuples; non-tensors None)."""
    sizes = _Sizes()
    if example_inputs is None:
        found = _from_meta(gm, sizes)
        if found is not None:
            return found
        raise StructureError(
            "the channel analysis needs the shapes of the graph's values, and this graph has none recorded "
            "(fxtune.trace with the default front end records none); pass example_inputs=(x,) with tensors "
            "shaped like real inputs (only their shapes are used: the graph runs on fake tensors), or trace "
            "with frontend='export'"
        )
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    try:
        found = _record(gm, tuple(example_inputs), sizes)
    except Exception as exc:  # any op may refuse the inputs; say which and what to pass
        raise StructureError(
            f"running the graph on fake copies of example_inputs failed ({type(exc).__name__}: {exc}); pass "
            "inputs the model accepts (shapes and dtypes as in real use)"
        ) from exc
    by_name = {n.name: n for n in gm.graph.nodes}
    return {by_name[name]: shape for name, shape in found.items() if name in by_name}
