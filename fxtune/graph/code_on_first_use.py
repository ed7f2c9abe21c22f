"""GraphModules whose Python code is generated when first used, not when a pass finishes.

A pass's output is often only the next pass's input (`fuse(ia3(lora(trace(model))))`); there its
code would be generated and compiled for nothing, the largest part of a pass's time. fxtune's
GraphModules generate it on first use instead: a call, `gm.code`, `gm.forward`, `print(gm)`,
pickling. torch's own `_LazyGraphModule` does the same for Inductor, as a private subclass; here
it is done on the GraphModule's own class (fx makes one per instance), so its type stays as it was.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import fx
from torch.fx.graph import _PyTreeCodeGen

# what GraphModule.recompile sets on the instance, read only once code exists
_GENERATED = ("_code", "_lineno_map", "_prologue_start")


class _OnFirstUse:
    """Stands on the class for an attribute `recompile` sets: reading it generates the code (once;
    `recompile` then replaces `forward` on the class and sets the others on the instance)."""

    def __init__(self, name: str, gm: fx.GraphModule):
        self.name = name
        self.gm = weakref.ref(gm)  # fx makes a class per GraphModule: read on the class, this is its instance

    def __get__(self, gm: fx.GraphModule | None, owner: type | None = None) -> Any:
        if gm is None:  # read on the class (fx's tracer, inspect): the real forward, with its signature
            gm = self.gm()
            if gm is None or self.name != "forward":
                return _forward_on_first_use if self.name == "forward" else self
            gm.recompile()
            return getattr(owner, self.name)
        gm.recompile()
        return getattr(gm, self.name)


def _forward_on_first_use(self: fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
    """`forward` as read on the class before the code exists: generates it, then runs it."""
    self.recompile()
    return self.forward(*args, **kwargs)


def generate_code_on_first_use(gm: fx.GraphModule) -> fx.GraphModule:
    """Marks gm's code as out of date: it is generated from gm.graph when next used (see module doc).
    Equivalent to `gm.recompile()` for everything a user can observe, except when the work is done."""
    codegen = gm.graph._codegen
    if isinstance(codegen, _PyTreeCodeGen):  # read by code that inspects input/output structure
        gm._in_spec = codegen.pytree_info.in_spec
        gm._out_spec = codegen.pytree_info.out_spec
    for name in _GENERATED:
        gm.__dict__.pop(name, None)
    cls = type(gm)
    for name in (*_GENERATED, "forward"):
        setattr(cls, name, _OnFirstUse(name, gm))
    return gm
