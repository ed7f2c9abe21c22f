"""The symbolic-tracing front end: a model as a GraphModule fxtune owns, with errors that say what to try."""

from __future__ import annotations

from typing import Any, Iterable

from torch import fx, nn

from ..errors import TraceError
from ..graph.discovery import is_conv1d
from ..graph.ownership import build_graph_module, own_module_tree
from .explain import user_frames


class _Tracer(fx.Tracer):
    """symbolic tracing with user leaf modules, remembering which module it was inside.

    Its arguments have defaults: fx re-creates a graph's tracer class with no arguments (e.g.
    when a plain GraphModule holding this graph is unpickled).
    """

    def __init__(self, leaf_types: tuple[type, ...] = (), leaf_names: frozenset[str] = frozenset()):
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self.inside: list[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        if is_conv1d(m):  # transformers' transposed linear: a call site, like nn.Linear
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.inside.append(self.path_of_module(m) or type(m).__name__)
        result = super().call_module(m, forward, args, kwargs)
        self.inside.pop()
        return result


def symbolic_trace(
    model: nn.Module, *, leaf_modules: Iterable[type | str] = (), concrete_args: dict[str, Any] | None = None
) -> fx.GraphModule:
    """`model` symbolically traced (fx.Tracer, with fxtune's leaf rules) into a GraphModule fxtune owns."""
    leaf_modules = tuple(leaf_modules)
    leaf_types = tuple(x for x in leaf_modules if isinstance(x, type))
    leaf_names = frozenset(x for x in leaf_modules if isinstance(x, str))
    unknown = sorted(n for n in leaf_names if n not in dict(model.named_modules()))
    if unknown:
        raise TraceError(f"leaf_modules names no module of the model: {unknown}")
    owned = own_module_tree(model, freeze=True)
    tracer = _Tracer(leaf_types, leaf_names)
    try:
        graph = tracer.trace(owned, concrete_args=concrete_args)
    except Exception as exc:  # the tracer raises many types; all mean "cannot trace here"
        raise TraceError(_explain(model, tracer, exc)) from exc
    name = type(model).__name__
    return build_graph_module(owned, graph, class_name=name if name.isidentifier() else "GraphModule")


def _explain(model: nn.Module, tracer: _Tracer, exc: Exception) -> str:
    """Names the module and source line where tracing failed, and what to try."""
    where = tracer.inside[-1] if tracer.inside else "<top level>"
    module = dict(model.named_modules()).get(where, model)
    frames = user_frames(exc.__traceback__)
    line = str(frames[-1]) if frames else "unknown line"
    leaf = f"leaf_modules=[{type(module).__name__}]" if tracer.inside else "leaf_modules=[...]"
    return (
        f"could not trace module '{where}' ({type(module).__name__}) at {line}\n"
        f"  {type(exc).__name__}: {exc}\n"
        f"Try: fxtune.trace(model, {leaf}) to keep that module opaque (its weights then are not "
        "call sites), or concrete_args={...} to fix the input that drives Python control flow, "
        "or rewrite that line without data-dependent control flow. Or trace with torch.export: "
        "fxtune.trace(model, frontend='export', example_inputs=(...)) follows control flow on shapes "
        "and settings (Hugging Face models need it)."
    )
