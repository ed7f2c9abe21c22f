"""What a graph file may call and construct, by name: the default allow-list and the user's `allow=`.

Writing names every function and module type by a stable qualified name (`torch.nn.functional.pad`,
`torch.ops.aten.linear.default`), fxtune's own graph functions as `{"fxtune": "call_with"}` and an
adapter kind's transforms as `{"kind": "lora", "transform": "weight"}`. Reading looks a name up
only if a rule allows it — torch, torch.nn.functional, torch.ops.aten, operator, math, a few
builtins, torchvision.ops, fxtune's own functions and those of registered adapter kinds, or what
`allow=` names — and never imports a module the rules do not allow. Everything else is refused
with an error that names it and says how to allow it.
"""

from __future__ import annotations

import builtins
import importlib
import keyword
import math
import operator
import re
import sys
import types
import typing
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .values import GraphFileError, check_fields, expect

_TORCH_DENIED = frozenset({
    "save", "load", "from_file", "compile", "manual_seed", "seed", "initial_seed", "use_deterministic_algorithms",
    "import_ir_module", "import_ir_module_from_buffer", "get_device_module", "prepare_multiprocessing_environment",
    "DeserializationStorageContext",
})
_TORCH_PRIVATE_ALLOWED = frozenset({"_assert", "_check", "_check_is_size", "_assert_async"})
_OPERATOR_DENIED = frozenset({"attrgetter", "methodcaller", "call"})
_BUILTINS_ALLOWED = frozenset({
    "getattr", "len", "int", "float", "bool", "abs", "min", "max", "round", "sum", "range", "slice", "tuple", "list",
    "dict", "pow", "divmod", "all", "any", "isinstance",
})
_PUBLIC_NAMESPACES = ("torch.nn.functional", "torch.functional", "torch._C._nn", "math", "operator")
_ATEN_DUNDER = re.compile(r"__[a-z]+__")  # aten's operator overloads (`__and__`, `__lshift__`) are op names
_METHODS_DENIED = frozenset({  # reach memory, files or other objects' methods: numpy arrays, storages, hooks
    "numpy", "storage", "untyped_storage", "set_", "data_ptr", "share_memory_", "apply_", "map_", "map2_",
    "register_hook", "register_post_accumulate_grad_hook", "from_file", "tofile",
})
_METHODS = frozenset(n for n in dir(torch.Tensor) if not n.startswith("_")) | {"keys", "values", "items", "get", "index", "count"}
_ANNOTATIONS = {
    f"{t.__module__}.{t.__qualname__}": t
    for t in (int, float, bool, str, bytes, complex, type(None), tuple, list, dict, set, slice, object, torch.Tensor,
              torch.Size, torch.dtype, torch.device, torch.memory_format, torch.layout, torch.SymInt, torch.SymFloat,
              torch.SymBool, nn.Module)
}


def _fxtune_functions() -> dict[str, Callable]:
    """fxtune's own graph functions under stable names (their modules may move; the names stay)."""
    from ...adapter.batch_rows import merge_rows, plan_batch, take_rows
    from ...ops import add_channel_mix, add_feature_mix, call_with, keep_index, keep_positions, with_rows

    functions = (add_channel_mix, add_feature_mix, call_with, keep_index, keep_positions, with_rows, plan_batch, take_rows, merge_rows)
    return {fn.__name__: fn for fn in functions}


def _fxtune_classes() -> dict[str, type]:
    from ...adapter.slots import AdapterSlot

    return {"AdapterSlot": AdapterSlot}


def _kinds() -> dict:
    from ...adapter.kinds import registered_kinds

    return registered_kinds()


def check_name(name: Any, where: str) -> str:
    """`name` if it is a dotted Python name with no dunder part (so it cannot hold code)."""
    parts = expect(name, str, where).split(".")
    operator_name = len(parts) > 3 and parts[:2] == ["torch", "ops"] and _ATEN_DUNDER.fullmatch(parts[3])  # aten.__and__
    if not all(p.isidentifier() and not keyword.iskeyword(p) and (not p.startswith("__") or (i == 3 and operator_name))
               for i, p in enumerate(parts)):
        raise GraphFileError(f"{where}: {name!r:.120} is not a qualified name like 'torch.nn.functional.relu'")
    return name


