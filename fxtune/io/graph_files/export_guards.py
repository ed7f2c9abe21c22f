"""torch.export's input check (`_guards_fn`) as a small graph, so it can be saved and pickled as data.

torch.export builds that check as Python source (`torch._assert(args[0].size()[1] == 7, ...)`)
and runs it through `exec`; such a function has no importable name, so neither a graph file
nor pickle can hold it. Run once on fx proxies, the same checks become an ordinary graph
(size, getitem, comparisons, torch._assert), which is what is stored instead.
"""

from __future__ import annotations

import types

from torch import fx, nn

from .values import GraphFileError


def is_guards(module: nn.Module) -> bool:
    """Whether `module` is torch.export's generated input check (not yet a graph)."""
    cls = type(module)
    return cls.__name__ == "GuardsFn" and cls.__module__.startswith("torch.export") and not isinstance(module, fx.GraphModule)


def _checks(module: nn.Module) -> types.FunctionType | None:
    """The generated checking function behind the module's forward (it may be wrapped for dynamo)."""
    forward = module.__dict__.get("forward")
    seen = [forward]
    while seen:
        fn = seen.pop()
        if isinstance(fn, types.FunctionType):
            if fn.__code__.co_name == "_" and fn.__code__.co_flags & 0x04:  # def _(*args)
                return fn
            seen.extend(c.cell_contents for c in fn.__closure__ or () if isinstance(c.cell_contents, types.FunctionType))
    return None


def guards_as_graph(module: nn.Module, num_inputs: int, where: str) -> fx.GraphModule:
    """A GraphModule called like `module` (with `num_inputs` positional inputs) that makes the same checks."""
    from ...graph.ownership import build_graph_module

    fn = _checks(module)
    if fn is None:
        raise GraphFileError(
            f"{where}: torch.export's input check '_guards_fn' is generated Python code that this fxtune cannot read "
            "as a graph, so it cannot be stored; re-trace the model after loading instead"
        )
    tracer = fx.Tracer()
    tracer.graph = fx.Graph()
    tracer.root = nn.Module()
    tracer.tensor_attrs = {}
    inputs = [tracer.create_proxy("placeholder", f"args_{i}", (), {}) for i in range(num_inputs)]
    try:
        fn(*inputs)
    except Exception as exc:  # a check that needs Python control flow on values
        raise GraphFileError(f"{where}: torch.export's input check '_guards_fn' cannot be written as a graph ({exc})") from exc
    tracer.graph.output(None)
    graph_module = build_graph_module(nn.Module(), tracer.graph, class_name="GuardsFn")
    graph_module._is_impure = True  # called for its checks only: dead-code elimination must keep the call
    return graph_module


def guard_inputs(graph: fx.Graph, path: str) -> int:
    """How many inputs the graph passes to the module at `path` (the most any call of it passes)."""
    return max((len(n.args) for n in graph.nodes if n.op == "call_module" and n.target == path), default=0)
