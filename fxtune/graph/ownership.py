"""Module trees that fxtune owns: parameters shared read-only, buffers and adapters copied.

`symbolic_trace` shares submodules with the user's model, so any later edit would reach it.
Here every module object is new; base parameters are new `Parameter` objects on the same
storage (no extra memory, and the user's `requires_grad` flags stay as they were).

Two kinds of fxtune state travel with a module tree besides its modules and tensors: entries
of a module's `__dict__` whose name starts with `RECORD_PREFIX` (e.g. base weights an adapter
replaced, see adapters/base_weights.py), and `gm.meta` (e.g. `TRAINABLE`).
"""

from __future__ import annotations

import copy
import types
from collections import OrderedDict
from typing import Callable

import torch
from torch import fx, nn

from .code_on_first_use import generate_code_on_first_use

NAMESPACE = "fxtune"  # the attribute under which a GraphModule holds its adapter slots
RECORD_PREFIX = "_fxtune_"  # module attributes holding fxtune records; copied with the module
TRAINABLE = "fxtune_trainable"  # gm.meta: base-tree parameters a structural pass made trainable


def trainable_names(gm: nn.Module) -> tuple[str, ...]:
    """Qualified names of base-tree parameters that structural passes made trainable (e.g. new factors)."""
    meta = getattr(gm, "meta", None)
    return tuple(meta.get(TRAINABLE, ())) if isinstance(meta, dict) else ()


def own_module_tree(
    root: nn.Module, *, freeze: bool = False, copy_prefix: str | None = NAMESPACE
) -> nn.Module:
    """A structural copy of `root`: new module objects, shared parameter storage, copied buffers.

    Parameters under the attribute `copy_prefix` (the adapter namespace) are cloned instead of
    shared, so the copy can be trained without touching its source. Tied tensors stay tied.
    """
    memo: dict[int, object] = {}

    def share(p: nn.Parameter, cloned: bool) -> nn.Parameter:
        if id(p) not in memo:
            data = p.detach().clone() if cloned else p.detach()
            grad = p.requires_grad and not (freeze and not cloned)
            memo[id(p)] = nn.Parameter(data, requires_grad=grad)
        return memo[id(p)]

    def own(module: nn.Module, cloned: bool) -> nn.Module:
        if id(module) in memo:
            return memo[id(module)]
        new = shallow_module_copy(module)
        state = new.__dict__  # written directly: nn.Module.__setattr__ would be a tenth of the copy's time
        state["_parameters"] = {k: None if p is None else share(p, cloned) for k, p in module._parameters.items()}
        state["_buffers"] = {k: None if b is None else memo.setdefault(id(b), b.detach().clone()) for k, b in module._buffers.items()}
        memo[id(module)] = new
        state["_modules"] = {
            k: None if m is None else own(m, cloned or (module is root and k == copy_prefix))
            for k, m in module._modules.items()
        }
        if isinstance(new, nn.RNNBase):  # its flat weight list still names the source's Parameter objects
            new._init_flat_weights()
        return new

    return own(root, False)


_SHARED = frozenset({"_parameters", "_buffers", "_modules"})  # replaced by own_module_tree anyway
_PLAIN = frozenset({bool, int, float, str, tuple, type(None)})  # immutable and never bound: kept as they are


def shallow_module_copy(module: nn.Module) -> nn.Module:
    """A new module object with the same attributes; its dicts (hooks, records...) are copies, and
    methods bound to the module in its own `__dict__` (a forward chosen in `__init__`) are bound to the copy.

    Avoids `copy.copy`, which on a GraphModule goes through `__reduce__` and re-traces code,
    and `GraphModule.__new__`, which makes a new class without the instance's forward.
    """
    new = object.__new__(type(module))
    state = module.__dict__.copy()
    for key, value in state.items():
        if type(value) in _PLAIN or key in _SHARED:
            continue
        if isinstance(value, (dict, set)):
            state[key] = value.copy()
        elif isinstance(value, types.MethodType) and value.__self__ is module:
            state[key] = types.MethodType(value.__func__, new)  # `self.forward = self.forward_split` (timm FasterNet)
    new.__dict__.update(state)
    return new