def check_method(name: Any, where: str) -> str:
    """A method or attribute name a graph may use on a value: a public torch.Tensor method or attribute (or a
    dict/list lookup), except those that reach raw memory, files, numpy or hooks.

    Names, not objects, are checked (values exist only when the graph runs), so the list is closed: a name
    like `tofile` or `system` cannot be used on whatever object a graph might reach.
    """
    if not isinstance(name, str) or name not in _METHODS or name in _METHODS_DENIED:
        raise GraphFileError(
            f"{where}: {name!r:.120} is not an attribute name a graph file may use (torch.Tensor's public methods and "
            f"attributes, except {sorted(_METHODS_DENIED)})"
        )
    return name


def find_loaded(name: str) -> Any:
    """The object `name` stands for among already imported modules (never imports), or None."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is not None:
            obj: Any = module
            for part in parts[i:]:
                obj = getattr(obj, part, None)
                if obj is None:
                    return None
            return obj
    return None


def qualified_name(obj: Any) -> str | None:
    """A dotted name that finds `obj` again (public aliases first), or None (lambdas, local functions)."""
    if isinstance(obj, torch._ops.OpOverload):
        return f"torch.ops.{obj.namespace}.{obj._opname}.{obj._overloadname}"
    if isinstance(obj, torch._ops.OpOverloadPacket):
        return "torch.ops." + obj._qualified_op_name.replace("::", ".")
    name = getattr(obj, "__name__", None)
    module = {"_operator": "operator"}.get(getattr(obj, "__module__", None), getattr(obj, "__module__", None))
    qualname = getattr(obj, "__qualname__", name)
    if not isinstance(name, str):
        return None
    candidates = [f"torch.nn.functional.{name}", f"torch.nn.{name}", f"torch.{name}", f"torchvision.ops.{name}"]
    if isinstance(module, str) and isinstance(qualname, str) and "<" not in qualname:
        candidates.append(f"{module}.{qualname}")
    for candidate in candidates:
        try:
            check_name(candidate, "")
        except GraphFileError:
            continue
        if find_loaded(candidate) is obj:
            return candidate
    return None


def name_callable(obj: Any, where: str) -> dict:
    """How a graph file names the function `obj`; a GraphFileError if it has no name to be found by."""
    for name, fn in _fxtune_functions().items():
        if fn is obj:
            return {"fxtune": name}
    for kind in _kinds().values():
        for transform in ("weight", "bias"):
            if getattr(kind, transform) is obj:
                return {"kind": kind.name, "transform": transform}
    name = qualified_name(obj)
    if name is None:
        raise GraphFileError(
            f"{where}: {obj!r:.100} has no importable name (a lambda, a local function or a bound method?); "
            "graph files call functions by their qualified name, so use a module-level function"
        )
    return {"name": name}


def name_class(cls: type, where: str) -> dict:
    """How a graph file names a module type."""
    for name, known in _fxtune_classes().items():
        if known is cls:
            return {"fxtune": name}
    name = qualified_name(cls)
    if name is None:
        raise GraphFileError(f"{where}: module type {cls!r} has no importable name (defined inside a function?)")
    return {"name": name}


def name_annotation(obj: Any, where: str) -> Any:
    """A type annotation of a graph input or node as data (classes by name, typing generics by parts)."""
    if isinstance(obj, str):  # a postponed annotation (`from __future__ import annotations`): fx names it as text
        return {"text": obj}
    if isinstance(obj, type):
        module, qualname = obj.__module__, obj.__qualname__
        if "<" in qualname:
            raise GraphFileError(f"{where}: annotation {obj!r} is a local class")
        return {"class": f"{module}.{qualname}"}
    if obj is typing.Any:
        return {"class": "typing.Any"}
    args = [name_annotation(a, f"{where}[{i}]") for i, a in enumerate(getattr(obj, "__args__", ()))]
    if typing.get_origin(obj) is typing.Union or isinstance(obj, types.UnionType):
        return {"union": args, "pipe": isinstance(obj, types.UnionType)}
    if isinstance(obj, types.GenericAlias):
        return {"alias": name_annotation(obj.__origin__, where), "args": args}
    if getattr(obj, "__module__", None) == "typing" and getattr(obj, "_name", None):
        return {"typing": obj._name, "args": args}
    raise GraphFileError(f"{where}: annotation {obj!r:.80} cannot be stored")


class Allowed:
    """Looks names of a graph file up: the default rules, then the user's `allow=` entries.

    `allow` holds functions, classes, Python modules (everything public in them) or qualified
    names as strings (a name, or a prefix such as 'torchvision.models.swin_transformer'; only
    these may be imported).
    """

    def __init__(self, allow: Iterable[Any] = ()):
        if isinstance(allow, (str, types.ModuleType)) or callable(allow):
            allow = [allow]
        self.objects: dict[str, Any] = {}
        self.modules: dict[str, types.ModuleType] = {}
        self.prefixes: list[str] = []
        for entry in allow:
            if isinstance(entry, str):
                self.prefixes.append(check_name(entry, "allow="))
            elif isinstance(entry, types.ModuleType):
                self.modules[entry.__name__] = entry
            elif callable(entry):
                for name in {qualified_name(entry), f"{getattr(entry, '__module__', '')}.{getattr(entry, '__qualname__', '')}"}:
                    if name:
                        self.objects[name] = entry
            else:
                raise GraphFileError(f"allow= entries are functions, classes, Python modules or qualified names, got {entry!r:.80}")

    def function(self, data: Any, where: str) -> Callable:
        """The function a graph file names; a GraphFileError naming it (and how to allow it) if not allowed."""
        if isinstance(data, dict) and "fxtune" in data:
            check_fields(data, where, {"fxtune": str})
            found = _fxtune_functions().get(data["fxtune"])
            if found is None:
                raise GraphFileError(f"{where}: fxtune has no graph function '{data['fxtune']}' (a file from another fxtune version?)")
            return found
        if isinstance(data, dict) and "kind" in data:
            check_fields(data, where, {"kind": str, "transform": str})
            kind = _kinds().get(data["kind"])
            if kind is None:
                raise GraphFileError(
                    f"{where}: the graph uses adapter kind '{data['kind']}', which is not registered; import the module that "
                    f"defines it first (fxtune's kinds: import fxtune.passes). Registered: {sorted(_kinds())}"
                )
            fn = getattr(kind, data["transform"], None) if data["transform"] in ("weight", "bias") else None
            if fn is None:
                raise GraphFileError(f"{where}: adapter kind '{data['kind']}' has no '{data['transform']}' transform")
            return fn
        name = check_name(check_fields(data, where, {"name": str})["name"], f"{where}.name")
        found = self._lookup(name, _default_function) or self._kind_helper(name)
        if found is None or not callable(found) or isinstance(found, types.ModuleType):
            raise GraphFileError(
                f"{where}: the graph calls '{name}', which graph files may not call by default. If you trust this file "
                f"and that function, allow it: fxtune.load(path, allow=['{name}']) (or pass the function itself)"
            )
        return found

    def module_class(self, data: Any, where: str) -> type | None:
        """The module type a graph file names, if allowed (else None; the caller decides what that means)."""
        if isinstance(data, dict) and "fxtune" in data:
            check_fields(data, where, {"fxtune": str})
            return _fxtune_classes().get(data["fxtune"])
        name = check_name(check_fields(data, where, {"name": str})["name"], f"{where}.name")
        found = self._lookup(name, _default_class)
        return found if isinstance(found, type) and issubclass(found, nn.Module) else None

    def annotation(self, data: Any, where: str) -> Any:
        """A type annotation; a class no rule knows becomes a stand-in with its name (annotations only name types)."""
        if not isinstance(data, dict) or len(data) == 0:
            raise GraphFileError(f"{where}: expected an annotation object")
        if "text" in data:  # generated code only ever holds it as a value, under a sanitized name
            return check_fields(data, where, {"text": str})["text"]
        if "class" in data:
            name = check_name(check_fields(data, where, {"class": str})["class"], f"{where}.class")
            if name == "typing.Any":
                return typing.Any
            found = _ANNOTATIONS.get(name) or self.objects.get(name)
            return found if found is not None else _stand_in(name)
        if "union" in data:
            check_fields(data, where, {"union": list, "pipe": bool})
            args = tuple(self.annotation(a, f"{where}.union[{i}]") for i, a in enumerate(data["union"]))
            if data["pipe"]:
                out = args[0]
                for a in args[1:]:
                    out = out | a
                return out
            return typing.Union[args]
        if "alias" in data:
            check_fields(data, where, {"alias": dict, "args": list})
            origin = self.annotation(data["alias"], f"{where}.alias")
            if origin not in (tuple, list, dict, set, type):
                raise GraphFileError(f"{where}: {origin!r} is not a builtin generic")
            return origin[tuple(self.annotation(a, f"{where}.args[{i}]") for i, a in enumerate(data["args"]))]
        check_fields(data, where, {"typing": str, "args": list})
        if data["typing"] not in ("List", "Tuple", "Dict", "Set", "Optional", "Sequence", "Mapping", "Callable", "Type", "Iterable"):
            raise GraphFileError(f"{where}: typing.{data['typing']} is not a known generic")
        generic = getattr(typing, data["typing"])
        args = tuple(self.annotation(a, f"{where}.args[{i}]") for i, a in enumerate(data["args"]))
        return generic[args] if args else generic

    def _lookup(self, name: str, default: Callable[[str], Any]) -> Any:
        if name in self.objects:
            return self.objects[name]
        found = default(name)
        if found is not None:
            return found
        for module_name, module in self.modules.items():
            if name.startswith(module_name + "."):
                return _walk(module, name[len(module_name) + 1:].split("."), private=True)
        for prefix in self.prefixes:
            if name == prefix or name.startswith(prefix + "."):
                return _import(name)
        return None

    def _kind_helper(self, name: str) -> Any:
        """A module-level function of a module that defines a registered adapter kind (e.g. DoRA's factor)."""
        module_name, _, attr = name.rpartition(".")
        homes = {fn.__module__ for k in _kinds().values() for fn in (k.weight, k.bias) if fn is not None}
        module = sys.modules.get(module_name) if module_name in homes else None
        found = vars(module).get(attr) if module is not None and not attr.startswith("_") else None
        return found if isinstance(found, types.FunctionType) and found.__module__ == module_name else None


def _walk(obj: Any, parts: list[str], *, private: bool = False) -> Any:
    """`obj.a.b...`; names with a leading underscore only where the user allowed the whole namespace."""
    for part in parts:
        if part.startswith("__") or part.startswith("_") and not private:
            return None
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _import(name: str) -> Any:
    """`name` found by importing its longest importable module prefix (only for names the user allowed)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        return _walk(module, parts[i:], private=True) if i < len(parts) else module
    return None


def _default_function(name: str) -> Any:
    """The callable `name` stands for if the default rules allow it (no import beyond torchvision.ops)."""
    head, _, last = name.rpartition(".")
    if name == "torch.fx._symbolic_trace._assert_is_none":
        from torch.fx._symbolic_trace import _assert_is_none

        return _assert_is_none
    if name.startswith("torch.ops.aten."):
        rest = name[len("torch.ops.aten."):].split(".")
        if len(rest) > 2:
            return None
        try:
            packet = getattr(torch.ops.aten, rest[0])
            return getattr(packet, rest[1]) if len(rest) == 2 else packet
        except (AttributeError, RuntimeError):
            return None
    if head == "torch":
        if last in _TORCH_DENIED or last.startswith("set_") or (last.startswith("_") and last not in _TORCH_PRIVATE_ALLOWED):
            return None
        found = vars(torch).get(last)
        return None if isinstance(found, types.ModuleType) else found
    if head == "builtins":
        return getattr(builtins, last) if last in _BUILTINS_ALLOWED else None
    if name.startswith("torchvision.ops.") and not any(p.startswith("_") for p in name.split(".")):
        importlib.import_module("torchvision.ops")
        found = find_loaded(name)  # e.g. torchvision.ops.stochastic_depth.stochastic_depth
        inside = getattr(found, "__module__", None) or ""
        return found if callable(found) and not isinstance(found, types.ModuleType) and inside.startswith("torchvision.ops") else None
    if head in _PUBLIC_NAMESPACES and not last.startswith("_"):
        if head == "operator" and last in _OPERATOR_DENIED:
            return None
        namespace = {"torch._C._nn": torch._C._nn, "math": math, "operator": operator}.get(head)
        if namespace is None:
            namespace = importlib.import_module(head)
        found = getattr(namespace, last, None)
        return None if isinstance(found, types.ModuleType) else found
    return None


def _default_class(name: str) -> type | None:
    """A torch.nn module type (defined in torch.nn.modules), named `torch.nn.X` or by its defining module."""
    head, _, last = name.rpartition(".")
    if head != "torch.nn" and not head.startswith("torch.nn.modules."):
        return None
    module = sys.modules.get(head)
    found = getattr(module, last, None) if module is not None else None
    if isinstance(found, type) and issubclass(found, nn.Module) and found.__module__.startswith("torch.nn.modules."):
        return found
    return None


def _stand_in(name: str) -> type:
    """A class that only carries `name`, so generated code names an annotation as it did when saved."""
    module, _, qualname = name.rpartition(".")
    return type(qualname.rpartition(".")[2], (), {"__module__": module, "__qualname__": qualname})
