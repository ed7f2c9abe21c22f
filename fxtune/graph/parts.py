"""Models traced in parts: a model fxtune owns whose listed submodules are GraphModules.

`fxtune.trace(model, parts=["backbone", "rpn.head"])` gives such a model when the whole does not
trace (a detector's box filtering). Each part is an ordinary fxtune GraphModule whose sites are
named by their path in the whole model (`gm.meta["fxtune_part"]`), so a selection, an adapter file
or a summary means the same sites as on the model. `each_part(fn)` makes a function of a
GraphModule (a pass, a lifecycle function) work on such a model: it runs on every part and the
parts it returns are put into a new copy of the model, never the one it was given.
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Any, Callable, Iterable

from torch import fx, nn

from ..errors import SelectionError
from .ownership import RECORD_PREFIX, clone_graph_module, own_module_tree, replace_submodule
from .discovery import site_table
from .selection import choose, listing

PARTS = RECORD_PREFIX + "parts"  # on the model: the paths of its GraphModule parts, in order


def is_parted(module: Any) -> bool:
    """Whether `module` is a model fxtune traced in parts."""
    return isinstance(module, nn.Module) and not isinstance(module, fx.GraphModule) and bool(module.__dict__.get(PARTS))


def parts_of(model: nn.Module) -> list[tuple[str, fx.GraphModule]]:
    """(path, GraphModule) of every part, in the order they were listed."""
    return [(path, model.get_submodule(path)) for path in model.__dict__[PARTS]]


def graphs_of(model: nn.Module) -> list[fx.GraphModule]:
    """The GraphModules a model consists of: its parts if it was traced in parts, else itself."""
    return [part for _, part in parts_of(model)] if is_parted(model) else [model]


def with_parts(model: nn.Module, new_parts: dict[str, fx.GraphModule]) -> nn.Module:
    """A new copy of the parted `model` (modules its own, base parameters shared read-only) holding
    `new_parts`, and a clone of each part not among them (its adapters copied, trainable as they were)."""
    copy = own_module_tree(model, freeze=True, copy_prefix=None)
    for path, part in parts_of(model):
        replace_submodule(copy, path, new_parts[path] if path in new_parts else clone_graph_module(part))
    copy.__dict__[PARTS] = model.__dict__[PARTS]
    return copy


def _is_names(selector: Any) -> bool:
    return selector is not None and not isinstance(selector, (str, re.Pattern, type)) and not callable(selector)


def _restricted(selector: Any, names: set[str]) -> Any:
    """A name list cut to the names a part has (other selectors apply to every part as they are)."""
    return [n for n in selector if n in names] if _is_names(selector) else selector


def _selection_plan(model: nn.Module, targets: Any, exclude: Any) -> dict[str, tuple[Any, Any, list]]:
    """{part path: (targets, exclude, chosen sites) for that part} for the parts the selection reaches (sites
    found once per part); errors as `sites` gives them."""
    targets = list(targets) if _is_names(targets) else targets
    exclude = list(exclude) if _is_names(exclude) else exclude
    tables = {path: site_table(part) for path, part in parts_of(model)}
    names = {path: {s.name for s in table} for path, table in tables.items()}
    every = set().union(*names.values())
    for role, selector in (("targets", targets), ("exclude", exclude)):
        unknown = sorted(n for n in selector if n not in every) if _is_names(selector) else []
        if unknown:
            raise SelectionError(f"{role} names no site of any part: {unknown}. Available sites: {listing(sorted(every))}")
    plan = {}
    for path in tables:
        part_targets, part_exclude = _restricted(targets, names[path]), _restricted(exclude, names[path])
        if _is_names(targets) and not part_targets:
            continue
        try:
            chosen = choose(tables[path], part_targets, exclude=part_exclude)
        except SelectionError:
            continue  # this part has none of the chosen sites
        plan[path] = (part_targets, part_exclude, chosen)
    if not plan:
        raise SelectionError(f"targets={targets!r} exclude={exclude!r} selects no site in any part of the model. "
                             f"Available sites: {listing(sorted(every))}")
    return plan


def each_part(fn: Callable) -> Callable:
    """`fn(gm, ...)` that also takes a model traced in parts: on every part its selection (`targets=`,
    `exclude=`) reaches, the others kept as they are; returns a new model. A GraphModule goes to `fn` as is."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn
    takes_targets = "targets" in signature.parameters

    @functools.wraps(fn)
    def run(gm: Any, *args: Any, **kwargs: Any) -> Any:
        if not is_parted(gm):
            return fn(gm, *args, **kwargs)
        bound = signature.bind(gm, *args, **kwargs)
        if not takes_targets:
            return with_parts(gm, {path: fn(part, *args, **kwargs) for path, part in parts_of(gm)})
        plan = _selection_plan(gm, bound.arguments.get("targets"), bound.arguments.get("exclude"))
        done = {}
        for path, part in parts_of(gm):
            if path in plan:
                bound.arguments["gm" if "gm" in bound.arguments else next(iter(bound.arguments))] = part
                bound.arguments["targets"] = plan[path][0]
                if "exclude" in signature.parameters:
                    bound.arguments["exclude"] = plan[path][1]
                done[path] = fn(*bound.args, **bound.kwargs)
        return with_parts(gm, done)

    run.__wrapped_for_parts__ = fn
    return run


def gathered(model: nn.Module, fn: Callable[[fx.GraphModule], Iterable]) -> list:
    """fn(graph) of every graph of the model (its parts, or itself), concatenated (sites, summary rows...)."""
    out: list = []
    for graph in graphs_of(model):
        out.extend(fn(graph))
    return out


def parted_sites(model: nn.Module, targets: Any = None, *, exclude: Any = None) -> list:
    """`fxtune.sites` of a model traced in parts: the chosen sites of every part, named as in the model."""
    plan = _selection_plan(model, targets, exclude)
    return [site for path in plan for site in plan[path][2]]
