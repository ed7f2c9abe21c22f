"""Finding a graph's call sites: every place the graph uses a linear, conv or embedding weight.

Discovery reads each node as traced (through fxtune's own rewrites, see traced_calls.py), so an
adapted graph has exactly the sites of the traced one. Uses of one tensor (a module called twice,
tied weights) are grouped: they share the weight name and canonical reference of the first.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx, nn

from .signatures import FUNCTIONS, bind
from .sites import PART, Geometry, Site, SiteTable, WeightRef, join
from .traced_calls import BASE_META, TAG, original_call

SITE_LAYERS: dict[type, str] = {
    nn.Linear: "linear",
    nn.Conv1d: "conv1d",
    nn.Conv2d: "conv2d",
    nn.Conv3d: "conv3d",
    nn.Embedding: "embedding",
}
_PLAIN_METHODS = ("forward", "_conv_forward")


def is_conv1d(module: object) -> bool:
    """transformers' Conv1D (a linear storing its weight as (in, out)), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D"


def site_layer(module: nn.Module) -> str | None:
    """The layer kind of a module instance ("linear", "conv2d"...), or None when its weight is no call site."""
    if is_conv1d(module) and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
        return "linear"
    for cls, layer in SITE_LAYERS.items():
        if isinstance(module, cls):
            if layer == "embedding" and module.max_norm is not None:
                return None  # max_norm renormalises rows of the weight in place during the call
            return layer
    return None


def is_plain(module: nn.Module) -> bool:
    """Whether calling `module` is exactly its op on `module.weight` and `module.bias`: a Linear, Conv or
    Embedding (or transformers' Conv1D) that keeps its base class's forward, has no hooks, and holds its
    weight as a plain Parameter. Only then may fxtune replace the call by the functional op."""
    if site_layer(module) is None or not isinstance(module._parameters.get("weight"), nn.Parameter):
        return False
    if module._forward_hooks or module._forward_pre_hooks:
        return False
    base = type(module) if is_conv1d(module) else next(c for c in SITE_LAYERS if isinstance(module, c))
    return all(getattr(type(module), name, None) is getattr(base, name, None) for name in _PLAIN_METHODS)


def qkv_weights(mha: nn.MultiheadAttention) -> list[tuple[str, str, tuple[int, int] | None]]:
    """(letter, parameter, rows) of each q/k/v projection weight: rows of the packed in_proj_weight,
    or the separate q/k/v_proj_weight when the embedding sizes differ."""
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        return [(letter, "in_proj_weight", (i * e, (i + 1) * e)) for i, letter in enumerate("qkv")]
    return [(letter, f"{letter}_proj_weight", None) for letter in "qkv"]


def _transposed(module: nn.Module, layer: str) -> bool:
    return layer == "embedding" or is_conv1d(module)


def _module_geometry(module: nn.Module, layer: str) -> Geometry:
    if layer.startswith("conv"):
        padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
        return Geometry(tuple(module.stride), padding, tuple(module.dilation), module.groups, module.padding_mode,
                        tuple(module._reversed_padding_repeated_twice))
    if layer == "embedding":
        return Geometry(padding_idx=module.padding_idx, norm_type=module.norm_type, scale_grad_by_freq=module.scale_grad_by_freq)
    return Geometry()


@dataclass
class _Use:
    """One use before uses of the same tensor are grouped into sites."""

    natural: str
    node: fx.Node
    module: nn.Module
    layer: str
    ref: WeightRef
    tensor: torch.Tensor
    call: str
    geometry: Geometry = Geometry()
    has_bias: bool = False
    caller: nn.Module | None = None
    label: str = ""
    caller_path: str = ""


