"""A GraphModule's module tree as data: every module's class and recipe, tensors by index, fxtune's records.

Each module record holds its training flag, parameters and buffers (indices into the tensor
table, None kept), non-persistent buffer names, fxtune's base-weight records, and its children
in order; a module reachable under two paths is recorded once and referenced (`same_as`).
GraphModules (the root, torch.export's input check) hold their graph. Other modules hold a
recipe (module_recipes.py). A module the graph calls must be rebuilt as its own class, which
must be allowed; a module it never calls may fall back to the nearest torch.nn class it derives
from (`base`), keeping its parameters, buffers and children — the graph reads only those.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import fx, nn

from ...errors import warn
from .export_guards import guard_inputs, guards_as_graph, is_guards
from .nodes import called_paths, check_part, decode_graph, encode_graph
from .targets import Allowed, name_annotation, name_class
from .values import GraphFileError, ValueCodec, check_fields, expect
from .module_recipes import RECORD_PREFIX, fill, is_attribute, rebuild, recipe
from ...graph.ownership import build_graph_module
from .tensor_table import TensorWriter

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_COMMON = {"training": bool, "parameters": list, "buffers": list, "non_persistent": list, "records": dict, "children": list}
_GRAPH_ATTRIBUTES = {"_is_impure": bool}


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _place(path: str) -> str:
    return f"module '{path}'" if path else "the root GraphModule"


class TreeWriter:
    """Writes a GraphModule's tree; tensors go to `tensors`, functions and values through `codec`."""

    def __init__(self, codec: ValueCodec, tensors: TensorWriter):
        self.codec, self.tensors = codec, tensors
        self.seen: dict[int, str] = {}
        self._default = Allowed()

    def graph_module(self, gm: fx.GraphModule, path: str = "") -> dict:
        where = _place(path)
        graph = encode_graph(gm.graph, self.codec, name_annotation, where)
        meta = {}
        for key, value in gm.meta.items():
            try:
                meta[key] = self.codec.encode(value, f"{where} meta[{key!r}]")
            except GraphFileError as exc:
                if str(key).startswith("fxtune"):
                    raise
                warn(f"{exc}; gm.meta[{key!r}] is left out of the file")
        record = {"graph": graph, "class_name": type(gm).__name__, "meta": meta}
        attributes = {k: gm.__dict__[k] for k in _GRAPH_ATTRIBUTES if k in gm.__dict__}
        if attributes:
            record["attributes"] = attributes
        called = {_join(path, p) for p in called_paths(graph)}
        record.update(self._common(gm, path, called, gm.graph))
        return record

    def _module(self, module: nn.Module, path: str, called: set[str]) -> dict:
        if id(module) in self.seen:
            return {"same_as": self.seen[id(module)]}
        self.seen[id(module)] = path
        if isinstance(module, fx.GraphModule):
            return self.graph_module(module, path)
        record = self._recipe(module, path, path in called)
        record.update(self._common(module, path, called, None))
        return record

    def _recipe(self, module: nn.Module, path: str, called: bool) -> dict:
        """Its own class and recipe (for torch.nn types, and for any class the graph calls), and for other
        classes the nearest torch.nn class it derives from. Other classes' constructors are not run."""
        where, cls = _place(path), type(module)
        record: dict[str, Any] = {}
        try:
            record["class"] = name_class(cls, where)
            default = self._default.module_class(record["class"], where) is cls
        except GraphFileError:
            if called:
                raise
            default = False
        if default or called:
            own = self._encoded(module, cls, where)
            if isinstance(own, dict):
                record.update(own)
                if default:
                    return record
            elif called:
                raise GraphFileError(
                    f"{where}: the graph calls this {cls.__module__}.{cls.__qualname__}, but a graph file cannot rebuild "
                    f"it without pickle: {own}"
                )
        for base in cls.__mro__[1:]:
            try:
                if self._default.module_class(name_class(base, where), where) is not base:
                    continue
            except GraphFileError:
                continue
            encoded = self._encoded(module, base, where)
            if isinstance(encoded, dict):
                record["base"] = {"class": name_class(base, where), **encoded}
                return record
        raise GraphFileError(f"{where}: no torch.nn class can stand for this {cls.__qualname__}")

    def _encoded(self, module: nn.Module, cls: type, where: str) -> dict | str:
        """The recipe of `module` as a `cls`, encoded; attributes the class does not set itself and that are not
        data are left out with a warning. A string says why there is none."""
        made = recipe(module, cls)
        if isinstance(made, str):
            return made
        args, attributes, own = made
        try:
            encoded_args = {k: self.codec.encode(v, f"{where} constructor argument '{k}'") for k, v in args.items()}
            encoded = {}
            for key, value in attributes.items():
                try:
                    encoded[key] = self.codec.encode(value, f"{where} attribute '{key}'")
                except GraphFileError as exc:
                    if key in own:
                        raise
                    warn(f"{exc}; it is left out of the file")
        except GraphFileError as exc:
            return str(exc)
        return {"args": encoded_args, "attributes": encoded}

    def _common(self, module: nn.Module, path: str, called: set[str], graph: fx.Graph | None) -> dict:
        hooks = [h for h in _HOOKS if getattr(module, h, None)]
        if hooks:
            raise GraphFileError(
                f"{_place(path)} has hooks ({', '.join(hooks)}); hooks are code and cannot be stored in a graph file. "
                "Remove them before saving (or use torch.save)"
            )
        children = []
        for name, child in module._modules.items():
            if child is not None and is_guards(child):
                child = guards_as_graph(child, guard_inputs(graph, name) if graph is not None else 0, _place(_join(path, name)))
            children.append([name, None if child is None else self._module(child, _join(path, name), called)])
        return {
            "training": module.training,
            "parameters": [[k, None if p is None else self.tensors.add(p, _join(path, k))] for k, p in module._parameters.items()],
            "buffers": [[k, None if b is None else self.tensors.add(b, _join(path, k))] for k, b in module._buffers.items()],
            "non_persistent": sorted(module._non_persistent_buffers_set),
            "records": {k: self.codec.encode(v, _join(path, k)) for k, v in module.__dict__.items() if k.startswith(RECORD_PREFIX)},
            "children": children,
        }


