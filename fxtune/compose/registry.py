"""The public registry of passes: what a Strategy file, a Pipeline report and the command line can name.

fxtune's own passes register when `fxtune.passes` is imported (looked up lazily here, so the core
never imports it when it is imported); a user's pass registers with `fxtune.register_pass`, after
which `{"pass": "my_pass"}` in a strategy JSON and `--pass my_pass:...` on the command line work.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Callable

from ..errors import FxtuneError
from ..graph.parts import each_part

_PASSES: dict[str, Callable] = {}
_BUILTIN = "fxtune.passes"


def register_pass(fn: Callable | None = None, name: str | None = None, *, replace: bool = False, parts: str = "each"):
    """Makes `fn` (a function taking a GraphModule first) nameable as `name` (default: its __name__), and
    usable on models traced in parts (`fxtune.trace(model, parts=[...])`).

    Usable as `register_pass(fn)`, `@register_pass` or `@register_pass(name="...")`. A name taken by
    another function is an FxtuneError unless replace=True. Returns the function to use: `fn` itself
    for GraphModules; on a parted model it runs on every part its `targets=`/`exclude=` reach
    (parts="each"), or gets the model whole (parts="whole": it handles parts itself, e.g. by calling
    fxtune's own functions).
    """
    if fn is None:
        return lambda f: register_pass(f, name, replace=replace, parts=parts)
    if parts not in ("each", "whole"):
        raise FxtuneError(f"parts= must be 'each' or 'whole', got {parts!r}")
    if not callable(fn):
        raise FxtuneError(f"register_pass expects a function GraphModule -> GraphModule, got {type(fn).__name__}")
    name = name or getattr(fn, "__name__", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise FxtuneError(f"a pass needs an identifier as its name (name='my_pass'), got {name!r}")
    old = _PASSES.get(name)
    if old is not None and _original(old) is not fn and not replace and _origin(old) != _origin(fn):
        raise FxtuneError(f"pass name '{name}' is taken by {_origin(old)}; choose another name, or pass replace=True")
    usable = fn if parts == "whole" or getattr(fn, "handles_parts", False) else each_part(fn)
    _PASSES[name] = usable
    return usable


def _original(fn: Callable) -> Callable:
    return getattr(fn, "__wrapped_for_parts__", fn)


def _origin(fn: Callable) -> str:
    fn = _original(fn)
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _load_builtin() -> None:
    importlib.import_module(_BUILTIN)


def pass_names() -> list[str]:
    """Every registered pass name (fxtune's own and the user's), sorted."""
    _load_builtin()
    return sorted(_PASSES)


def get_pass(name: str) -> Callable:
    """The pass registered as `name`; an FxtuneError listing the names otherwise."""
    if name not in _PASSES:
        _load_builtin()
    if not isinstance(name, str) or name not in _PASSES:
        raise FxtuneError(f"unknown pass {name!r}; available: {', '.join(pass_names())} "
                          "(register your own with fxtune.register_pass)")
    return _PASSES[name]


def name_of(fn: Callable) -> str | None:
    """The registered name of a pass function, or None."""
    _load_builtin()
    return next((name for name, f in _PASSES.items() if f is fn or _original(f) is fn), None)


def pass_label(step: Callable) -> str:
    """How a report names a step: `lora(targets='layer4.*', r=4)` for a partial of a pass."""
    if isinstance(step, functools.partial):
        options = ", ".join(f"{k}={v!r}" for k, v in step.keywords.items())
        return f"{pass_label(step.func)}({options})"
    return getattr(step, "__name__", type(step).__name__)


def pass_options(fn: Callable) -> list[str]:
    """The option names a pass takes (its parameters after the GraphModule)."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
