"""The leaf modules and autowrap functions timm and torchvision register for their own FX feature extraction.

Symbolic tracing stops at shape-dependent Python ("same" padding, window checks, `int(math.sqrt(n))`);
both libraries list the modules and functions their own tracer keeps opaque. A library is asked only
when one of the model's modules comes from it (so it is imported already and never imported here
otherwise); a leaf module found this way becomes an opaque site, called on adapted parameters.
"""

from __future__ import annotations

import importlib
import inspect
import math
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class LibraryRules:
    """What the libraries a model is built from register for tracing: leaf types, functions and modules to wrap."""

    libraries: tuple[str, ...] = ()
    leaf_types: tuple[type, ...] = ()
    functions: tuple[Callable, ...] = ()
    modules: tuple[ModuleType, ...] = (math,)

    def __bool__(self) -> bool:
        return bool(self.leaf_types or self.functions or len(self.modules) > 1)


def _timm() -> tuple[list[type], list[Callable], list[ModuleType]]:
    layers = importlib.import_module("timm.layers")
    return list(layers.get_notrace_modules()), [f for f in layers.get_notrace_functions() if callable(f)], []


def _torchvision() -> tuple[list[type], list[Callable], list[ModuleType]]:
    # torchvision.models.feature_extraction keeps every nn.Module class of torchvision.ops opaque and
    # wraps torchvision.ops' functions (its private `_get_leaf_modules_for_ops`, re-stated here).
    ops = importlib.import_module("torchvision.ops")
    leaves = [obj for _, obj in inspect.getmembers(ops) if inspect.isclass(obj) and issubclass(obj, nn.Module)]
    return leaves, [], [ops]


_LIBRARIES: dict[str, Callable[[], tuple[list[type], list[Callable], list[ModuleType]]]] = {
    "timm": _timm,
    "torchvision": _torchvision,
}


def libraries_of(model: nn.Module) -> tuple[str, ...]:
    """The registering libraries (timm, torchvision) some module of `model` is defined in, in a fixed order."""
    used = {type(m).__module__.partition(".")[0] for m in model.modules()}
    return tuple(name for name in _LIBRARIES if name in used and name in sys.modules)


def library_rules(model: nn.Module) -> LibraryRules:
    """The tracing registrations of the libraries `model` is built from (empty when it uses none of them)."""
    return _rules(libraries_of(model))


def loaded_library_rules() -> LibraryRules:
    """The registrations of every registering library already imported: what re-tracing saved code needs.

    Unpickling a GraphModule re-traces its code with the tracer class and no arguments; code that
    calls a wrapped timm function traces only if that function is wrapped again.
    """
    return _rules(tuple(name for name in _LIBRARIES if name in sys.modules))


def _rules(names: tuple[str, ...]) -> LibraryRules:
    leaves: list[type] = []
    functions: list[Callable] = []
    modules: list[ModuleType] = [math]
    for name in names:
        try:
            found = _LIBRARIES[name]()
        except (ImportError, AttributeError):  # a version of the library without these registries
            continue
        leaves += [t for t in found[0] if t not in leaves]
        functions += [f for f in found[1] if f not in functions]
        modules += [m for m in found[2] if m not in modules]
    return LibraryRules(names, tuple(leaves), tuple(functions), tuple(modules))
