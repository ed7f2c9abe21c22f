"""The symbolic-tracing front end: a model as a GraphModule fxtune owns, with errors that say what to try."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from torch import fx, nn

from ..errors import TraceError
from ..graph.discovery import is_conv1d
from ..graph.ownership import build_graph_module, own_module_tree
from .explain import user_frames
from .library_rules import LibraryRules, library_rules, loaded_library_rules
from .optional_inputs import defaults_to_fix, explain_fixed
from .record import FRONTEND, TRACE_RECORD


class _Tracer(fx.Tracer):
    """symbolic tracing with user leaf modules, remembering which modules it was inside.

    Every argument has a default: unpickling a GraphModule rebuilds its tracer class with none, and
    then wraps what the loaded libraries register (saved code may call those functions).
    """

    def __init__(
        self, leaf_types: tuple[type, ...] = (), leaf_names: frozenset[str] = frozenset(), rules: LibraryRules | None = None
    ):
        rules = loaded_library_rules() if rules is None else rules
        super().__init__(autowrap_modules=rules.modules, autowrap_functions=rules.functions)
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self.inside: list[tuple[str, nn.Module]] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        if is_conv1d(m):  # transformers' transposed linear: a call site, like nn.Linear
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.inside.append((self.path_of_module(m) or type(m).__name__, m))
        result = super().call_module(m, forward, args, kwargs)
        self.inside.pop()
        return result


@dataclass
class _Failure:
    """One failed attempt: the tracer (where it stopped) and the exception."""

    tracer: _Tracer
    exc: Exception


def symbolic_trace(
    model: nn.Module,
    *,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    example_inputs: Any = None,
    example_kwargs: dict | None = None,
) -> fx.GraphModule:
    """`model` symbolically traced (fx.Tracer, with fxtune's leaf rules) into a GraphModule fxtune owns.

    If that stops and the model is built from timm or torchvision, it is traced again with what
    those libraries register for their own FX feature extraction: their wrapped functions, and
    each registered leaf module type tracing stopped inside (only those, so other layers stay
    module calls). Parameters with defaults are inputs only if the example inputs give them (see
    optional_inputs.py). `gm.meta["fxtune_trace"]` lists what was used and fixed.
    """
    leaf_types, leaf_names = split_leaf_modules(model, leaf_modules)
    nones = defaults_to_fix(model, concrete_args, example_inputs, example_kwargs, plain=False)
    plain = defaults_to_fix(model, concrete_args, example_inputs, example_kwargs, plain=True)
    settings = [nones] + ([plain] if plain != nones else [])
    for fixed in settings:
        found = _attempt(model, _Tracer(leaf_types, leaf_names, LibraryRules()), {**fixed, **(concrete_args or {})})
        if not isinstance(found, _Failure):
            return _finish(model, *found, fixed=fixed, record={})
    rules = library_rules(model)
    added: list[type] = []
    while rules:
        tracer = _Tracer(leaf_types + tuple(added), leaf_names, rules)
        retry = _attempt(model, tracer, {**fixed, **(concrete_args or {})})
        if not isinstance(retry, _Failure):
            leaves = [_qualname(t) for t in added]
            return _finish(model, *retry, fixed=fixed, record={"libraries": list(rules.libraries), "library_leaf_modules": leaves})
        found = retry
        leaf = _registered_leaf(found.tracer, rules, leaf_types + tuple(added))
        if leaf is None:
            break
        added.append(leaf)
    raise TraceError(_explain(model, found.tracer, found.exc, rules.libraries))


def split_leaf_modules(model: nn.Module, leaf_modules: Iterable[type | str]) -> tuple[tuple[type, ...], frozenset[str]]:
    """`leaf_modules` as (types, dotted names), checked: every name is a module of the model."""
    leaf_modules = tuple(leaf_modules)
    wrong = [x for x in leaf_modules if not isinstance(x, (type, str))]
    if wrong:
        raise TraceError(f"leaf_modules takes module types or dotted module names, got {wrong!r}")
    leaf_names = frozenset(x for x in leaf_modules if isinstance(x, str))
    unknown = sorted(n for n in leaf_names if n not in dict(model.named_modules()))
    if unknown:
        raise TraceError(f"leaf_modules names no module of the model: {unknown}")
    return tuple(x for x in leaf_modules if isinstance(x, type)), leaf_names


def _attempt(model: nn.Module, tracer: _Tracer, concrete_args: dict[str, Any] | None) -> tuple | _Failure:
    """(owned tree, graph) of one tracing attempt on a fresh owned tree, or where it failed."""
    owned = own_module_tree(model, freeze=True)
    try:
        return owned, tracer.trace(owned, concrete_args=concrete_args)
    except Exception as exc:  # the tracer raises many types; all mean "cannot trace here"
        return _Failure(tracer, exc)


def _finish(model: nn.Module, owned: nn.Module, graph: fx.Graph, *, fixed: dict, record: dict) -> fx.GraphModule:
    explain_fixed(graph, fixed)
    name = type(model).__name__
    gm = build_graph_module(owned, graph, class_name=name if name.isidentifier() else "GraphModule")
    gm.meta[FRONTEND] = "fx"
    gm.meta[TRACE_RECORD] = {"frontend": "fx", **({"fixed_inputs": fixed} if fixed else {}), **record}
    return gm


def _registered_leaf(tracer: _Tracer, rules: LibraryRules, already: tuple[type, ...]) -> type | None:
    """The innermost module tracing stopped inside whose type a library registers as a leaf (and is not one yet)."""
    for _, module in reversed(tracer.inside):
        cls = type(module)
        if cls in rules.leaf_types and cls not in already:
            return cls
    return None


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _explain(model: nn.Module, tracer: _Tracer, exc: Exception, libraries: tuple[str, ...] = ()) -> str:
    """Names the module and source line where tracing failed, and what to try."""
    where, module = tracer.inside[-1] if tracer.inside else ("<top level>", model)
    frames = user_frames(exc.__traceback__)
    line = str(frames[-1]) if frames else "unknown line"
    leaf = f"leaf_modules=[{type(module).__name__}]" if tracer.inside else "leaf_modules=[...]"
    tried = f" (also with the FX feature-extraction registrations of {' and '.join(libraries)})" if libraries else ""
    return (
        f"could not trace module '{where}' ({type(module).__name__}) at {line}{tried}\n"
        f"  {type(exc).__name__}: {exc}\n"
        f"Try: fxtune.trace(model, {leaf}) to keep that module opaque (its weights stay call sites, "
        "adapted through the module), or concrete_args={...} to fix the input that drives Python control flow, "
        "or rewrite that line without data-dependent control flow. Or trace with torch.export: "
        "fxtune.trace(model, example_inputs=(...)) falls back to it, frontend='export' uses it directly; it "
        "follows control flow on shapes and settings (Hugging Face models need it)."
    )
