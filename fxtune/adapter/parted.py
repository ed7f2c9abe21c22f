"""Lifecycle functions on a model traced in parts: each part gets the named adapters it has.

`fxtune.set_active(parted, "a")` makes "a" the only active adapter in every part (a part without
it runs its base); `merge`, `delete_adapter` and `fuse(adapters=...)` act on the parts that hold
the named adapters. A name no part has is an AdapterError, as on a GraphModule.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Iterable

from ..errors import AdapterError
from ..graph.parts import is_parted, parts_of, with_parts
from .lifecycle import AdapterInfo, AdapterList, adapters
from .slots import adapter_names


def _named(names: str | Iterable[str]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


def by_adapter(fn: Callable, *, absent: str) -> Callable:
    """`fn(gm, names, ...)` (its second parameter names adapters, if it has one) that also takes a parted
    model. A part holding none of the named adapters is left as it is (absent="keep") or given []
    (absent="empty": e.g. only the named adapters act, so none there); without names, every part with
    adapters. A GraphModule goes to `fn` as is."""
    params = list(inspect.signature(fn).parameters)
    names_param = params[1] if len(params) > 1 else None

    @functools.wraps(fn)
    def run(gm: Any, *args: Any, **kwargs: Any) -> Any:
        if not is_parted(gm):
            return fn(gm, *args, **kwargs)
        names = args[0] if args else kwargs.get(names_param)
        if names is not None and not isinstance(names, str):
            names = list(names)  # read once: a generator would be spent by the first part
        rest = {k: v for k, v in kwargs.items() if k != names_param}
        held = {path: adapter_names(part) for path, part in parts_of(gm)}
        every = sorted(set().union(*held.values()))
        if names is not None:
            unknown = sorted(set(_named(names)) - set(every))
            if unknown:
                raise AdapterError(f"no adapter named {unknown} in any part; the parts have {every or 'none'}")
        done = {}
        for path, part in parts_of(gm):
            if names is None:
                if held[path]:
                    done[path] = fn(part, *args[1:], **rest) if names_param is None else fn(part, None, *args[1:], **rest)
                continue
            mine = [n for n in _named(names) if n in held[path]]
            if mine or absent == "empty":
                done[path] = fn(part, mine[0] if isinstance(names, str) and mine else mine, *args[1:], **rest)
        return with_parts(gm, done)

    run.handles_parts = True
    return run


def parted_adapters(gm: Any) -> AdapterList:
    """`fxtune.adapters` of a model (parted or not): one row per adapter, its sites over every part."""
    if not is_parted(gm):
        return adapters(gm)
    rows: dict[str, list[AdapterInfo]] = {}
    for _, part in parts_of(gm):
        for info in adapters(part):
            rows.setdefault(info.name, []).append(info)
    return AdapterList(
        AdapterInfo(
            name=name, kind="+".join(sorted({k for i in infos for k in i.kind.split("+")})),
            sites=tuple(s for i in infos for s in i.sites), parameters=sum(i.parameters for i in infos),
            active=all(i.active for i in infos), merged=all(i.merged for i in infos),
        )
        for name, infos in rows.items()
    )
