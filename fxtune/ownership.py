"""Module trees that fxtune owns: parameters shared read-only, buffers and adapters copied.

`symbolic_trace` shares submodules with the user's model, so any later edit would reach it.
Here every module object is new; base parameters are new `Parameter` objects on the same
storage (no extra memory, and the user's `requires_grad` flags stay as they were).
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import fx, nn

NAMESPACE = "fxtune"


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
        new._parameters = {
            k: None if p is None else share(p, cloned) for k, p in module._parameters.items()
        }
        new._buffers = {
            k: None if b is None else memo.setdefault(id(b), b.detach().clone())
            for k, b in module._buffers.items()
        }
        memo[id(module)] = new
        new._modules = {
            k: None if m is None else own(m, cloned or (module is root and k == copy_prefix))
            for k, m in module._modules.items()
        }
        return new

    return own(root, False)


def shallow_module_copy(module: nn.Module) -> nn.Module:
    """A new module object with the same attributes; its dicts (parameters, hooks...) are copies.

    Avoids `copy.copy`, which on a GraphModule goes through `__reduce__` and re-traces code,
    and `GraphModule.__new__`, which makes a new class without the instance's forward.
    """
    new = object.__new__(type(module))
    for key, value in module.__dict__.items():
        new.__dict__[key] = copy.copy(value) if isinstance(value, (dict, set)) else value
    return new


def build_graph_module(root: nn.Module, graph: fx.Graph, class_name: str = "GraphModule") -> fx.GraphModule:
    """A GraphModule over `graph` that keeps *all* of root's children, parameters and buffers.

    `GraphModule(root, graph)` keeps only what the graph references and replaces the module
    hierarchy by hollow `nn.Module`s; we restore root's own objects so that the state_dict has
    exactly the model's keys and `gm.layer1` is still the model's `nn.Sequential`.
    """
    gm = fx.GraphModule(root, graph, class_name=class_name)
    for store in ("_modules", "_parameters", "_buffers"):
        merged = OrderedDict(getattr(root, store))
        for key, value in getattr(gm, store).items():
            merged.setdefault(key, value)
        setattr(gm, store, merged)
    gm._non_persistent_buffers_set = set(root._non_persistent_buffers_set)
    gm.training = root.training  # root's own flag only: its children keep their own train/eval modes
    if isinstance(getattr(root, "meta", None), dict):
        gm.meta.update(root.meta)
    for key, value in root.__dict__.items():  # kept base weights of the root's own parameters (basekeeping)
        if key.startswith("_fxtune_"):
            gm.__dict__[key] = copy.copy(value)
    from .pickling import install  # pickles and copies as data, not as re-traced code (pickling imports this module)

    install(gm)
    return gm


def clone_graph_module(gm: fx.GraphModule, *, freeze: bool = True) -> fx.GraphModule:
    """A new GraphModule equal to `gm` that can be edited and trained without touching `gm`.

    Base parameters share storage (frozen if `freeze`), buffers and adapter parameters are
    copied, and the graph (with every node's meta) is deep-copied.
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
