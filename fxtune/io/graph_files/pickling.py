"""torch.save / torch.load, pickle, multiprocessing and copy.deepcopy for fxtune GraphModules.

fx pickles a GraphModule as its generated code and re-traces it on load: node.meta is lost (so
fxtune no longer knows the adapters), a custom tracer class breaks unpickling, and modules the
graph does not reference are dropped. fxtune GraphModules pickle their graph as data instead
(graph_file.py: functions, classes and annotations travel as pickled objects, i.e. by qualified
name) plus their module tree, parameters, buffers, flags and records as ordinary pickled
objects; unpickling rebuilds the graph node by node. No code string is executed. deepcopy
copies the graph and the tree directly; copy.copy shares the tree and copies the graph.
"""

from __future__ import annotations

import copy
import importlib
from collections import OrderedDict
from typing import Any

import torch
from torch import fx, nn

from ...graph.ownership import RECORD_PREFIX, build_graph_module, on_build
from .export_guards import guard_inputs, guards_as_graph, is_guards
from .nodes import KEPT_META, decode_graph, encode_graph
from .targets import find_loaded, qualified_name
from .values import GraphFileError, ValueCodec, expect

_MODULE_STATE = frozenset(nn.Module().__dict__) | {"meta", "_is_impure"}  # what survives; fx rebuilds the rest


class ObjectTable:
    """Objects (functions, classes, annotations, tensors) carried next to the graph data by pickle itself."""

    def __init__(self, objects: list | None = None):
        self.objects = [] if objects is None else objects
        self._index: dict[int, int] = {}

    def put(self, obj: Any, where: str) -> int:
        if id(obj) not in self._index:
            self.objects.append(_ByName(qualified_name(obj)) if _needs_name(obj) else obj)
            self._index[id(obj)] = len(self.objects) - 1
        return self._index[id(obj)]

    def get(self, index: Any, where: str) -> Any:
        if type(index) is not int or not 0 <= index < len(self.objects):
            raise GraphFileError(f"{where}: {index!r} is not an object index")
        found = self.objects[index]
        return found.find(where) if isinstance(found, _ByName) else found

    def codec(self) -> ValueCodec:
        return ValueCodec(callable=self.put, callable_back=self.get, tensor=self.put, tensor_back=self.get)


def _needs_name(obj: Any) -> bool:
    """Whether pickle cannot find `obj` by itself: torch's operator objects, functions made inside others
    (torch.nn.functional.max_pool2d is one) that are reachable under a public name."""
    if isinstance(obj, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return True
    return callable(obj) and "<locals>" in getattr(obj, "__qualname__", "") and qualified_name(obj) is not None


class _ByName:
    """A function carried by its qualified name (pickle imports its module, as it does for any function)."""

    def __init__(self, name: str):
        self.name = name

    def find(self, where: str) -> Any:
        found = find_loaded(self.name)
        if found is None:
            module, _, rest = self.name.partition(".")
            found = importlib.import_module(module)
            for part in rest.split("."):
                found = getattr(found, part, None)
        if found is None:
            raise GraphFileError(f"{where}: {self.name} is not found in this process")
        return found


@on_build
def install(gm: fx.GraphModule) -> None:
    """Makes pickling, copy and deepcopy of `gm` go through fxtune (its class is gm's own, made by fx);
    runs on every GraphModule fxtune builds (graph/ownership.py's on_build)."""
    cls = type(gm)
    cls.__reduce__ = _reduce
    cls.__deepcopy__ = _deepcopy
    cls.__copy__ = _copy


def _state(gm: fx.GraphModule) -> dict:
    """The instance state that is not the graph or its generated code."""
    return {k: v for k, v in gm.__dict__.items() if k in _MODULE_STATE or k.startswith(RECORD_PREFIX)}


def _reduce(self: fx.GraphModule) -> tuple:
    state = _state(self)
    guards = {k: m for k, m in self._modules.items() if m is not None and is_guards(m)}
    if guards:  # generated code has no importable name: pickle it as a graph
        state["_modules"] = OrderedDict(
            (k, guards_as_graph(m, guard_inputs(self.graph, k), f"module '{k}'") if k in guards else m)
            for k, m in self._modules.items()
        )
    table = ObjectTable()
    graph = encode_graph(self.graph, table.codec(), table.put, f"GraphModule {type(self).__name__}")
    return rebuild, (type(self).__name__, state, graph, table.objects)


def rebuild(class_name: str, state: dict, graph: dict, objects: list) -> fx.GraphModule:
    """The GraphModule a pickle describes (called by pickle; the graph is rebuilt from its data)."""
    expect(class_name, str, "pickled GraphModule class name")
    table = ObjectTable(objects)
    root = nn.Module()
    root.__dict__.update(state)
    return build_graph_module(root, decode_graph(graph, table.codec(), table.get, f"pickled {class_name}", strict=False), class_name)


def _copied_graph(graph: fx.Graph, memo: dict) -> fx.Graph:
    """A copy of `graph` whose fxtune node.meta is copied too (fx copies node.meta one level deep)."""
    new = copy.deepcopy(graph)
    for old_node, new_node in zip(graph.nodes, new.nodes):
        for key in KEPT_META:
            if key in old_node.meta:
                new_node.meta[key] = copy.deepcopy(old_node.meta[key], memo)
    return new


def _deepcopy(self: fx.GraphModule, memo: dict) -> fx.GraphModule:
    root = nn.Module()
    root.__dict__.update(copy.deepcopy(_state(self), memo))
    new = build_graph_module(root, _copied_graph(self.graph, memo), type(self).__name__)
    memo[id(self)] = new
    return new


def _copy(self: fx.GraphModule) -> fx.GraphModule:
    return build_graph_module(self, _copied_graph(self.graph, {}), type(self).__name__)