class TreeReader:
    """Builds the module tree of a file: modules the graph calls only of allowed types, nothing else imported."""

    def __init__(self, codec: ValueCodec, allowed: Allowed, source: str):
        self.codec, self.allowed, self.source = codec, allowed, source
        self.by_path: dict[str, nn.Module] = {}

    def graph_module(self, record: Any, path: str = "") -> fx.GraphModule:
        where = f"{self.source}: {_place(path)}"
        check_fields(record, where, {"graph": dict, "class_name": str, "meta": dict, **_COMMON}, {"attributes": dict})
        if not record["class_name"].isidentifier():
            raise GraphFileError(f"{where}.class_name: {record['class_name']!r:.80} is not a class name")
        root = nn.Module()
        called = {_join(path, p) for p in called_paths(record["graph"])}
        self._fill(root, record, path, called, where)
        root.meta = {k: self.codec.decode(v, f"{where}.meta.{k}") for k, v in record["meta"].items()}
        graph = decode_graph(record["graph"], self.codec, self.allowed.annotation, f"{where}.graph")
        _check_targets(graph, root, where)
        root.__dict__.update(check_fields(record.get("attributes", {}), f"{where}.attributes", {}, _GRAPH_ATTRIBUTES))
        gm = build_graph_module(root, graph, class_name=record["class_name"])
        try:
            gm.recompile()  # now, not on first use: a file whose parts do not fit is refused when it is read
        except Exception as exc:  # torch.fx generating code from inconsistent parts (e.g. a signature and its inputs)
            raise GraphFileError(f"{where}: torch.fx cannot generate code for this graph: {type(exc).__name__}: {exc}") from None
        return gm

    def _module(self, record: Any, path: str, called: set[str]) -> nn.Module:
        where = f"{self.source}: {_place(path)}"
        if isinstance(record, dict) and "same_as" in record:
            same = expect(check_fields(record, where, {"same_as": str})["same_as"], str, f"{where}.same_as")
            if same not in self.by_path:
                raise GraphFileError(f"{where}.same_as: no module '{same}' was read before it")
            return self.by_path[same]
        if isinstance(record, dict) and "graph" in record:
            module = self.graph_module(record, path)
        else:
            check_fields(record, where, _COMMON, {"class": dict, "args": dict, "attributes": dict, "base": dict})
            module = self._construct(record, path, path in called, where)
            self._fill(module, record, path, called, where)
        self.by_path[path] = module
        return module

    def _construct(self, record: dict, path: str, called: bool, where: str) -> nn.Module:
        cls = self.allowed.module_class(record["class"], f"{where}.class") if "class" in record else None
        if cls is not None and "args" in record:
            return self._rebuild(cls, record, where)
        name = record.get("class", {}).get("name") or record.get("class", {}).get("fxtune") or "an unnamed class"
        if called or "base" not in record:
            why = "its constructor arguments were not recorded" if cls is not None else "a module type graph files may not construct by default"
            raise GraphFileError(
                f"{where}: the graph {'calls' if called else 'holds'} this {name}, {why}. If you trust this file and "
                f"that class, allow it: fxtune.load(path, allow=['{name}']) (or pass the class itself)"
            )
        base = check_fields(record["base"], f"{where}.base", {"class": dict, "args": dict, "attributes": dict})
        base_cls = Allowed().module_class(base["class"], f"{where}.base.class")
        if base_cls is None:
            raise GraphFileError(f"{where}.base.class: {base['class']} is not a torch.nn module type")
        return self._rebuild(base_cls, base, f"{where}.base")

    def _rebuild(self, cls: type, record: dict, where: str) -> nn.Module:
        args = {_name(k, f"{where}.args"): self.codec.decode(v, f"{where}.args.{k}") for k, v in record["args"].items()}
        attributes = {k: self.codec.decode(v, f"{where}.attributes.{k}") for k, v in record.get("attributes", {}).items()}
        return rebuild(cls, args, attributes, where)

    def _fill(self, module: nn.Module, record: dict, path: str, called: set[str], where: str) -> None:
        parameters = self._tensors(record["parameters"], f"{where}.parameters", parameter=True)
        buffers = self._tensors(record["buffers"], f"{where}.buffers", parameter=False)
        fill(module, parameters, buffers, where)
        persistent = [expect(n, str, f"{where}.non_persistent") for n in record["non_persistent"]]
        if not set(persistent) <= set(buffers):
            raise GraphFileError(f"{where}.non_persistent: {sorted(set(persistent) - set(buffers))} are not buffers")
        module._non_persistent_buffers_set = set(persistent)
        module.training = record["training"]
        for key, value in record["records"].items():
            if not key.startswith(RECORD_PREFIX):
                raise GraphFileError(f"{where}.records: '{key}' is not an fxtune record (they start with '{RECORD_PREFIX}')")
            module.__dict__[key] = self.codec.decode(value, f"{where}.records.{key}")
        children = OrderedDict()
        for i, entry in enumerate(record["children"]):
            if not isinstance(entry, list) or len(entry) != 2:
                raise GraphFileError(f"{where}.children[{i}]: expected a [name, module] pair")
            name = check_part(entry[0], f"{where}.children[{i}]")
            if name in children:
                raise GraphFileError(f"{where}.children[{i}]: '{name}' is not a new child name")
            children[name] = None if entry[1] is None else self._module(entry[1], _join(path, name), called)
        module._modules = children

    def _tensors(self, entries: list, where: str, *, parameter: bool) -> OrderedDict:
        out = OrderedDict()
        for i, entry in enumerate(entries):
            if not isinstance(entry, list) or len(entry) != 2:
                raise GraphFileError(f"{where}[{i}]: expected a [name, tensor index] pair")
            name = check_part(entry[0], f"{where}[{i}]")
            tensor = None if entry[1] is None else self.codec.decode({"tensor": entry[1]}, f"{where}.{name}")
            if tensor is not None and isinstance(tensor, nn.Parameter) != parameter:
                raise GraphFileError(f"{where}.{name}: {'a parameter must be' if parameter else 'a buffer cannot be'} an nn.Parameter")
            if name in out:
                raise GraphFileError(f"{where}[{i}]: '{name}' appears twice")
            out[name] = tensor
        return out


def _name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("__"):
        raise GraphFileError(f"{where}: {name!r:.80} is not an attribute name")
    return name


def _check_targets(graph: fx.Graph, root: nn.Module, where: str) -> None:
    """Every module the graph calls and every attribute it reads exists in the tree read from the file."""
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            found = _lookup(root, node.target)
            if found is _MISSING or (node.op == "call_module" and not isinstance(found, nn.Module)):
                raise GraphFileError(f"{where}.graph: node '{node.name}' {node.op}s '{node.target}', which the module tree does not hold")


_MISSING = object()


def _lookup(root: nn.Module, target: str) -> Any:
    """The module, parameter, buffer or tensor attribute at `target` under `root`, or _MISSING."""
    *parents, last = target.split(".")
    holder: Any = root
    for part in parents:
        holder = holder._modules.get(part) if isinstance(holder, nn.Module) else None
    if not isinstance(holder, nn.Module):
        return _MISSING
    for store in (holder._modules, holder._parameters, holder._buffers):
        if last in store:
            return store[last]
    value = holder.__dict__.get(last)
    return value if is_attribute(last) and isinstance(value, torch.Tensor) else _MISSING