def build_graph_module(root: nn.Module, graph: fx.Graph, class_name: str = "GraphModule") -> fx.GraphModule:
    """A GraphModule over `graph` that keeps *all* of root's children, parameters and buffers.

    `GraphModule(root, graph)` keeps only what the graph references and replaces the module
    hierarchy by hollow `nn.Module`s; here root's own objects are adopted as they are, so the
    state_dict has exactly the model's keys and `gm.layer1` is still the model's `nn.Sequential`.
    Its code is generated when first used (see code_on_first_use.py).
    """
    gm = fx.GraphModule(nn.Module(), fx.Graph(), class_name=class_name)
    gm._modules = OrderedDict(root._modules)
    gm._parameters = OrderedDict(root._parameters)
    gm._buffers = OrderedDict(root._buffers)
    gm._non_persistent_buffers_set = set(root._non_persistent_buffers_set)
    gm.training = root.training  # root's own flag only: its children keep their own train/eval modes
    if isinstance(getattr(root, "meta", None), dict):
        gm.meta.update(root.meta)
    for key, value in root.__dict__.items():
        if key.startswith(RECORD_PREFIX):
            gm.__dict__[key] = copy.copy(value)
    if "_is_impure" in root.__dict__:  # fx's flag on a GraphModule called for its side effects (export's guards)
        gm.__dict__["_is_impure"] = root.__dict__["_is_impure"]
    _adopt_constants(root, gm, graph)
    gm._graph = graph
    graph.owning_module = gm
    gm._tracer_cls = graph._tracer_cls if graph._tracer_cls and "<locals>" not in graph._tracer_cls.__qualname__ else None
    gm._tracer_extras = graph._tracer_extras or {}
    generate_code_on_first_use(gm)
    for hook in _ON_BUILD:
        hook(gm)
    return gm


_ON_BUILD: list[Callable[[fx.GraphModule], None]] = []


def on_build(hook: Callable[[fx.GraphModule], None]) -> Callable[[fx.GraphModule], None]:
    """Registers `hook(gm)` to run on every GraphModule fxtune builds: how a higher layer (io's
    pickling, which makes fxtune GraphModules pickle as data) reaches them without this layer
    importing it."""
    _ON_BUILD.append(hook)
    return hook


def _adopt_constants(root: nn.Module, gm: fx.GraphModule, graph: fx.Graph) -> None:
    """Tensors the tracer kept as plain attributes of the root (`_tensor_constant0`) become non-persistent
    buffers: they move with `.to()`, and the state_dict keeps exactly the model's keys."""
    for node in graph.nodes:
        if node.op == "get_attr" and "." not in node.target and node.target not in gm._buffers:
            value = root.__dict__.get(node.target)
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                gm.register_buffer(node.target, value, persistent=False)
            elif value is not None and node.target not in gm._parameters and node.target not in gm._modules:
                gm.__dict__[node.target] = value


def clone_graph_module(gm: fx.GraphModule, *, freeze: bool = True) -> fx.GraphModule:
    """A new GraphModule equal to `gm` that can be edited and trained without touching `gm`.

    Base parameters share storage (frozen if `freeze`), buffers and adapter parameters are
    copied, and the graph is copied node by node (meta dicts are shallow-copied per node).
    """
    root = own_module_tree(gm, freeze=freeze)
    graph = copy.deepcopy(gm.graph)
    new = build_graph_module(root, graph, class_name=type(gm).__name__)
    if freeze:
        for name, param in new.named_parameters():
            if not name.startswith(NAMESPACE + "."):
                param.requires_grad_(False)
    return new


def replace_submodule(gm: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at dotted `path` inside `gm` (the parent must exist)."""
    parent_path, _, name = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    parent._modules[name] = module


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two tensors view the same memory (used to prove nothing was copied)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