class _Graph:
    """Lookups over one GraphModule while discovering its sites."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules(remove_duplicate=False))
        self.by_name = {n.name: n for n in gm.graph.nodes}

    def parameter(self, node: Any) -> tuple[str, str, nn.Module, torch.Tensor] | None:
        """(owner path, name, owner, parameter) of a get_attr node fxtune did not insert, else None."""
        if not isinstance(node, fx.Node) or node.op != "get_attr" or TAG in node.meta:
            return None
        owner, _, name = node.target.rpartition(".")
        module = self.modules.get(owner)
        param = None if module is None else module._parameters.get(name)
        return None if param is None else (owner, name, module, param)

    def bias_path(self, owner: str, module: nn.Module, name: str = "bias") -> str | None:
        return join(owner, name) if module._parameters.get(name) is not None else None

    def function_use(self, node: fx.Node) -> tuple[Any, dict] | None:
        """(signature, bound arguments) of a functional weight call, else None."""
        if TAG in node.meta:
            return None
        op, target, args, kwargs = original_call(node, self.by_name)
        signature = FUNCTIONS.get(target) if op == "call_function" else None
        return None if signature is None else (signature, bind(signature, args, kwargs))

    def layer_use(self, node: fx.Node, path: str, module: nn.Module, call: str, caller=None, caller_path: str = "") -> _Use:
        """The use of `module.weight` (and bias) by the call `node`."""
        layer = site_layer(module)
        ref = WeightRef(path, "weight", transposed=_transposed(module, layer), bias=self.bias_path(path, module))
        label = "" if call == "module" else type(module).__name__ + (" (own forward)" if caller is module else "")
        return _Use(path, node, module, layer, ref, module.weight, call, _module_geometry(module, layer), ref.bias is not None,
                    caller=caller, label=label, caller_path=caller_path)

    def attention_uses(self, node: fx.Node, path: str, mha: nn.MultiheadAttention, call: str, caller=None,
                       caller_path: str | None = None) -> list[_Use]:
        """q, k, v (rows of in_proj_weight, or q/k/v_proj_weight) and out_proj of an attention `node` calls."""
        e, uses, caller = mha.embed_dim, [], mha if caller is None else caller
        caller_path = path if caller_path is None else caller_path
        bias = self.bias_path(path, mha, "in_proj_bias")
        for i, (letter, param, rows) in enumerate(qkv_weights(mha)):
            ref = WeightRef(path, param, rows=rows, bias=bias, bias_rows=(i * e, (i + 1) * e) if bias else None)
            uses.append(_Use(f"{path}.{letter}", node, mha, "linear", ref, getattr(mha, param), call, has_bias=bias is not None,
                             caller=caller, label=f"MultiheadAttention.{letter}", caller_path=caller_path))
        out = self.layer_use(node, join(path, "out_proj"), mha.out_proj, call, caller, caller_path)
        return uses + [replace(out, label="MultiheadAttention.out_proj")]


def _module_uses(g: _Graph, node: fx.Node, path: str) -> list[_Use]:
    module = g.modules.get(path)
    if module is None:
        return []
    if type(module) is nn.MultiheadAttention:
        return g.attention_uses(node, path, module, "mha")
    if is_plain(module):
        return [g.layer_use(node, path, module, "module")]
    return _opaque_uses(g, node, path, module)


def _opaque_uses(g: _Graph, node: fx.Node, path: str, called: nn.Module) -> list[_Use]:
    """The layer weights of a module called as a whole that fxtune cannot rewrite as plain ops: the
    module itself if it is a Linear/Conv/Embedding with its own forward, and every layer inside it."""
    uses, inside_attention = [], set()
    for rel, sub in called.named_modules():
        full = join(path, rel) if rel else path
        if id(sub) in inside_attention:
            continue
        if isinstance(sub, nn.MultiheadAttention):
            inside_attention.update(id(m) for m in sub.modules())
            uses.extend(g.attention_uses(node, full, sub, "opaque", called, path))
        elif site_layer(sub) is not None and isinstance(sub._parameters.get("weight"), nn.Parameter):
            uses.append(g.layer_use(node, full, sub, "opaque", called, path))
    return uses


def _padding_idx(signature: Any, values: dict, rows: int) -> int | None:
    index = values.get("padding_idx")
    if signature.aten:
        return index if index is not None and index >= 0 else None
    return None if index is None else (index + rows if index < 0 else index)


def _function_use(g: _Graph, node: fx.Node, signature: Any, values: dict) -> _Use | None:
    found = g.parameter(values.get("weight"))
    if found is None or (signature.layer == "embedding" and values.get("max_norm") is not None):
        return None
    owner, name, module, param = found
    bias = values.get("bias")
    bias_found = g.parameter(bias)
    layer = signature.layer
    ref = WeightRef(owner, name, transposed=layer == "embedding", bias=join(*bias_found[:2]) if bias_found else None)
    if layer.startswith("conv"):
        geometry = Geometry(values["stride"], values["padding"], values["dilation"], values["groups"])
    elif layer == "embedding":
        geometry = Geometry(padding_idx=_padding_idx(signature, values, param.shape[0]),
                            scale_grad_by_freq=bool(values.get("scale_grad_by_freq")))
    else:
        geometry = Geometry()
    natural = owner if name == "weight" else join(owner, name)
    label = ("aten." if signature.aten else "F.") + layer
    return _Use(natural, node, module, layer, ref, param, "function", geometry, bias is not None, label=label)


def _value_use(g: _Graph, node: fx.Node) -> _Use | None:
    """A module's weight read by get_attr and consumed by something other than a functional weight call."""
    found = g.parameter(node)
    if found is None:
        return None
    owner, name, module, param = found
    layer = site_layer(module)
    if layer is None or name != "weight":
        return None
    marked = node.meta.get(BASE_META, {}).get("op") == "get_attr"
    others = [u for u in node.users if TAG not in u.meta and not _weight_of(g, u, node)]
    if not (marked or others):
        return None
    use = g.layer_use(node, owner, module, "value")
    geometry = Geometry(groups=getattr(module, "groups", 1), padding_idx=getattr(module, "padding_idx", None))
    return replace(use, geometry=geometry, label=f"{type(module).__name__} (value)")


