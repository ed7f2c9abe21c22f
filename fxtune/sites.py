"""Call sites: every use of a linear, conv or embedding weight in a graph, wherever the graph uses it.

A site is one use of one weight. How the graph consumes it (`site.call`):
    module    call_module of nn.Linear, nn.Conv1d/2d/3d, nn.Embedding, or a class named `Conv1D`
              (transformers' transposed linear, recognised by name so fxtune needs no transformers)
    function  F.linear / F.conv1d/2d/3d / F.embedding, or their aten forms, on a get_attr weight
    value     a get_attr of a Linear/Conv/Embedding/Conv1D weight flowing into anything else
              (e.g. torchvision swin's fx.wrap-ped `shifted_window_attention`)
    mha       nn.MultiheadAttention called as a module: sites `<path>.q`, `.k`, `.v` (rows of
              in_proj_weight, or q/k/v_proj_weight) and `<path>.out_proj`
    opaque    a weight whose module is called as a whole but is not exactly the plain op: a subclass
              with its own forward (timm's Conv2dSame), hooks, or a leaf module holding the layer
              (nn.TransformerEncoderLayer); the module is called on adapted parameters
Names are the module paths users know (`features.1.0.attn.qkv`); a second use by the same path
is `fc@1`. `site.target` keys the weight's adapters: every use of one tensor (a module called
twice, tied weights) takes the target of the first use, so they share one adapter and fuse once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn

from .calls import BASE_META, FUNCTIONS, META, bind, original_call

SITE_KINDS: dict[type, str] = {
    nn.Linear: "linear",
    nn.Conv1d: "conv1d",
    nn.Conv2d: "conv2d",
    nn.Conv3d: "conv3d",
    nn.Embedding: "embedding",
}


@dataclass(frozen=True)
class WeightRef:
    """Where a weight lives and how its canonical (out, in/groups, *kernel) view is read from it:
    rows `rows` of `owner.param`, transposed if `transposed`; its bias likewise. Rows listed in
    `keep` (an embedding's padding row) are never adapted."""

    owner: str
    param: str
    rows: tuple[int, int] | None = None
    transposed: bool = False
    bias: str | None = None
    bias_rows: tuple[int, int] | None = None
    keep: tuple[int, ...] = ()

    @property
    def path(self) -> str:
        return join(self.owner, self.param)

    def view(self) -> tuple:
        """What decides the canonical view and bias of a use (two uses with equal views are interchangeable)."""
        return self.rows, self.transposed, self.bias, self.bias_rows


@dataclass(frozen=True)
class Geometry:
    """The call's own settings: conv stride/padding/dilation/groups/padding_mode, embedding options."""

    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    groups: int = 1
    padding_mode: str = "zeros"
    pad_amounts: tuple = ()
    padding_idx: int | None = None
    norm_type: float = 2.0
    scale_grad_by_freq: bool = False


@dataclass(frozen=True, eq=False)
class Site:
    """One use of a weight: its name, adapter key, graph node, owning module and canonical geometry."""

    name: str
    target: str
    node: fx.Node = field(repr=False)
    module: nn.Module = field(repr=False)
    kind: str
    ref: WeightRef = field(default=None, repr=False)  # the weight's canonical reference (shared by its uses)
    own: WeightRef = field(default=None, repr=False)  # how this use reads it
    call: str = "module"
    shape: tuple[int, ...] = ()
    geometry: Geometry = field(default_factory=Geometry, repr=False)
    has_bias: bool = False
    caller: nn.Module | None = field(default=None, repr=False)  # the module called as a whole (mha, opaque sites)
    caller_path: str = ""  # its path
    op: str = ""  # how the summary names the use
    dtype: torch.dtype | None = field(default=None, repr=False)
    device: torch.device | None = field(default=None, repr=False)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.shape

    @property
    def input(self) -> Any:
        """The input the site's call reads now (module and function sites; None otherwise)."""
        return _call_values(self.node).get("input") if self.call in ("module", "function") else None

    @property
    def bias_arg(self) -> Any:
        """A function site's bias argument as the call reads it now (a node, or None)."""
        return _call_values(self.node).get("bias") if self.call == "function" else None

    @property
    def is_conv(self) -> bool:
        return self.kind.startswith("conv")

    @property
    def groups(self) -> int:
        return self.geometry.groups

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        """Input features (linear), input channels (conv, all groups together) or rows of an embedding table."""
        return self.shape[1] * self.groups

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.shape[2:]

    @property
    def kernel_volume(self) -> int:
        return math.prod(self.kernel_size)

    @property
    def weight_numel(self) -> int:
        return math.prod(self.shape)

    @property
    def type_name(self) -> str:
        return self.op or type(self.module).__name__

    @property
    def canonical(self) -> bool:
        """Whether this use sees the weight as its adapters do (False: a tied use, e.g. seen transposed)."""
        return self.own.view() == self.ref.view()

    @property
    def padding_idx(self) -> int | None:
        return self.geometry.padding_idx

    @property
    def input_is_indices(self) -> bool:
        return self.kind == "embedding"

    @property
    def kept(self) -> tuple[int, tuple[int, ...]] | None:
        """(dim, indices) of the canonical weight's entries that are never adapted (padding rows), or None."""
        if not self.ref.keep:
            return None
        return (1 if self.ref.transposed else 0), self.ref.keep


def _call_values(node: fx.Node) -> dict[str, Any]:
    if node.op == "call_module":
        return {"input": node.args[0] if node.args else node.kwargs.get("input")}
    signature = FUNCTIONS.get(node.target) if node.op == "call_function" else None
    return {} if signature is None else bind(signature, node.args, node.kwargs)


def join(owner: str, name: str) -> str:
    return f"{owner}.{name}" if owner else name


def is_conv1d(module: object) -> bool:
    """transformers' Conv1D (a linear storing its weight as (in, out)), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D"


def site_kind(module: nn.Module) -> str | None:
    """The site kind of a module instance, or None when its weight is not adapted as a call site."""
    if is_conv1d(module) and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
        return "linear"
    for cls, kind in SITE_KINDS.items():
        if isinstance(module, cls):
            if kind == "embedding" and module.max_norm is not None:
                return None  # max_norm renormalises rows of the weight in place during the call
            return kind
    return None


_PLAIN_METHODS = ("forward", "_conv_forward")


def _base_class(module: nn.Module) -> type | None:
    for cls in SITE_KINDS:
        if isinstance(module, cls):
            return cls
    return None


def is_plain(module: nn.Module) -> bool:
    """Whether calling `module` is exactly its op on `module.weight` and `module.bias`: a Linear, Conv or
    Embedding (or transformers' Conv1D) that keeps its base class's forward, has no hooks, and holds its
    weight as a plain Parameter. Only then may fxtune replace the call by the functional op."""
    if site_kind(module) is None or not isinstance(module._parameters.get("weight"), nn.Parameter):
        return False
    if module._forward_hooks or module._forward_pre_hooks:
        return False
    base = type(module) if is_conv1d(module) else _base_class(module)
    return all(getattr(type(module), name, None) is getattr(base, name, None) for name in _PLAIN_METHODS)


def _transposed(module: nn.Module, kind: str) -> bool:
    return kind == "embedding" or is_conv1d(module)


def _view_shape(tensor: torch.Tensor, ref: WeightRef) -> tuple[int, ...]:
    shape = list(tensor.shape)
    if ref.rows is not None:
        shape[0] = ref.rows[1] - ref.rows[0]
    return tuple(reversed(shape)) if ref.transposed else tuple(shape)


def _module_geometry(module: nn.Module, kind: str) -> Geometry:
    if kind.startswith("conv"):
        return Geometry(
            tuple(module.stride), module.padding if isinstance(module.padding, str) else tuple(module.padding),
            tuple(module.dilation), module.groups, module.padding_mode, tuple(module._reversed_padding_repeated_twice),
        )
    if kind == "embedding":
        return Geometry(padding_idx=module.padding_idx, norm_type=module.norm_type, scale_grad_by_freq=module.scale_grad_by_freq)
    return Geometry()


@dataclass
class _Use:
    natural: str
    node: fx.Node
    module: nn.Module
    kind: str
    own: WeightRef
    tensor: torch.Tensor
    call: str
    geometry: Geometry = Geometry()
    has_bias: bool = False
    caller: nn.Module | None = None
    op: str = ""
    caller_path: str = ""


class _Graph:
    """Lookups over one GraphModule while discovering its sites."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules(remove_duplicate=False))
        self.by_name = {n.name: n for n in gm.graph.nodes}

    def parameter(self, node: Any) -> tuple[str, str, nn.Module, torch.Tensor] | None:
        """(owner path, name, owner, parameter) of a get_attr node fxtune did not insert, else None."""
        if not isinstance(node, fx.Node) or node.op != "get_attr" or META in node.meta:
            return None
        owner, _, name = node.target.rpartition(".")
        module = self.modules.get(owner)
        param = None if module is None else module._parameters.get(name)
        return None if param is None else (owner, name, module, param)

    def bias_path(self, owner: str, module: nn.Module, name: str = "bias") -> str | None:
        return join(owner, name) if module._parameters.get(name) is not None else None

    def function_use(self, node: fx.Node) -> tuple[Any, dict] | None:
        """(signature, bound arguments) of a functional weight call, else None."""
        if META in node.meta:
            return None
        op, target, args, kwargs = original_call(node, self.by_name)
        signature = FUNCTIONS.get(target) if op == "call_function" else None
        return None if signature is None else (signature, bind(signature, args, kwargs))


def _module_uses(g: _Graph, node: fx.Node, path: str) -> list[_Use]:
    module = g.modules.get(path)
    if module is None:
        return []
    if type(module) is nn.MultiheadAttention:
        return _mha_uses(g, node, path, module, "mha")
    if is_plain(module):
        return [_layer_use(g, node, path, module, "module")]
    return _opaque_uses(g, node, path, module)


def _layer_use(
    g: _Graph, node: fx.Node, path: str, module: nn.Module, call: str, caller: nn.Module | None = None, caller_path: str = ""
) -> _Use:
    kind = site_kind(module)
    own = WeightRef(path, "weight", transposed=_transposed(module, kind), bias=g.bias_path(path, module))
    op = "" if call == "module" else type(module).__name__ + (" (own forward)" if caller is module else "")
    return _Use(path, node, module, kind, own, module.weight, call, _module_geometry(module, kind), own.bias is not None,
                caller=caller, op=op, caller_path=caller_path)


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
            uses.extend(_mha_uses(g, node, full, sub, "opaque", caller=called, caller_path=path))
        elif site_kind(sub) is not None and isinstance(sub._parameters.get("weight"), nn.Parameter):
            uses.append(_layer_use(g, node, full, sub, "opaque", caller=called, caller_path=path))
    return uses


def qkv_weights(mha: nn.MultiheadAttention) -> list[tuple[str, str, tuple[int, int] | None]]:
    """(letter, parameter, rows) of each q/k/v projection weight: rows of the packed in_proj_weight,
    or the separate q/k/v_proj_weight when the embedding sizes differ."""
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        return [(letter, "in_proj_weight", (i * e, (i + 1) * e)) for i, letter in enumerate("qkv")]
    return [(letter, f"{letter}_proj_weight", None) for letter in "qkv"]


def _mha_uses(
    g: _Graph, node: fx.Node, path: str, mha: nn.MultiheadAttention, call: str, caller: nn.Module | None = None,
    caller_path: str | None = None,
) -> list[_Use]:
    e, uses, caller = mha.embed_dim, [], mha if caller is None else caller
    caller_path = path if caller_path is None else caller_path
    bias = g.bias_path(path, mha, "in_proj_bias")
    for i, (letter, param, rows) in enumerate(qkv_weights(mha)):
        own = WeightRef(path, param, rows=rows, bias=bias, bias_rows=(i * e, (i + 1) * e) if bias else None)
        tensor = getattr(mha, own.param)
        uses.append(_Use(f"{path}.{letter}", node, mha, "linear", own, tensor, call, has_bias=bias is not None,
                         caller=caller, op=f"MultiheadAttention.{letter}", caller_path=caller_path))
    out = mha.out_proj
    own = WeightRef(join(path, "out_proj"), "weight", bias=g.bias_path(join(path, "out_proj"), out))
    uses.append(_Use(own.owner, node, out, "linear", own, out.weight, call, has_bias=own.bias is not None,
                     caller=caller, op="MultiheadAttention.out_proj", caller_path=caller_path))
    return uses


def _padding_idx(signature: Any, values: dict, rows: int) -> int | None:
    index = values.get("padding_idx")
    if signature.aten:
        return index if index is not None and index >= 0 else None
    return None if index is None else (index + rows if index < 0 else index)


def _function_use(g: _Graph, node: fx.Node, signature: Any, values: dict) -> _Use | None:
    found = g.parameter(values.get("weight"))
    if found is None or (signature.kind == "embedding" and values.get("max_norm") is not None):
        return None
    owner, name, module, param = found
    bias = values.get("bias")
    bias_found = g.parameter(bias)
    kind = signature.kind
    own = WeightRef(owner, name, transposed=kind == "embedding", bias=join(*bias_found[:2]) if bias_found else None)
    if kind.startswith("conv"):
        geometry = Geometry(values["stride"], values["padding"], values["dilation"], values["groups"])
    elif kind == "embedding":
        geometry = Geometry(padding_idx=_padding_idx(signature, values, param.shape[0]),
                            scale_grad_by_freq=bool(values.get("scale_grad_by_freq")))
    else:
        geometry = Geometry()
    natural = owner if name == "weight" else join(owner, name)
    label = ("aten." if signature.aten else "F.") + kind
    return _Use(natural, node, module, kind, own, param, "function", geometry, bias is not None, op=label)


def _value_use(g: _Graph, node: fx.Node) -> _Use | None:
    """A module's weight read by get_attr and consumed by something other than a functional weight call."""
    found = g.parameter(node)
    if found is None:
        return None
    owner, name, module, param = found
    kind = site_kind(module)
    if kind is None or name != "weight":
        return None
    marked = node.meta.get(BASE_META, {}).get("op") == "get_attr"
    others = [u for u in node.users if META not in u.meta and not _weight_of(g, u, node)]
    if not (marked or others):
        return None
    own = WeightRef(owner, name, transposed=_transposed(module, kind), bias=g.bias_path(owner, module))
    geometry = Geometry(groups=getattr(module, "groups", 1), padding_idx=getattr(module, "padding_idx", None))
    return _Use(owner, node, module, kind, own, param, "value", geometry, own.bias is not None,
                op=f"{type(module).__name__} (value)")


def _weight_of(g: _Graph, user: fx.Node, node: fx.Node) -> bool:
    use = g.function_use(user)
    return use is not None and use[1].get("weight") is node


def _uses(gm: fx.GraphModule) -> list[_Use]:
    g = _Graph(gm)
    uses: list[_Use] = []
    values: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if META in node.meta:
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


def all_sites(gm: fx.GraphModule) -> list[Site]:
    """Every call site of gm in graph order, including ones fxtune has already rewritten."""
    uses = _uses(gm)
    groups: dict[tuple, list[_Use]] = {}
    for use in uses:
        groups.setdefault((id(use.tensor), use.own.rows), []).append(use)
    canonical: dict[tuple, tuple[str, WeightRef]] = {}
    for key, group in groups.items():
        keep = sorted({u.geometry.padding_idx for u in group if u.kind == "embedding" and u.geometry.padding_idx is not None})
        canonical[key] = (group[0].natural, replace(group[0].own, keep=tuple(keep)))
    found, calls = [], {}
    for use in uses:
        target, ref = canonical[(id(use.tensor), use.own.rows)]
        count = calls.get(use.natural, 0)
        calls[use.natural] = count + 1
        found.append(Site(
            name=use.natural if count == 0 else f"{use.natural}@{count}", target=target, node=use.node,
            module=use.module, kind=use.kind, ref=ref, own=use.own, call=use.call,
            shape=_view_shape(use.tensor, use.own), geometry=use.geometry, has_bias=use.has_bias,
            caller=use.caller, op=use.op, caller_path=use.caller_path,
            dtype=use.tensor.dtype, device=use.tensor.device,
        ))
    return found


def canonical_sites(gm: fx.GraphModule) -> dict[str, Site]:
    """{target: the first site of that weight}; its `ref` is how the weight's adapters see it."""
    out: dict[str, Site] = {}
    for site in all_sites(gm):
        out.setdefault(site.target, site)
    return out
