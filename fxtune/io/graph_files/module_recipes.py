"""Rebuilding a module without pickle: its class (by name), constructor arguments read from its
attributes, then its plain attributes; parameters, buffers and children are put in afterwards.

A recipe is checked when it is written: the class is built with those arguments on the meta
device and must make the same parameters and buffers (names, shapes) as the module has.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn

from ...graph.ownership import RECORD_PREFIX
from .values import GraphFileError

MODULE_INTERNALS = frozenset(nn.Module().__dict__) | {"training", "forward"}


def _linear_bias(layer: str) -> Callable[[nn.Module], bool]:
    return lambda m: getattr(m, layer).bias is not None


_TRANSFORMER_LAYER: dict[str, Callable[[nn.Module], Any]] = {
    "d_model": lambda m: m.self_attn.embed_dim,
    "nhead": lambda m: m.self_attn.num_heads,
    "dim_feedforward": lambda m: m.linear1.out_features,
    "dropout": lambda m: m.dropout.p,
    "layer_norm_eps": lambda m: m.norm1.eps,
    "batch_first": lambda m: m.self_attn.batch_first,
    "bias": _linear_bias("linear1"),
}
_SPECIAL: dict[type, dict[str, Callable[[nn.Module], Any]]] = {
    nn.MultiheadAttention: {"bias": lambda m: m.in_proj_bias is not None, "add_bias_kv": lambda m: m.bias_k is not None},
    nn.TransformerEncoderLayer: _TRANSFORMER_LAYER,
    nn.TransformerDecoderLayer: _TRANSFORMER_LAYER,
}


_RNN = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")
_KEYWORDS_ONLY = {nn.RNN: _RNN + ("nonlinearity",), nn.LSTM: _RNN + ("proj_size",), nn.GRU: _RNN}  # take *args, **kwargs


_DERIVED: dict[type, tuple[frozenset[str], Callable[[nn.Module], None]]] = {
    nn.RNNBase: (frozenset({"_flat_weights", "_flat_weight_refs"}), lambda m: m._init_flat_weights()),
}  # attributes a class derives from its parameters, and how it does so


def is_attribute(key: str) -> bool:
    """Whether a `__dict__` entry is a plain attribute of the module (not nn.Module's bookkeeping or an fxtune record)."""
    return key not in MODULE_INTERNALS and not key.startswith(RECORD_PREFIX)


def _derived(module: nn.Module) -> frozenset[str]:
    return frozenset().union(*(keys for cls, (keys, _) in _DERIVED.items() if isinstance(module, cls)))


def constructor_args(module: nn.Module, cls: type) -> dict[str, Any] | str:
    """Keyword arguments that make a `cls` like `module`, read from its attributes; or why there are none."""
    if cls in _KEYWORDS_ONLY:
        return {name: module.__dict__[name] for name in _KEYWORDS_ONLY[cls]}
    try:
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        return f"the constructor of {cls.__qualname__} has no readable signature"
    args = {}
    for p in parameters:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("device", "dtype") or p.name.startswith("_"):
            continue
        special = _SPECIAL.get(cls, {}).get(p.name)
        if special is not None:
            args[p.name] = special(module)
        elif p.name in module.__dict__:
            args[p.name] = module.__dict__[p.name]
        elif (p.name in module._parameters or p.name in module._buffers) and isinstance(p.default, bool):
            args[p.name] = getattr(module, p.name) is not None
        elif p.default is p.empty:
            return f"its constructor argument '{p.name}' is not one of its attributes"
    return args


def construct(cls: type, args: dict[str, Any]) -> nn.Module:
    """`cls(**args)` with every tensor on the meta device (no memory, no initialisation work)."""
    with torch.device("meta"):
        return cls(**args)


def mismatch(fresh: nn.Module, module: nn.Module) -> str | None:
    """Why `fresh` does not have the parameters and buffers of `module` (same names, None-ness, shapes), if so."""
    for store in ("_parameters", "_buffers"):
        theirs, mine = getattr(fresh, store), getattr(module, store)
        for name, t in theirs.items():
            what = store[1:-1]
            if name not in mine:
                return f"{type(fresh).__qualname__} would have {what} '{name}', which the module lacks"
            if (t is None) != (mine[name] is None):
                return f"{what} '{name}' is {'None' if mine[name] is None else 'set'} in the module, not in a rebuilt {type(fresh).__qualname__}"
            if t is not None and tuple(t.shape) != tuple(mine[name].shape):
                return f"{what} '{name}' has shape {list(mine[name].shape)}, a rebuilt {type(fresh).__qualname__} {list(t.shape)}"
    return None


def recipe(module: nn.Module, cls: type) -> tuple[dict[str, Any], dict[str, Any], set[str]] | str:
    """(constructor arguments, attributes, attribute names the class itself sets) that rebuild `module` as a `cls`,
    checked on the meta device; or why `cls` cannot rebuild it."""
    args = constructor_args(module, cls)
    if isinstance(args, str):
        return args
    try:
        fresh = construct(cls, args)
    except Exception as exc:  # any constructor error means "not rebuildable this way"
        return f"{cls.__qualname__}(**{args!r:.200}) fails: {exc}"
    why = mismatch(fresh, module)
    if why:
        return why
    own = {k for k in fresh.__dict__ if is_attribute(k)} - _derived(fresh)
    keep = own if cls is not type(module) else {k for k in module.__dict__ if is_attribute(k)} - _derived(module)
    attributes = {k: v for k, v in module.__dict__.items() if k in keep}
    return args, attributes, own


def rebuild(cls: type, args: dict[str, Any], attributes: dict[str, Any], where: str) -> nn.Module:
    """A `cls` built from `args` (meta device), with the recorded plain attributes set."""
    try:
        module = construct(cls, args)
    except Exception as exc:  # a constructor refusing these arguments
        raise GraphFileError(f"{where}: {cls.__qualname__}(**{args!r:.200}) fails: {exc}") from None
    for key, value in attributes.items():
        if not key.isidentifier() or key.startswith("__") or not is_attribute(key):
            raise GraphFileError(f"{where}.attributes: '{key}' is not a plain attribute name")
        if key not in module.__dict__ and (hasattr(type(module), key) or key in module._parameters or key in module._buffers or key in module._modules):
            raise GraphFileError(f"{where}.attributes: '{key}' would hide {type(module).__qualname__}.{key}")
        module.__dict__[key] = value
    return module


def fill(module: nn.Module, parameters: OrderedDict, buffers: OrderedDict, where: str) -> None:
    """Gives a rebuilt module its loaded parameters and buffers, which must cover what its class made."""
    for store, loaded in (("_parameters", parameters), ("_buffers", buffers)):
        for name, made in getattr(module, store).items():
            what = store[1:-1]
            if name not in loaded:
                raise GraphFileError(f"{where}: {type(module).__qualname__} has {what} '{name}', the file does not")
            if (made is None) != (loaded[name] is None) or (made is not None and tuple(made.shape) != tuple(loaded[name].shape)):
                shape = None if loaded[name] is None else list(loaded[name].shape)
                raise GraphFileError(
                    f"{where}: {what} '{name}' is {shape} in the file, but {type(module).__qualname__} built from the "
                    f"recorded arguments makes {None if made is None else list(made.shape)}"
                )
        setattr(module, store, loaded)
    for cls, (_, refresh) in _DERIVED.items():
        if isinstance(module, cls):
            refresh(module)