def _weight_of(g: _Graph, user: fx.Node, node: fx.Node) -> bool:
    use = g.function_use(user)
    return use is not None and use[1].get("weight") is node


def _uses(gm: fx.GraphModule) -> list[_Use]:
    g = _Graph(gm)
    uses: list[_Use] = []
    values: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if TAG in node.meta:
            continue
        op, target, _, _ = original_call(node, g.by_name)
        if op == "call_module":
            uses.extend(_module_uses(g, node, target))
        elif op == "get_attr":
            use = _value_use(g, node)
            if use is not None:
                values.add(node)
                uses.append(use)
        elif op == "call_function":
            bound = g.function_use(node)
            if bound is not None and bound[1].get("weight") not in values:
                use = _function_use(g, node, *bound)
                if use is not None:
                    uses.append(use)
    return uses


def discover_sites(gm: fx.GraphModule) -> list[Site]:
    """Every call site of gm in graph order, including ones fxtune has already rewritten. In a part of a
    model traced in parts, names are paths in the whole model (`backbone.body.conv1`); references stay gm's."""
    part = gm.meta.get(PART) or "" if isinstance(getattr(gm, "meta", None), dict) else ""
    uses = _uses(gm)
    groups: dict[tuple, list[_Use]] = {}
    for use in uses:
        groups.setdefault((id(use.tensor), use.ref.rows), []).append(use)
    canonical: dict[tuple, tuple[str, WeightRef]] = {}
    for key, group in groups.items():
        keep = sorted({u.geometry.padding_idx for u in group if u.layer == "embedding" and u.geometry.padding_idx is not None})
        canonical[key] = (join(part, group[0].natural), replace(group[0].ref, keep=tuple(keep)))
    found, calls = [], {}
    for use in uses:
        weight_name, weight_ref = canonical[(id(use.tensor), use.ref.rows)]
        count = calls.get(use.natural, 0)
        calls[use.natural] = count + 1
        found.append(Site(
            name=join(part, use.natural) + (f"@{count}" if count else ""), weight_name=weight_name, node=use.node,
            module=use.module, layer=use.layer, weight_ref=weight_ref, use_ref=use.ref, call=use.call,
            shape=use.ref.canonical_shape(use.tensor.shape), geometry=use.geometry, has_bias=use.has_bias,
            caller=use.caller, caller_path=join(part, use.caller_path) if use.caller_path else "", label=use.label,
            device=use.tensor.device,
        ))
    return found


def site_table(gm: fx.GraphModule) -> SiteTable:
    """The sites of gm, found once (see SiteTable)."""
    return SiteTable(discover_sites(gm))
