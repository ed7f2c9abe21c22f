"""Emitting nodes for one site: readable names, `node.meta["fxtune"]` tags, site geometry.

An adapter kind's activation form receives an `Emitter`; everything it creates is tagged with
the site, adapter, kind and role, which is how the core later finds and removes it.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx

from ..graph.sites import Site, WeightRef, identifier
from ..graph.traced_calls import TAG
from ..ops import add_channel_mix, add_feature_mix
from .composition import compose
from .slots import AdapterSlot, slot_path

_CONV = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}


def site_prefix(site: Site, adapter: str | None = None) -> str:
    """Node-name prefix of a site (`layer1.0.conv1` -> `layer1_0_conv1`), plus a non-default adapter."""
    key = identifier(site.name)
    return key if adapter in (None, "default") else f"{key}_{adapter}"


class Emitter:
    """Creates tagged nodes at the graph's current insertion point for one site."""

    def __init__(
        self, gm: fx.GraphModule, site: Site, *, adapter: str | None = None, kind: str | None = None,
        prefix: str | None = None, graph: fx.Graph | None = None,
    ):
        self.gm = gm
        self.graph = gm.graph if graph is None else graph
        self.site = site
        self.adapter = adapter
        self.kind = kind
        self.prefix = prefix
        self.slot_path: str | None = None
        self.created: list[fx.Node] = []

    def for_slot(self, slot: AdapterSlot) -> "Emitter":
        """An emitter for one adapter of this site, sharing the list of created nodes."""
        em = Emitter(self.gm, self.site, adapter=slot.adapter, kind=slot.kind, graph=self.graph)
        em.slot_path = slot_path(slot)
        em.created = self.created
        return em

    def slot_inputs(self, slot: AdapterSlot) -> dict[str, Any]:
        """get_attr nodes for the slot's tensors, plus its settings as constants (what a kind's forms receive)."""
        tensors = set(slot.tensor_names())
        return {key: self.get_attr(f"{self.slot_path}.{key}", role=key) if key in tensors else value
                for key, value in slot.inputs().items()}

    def adapted_weight(
        self, weight: Any, bias: Any, slots: list[AdapterSlot], *, kept=None, adapt_bias: bool = True
    ) -> tuple[fx.Node, Any]:
        """Nodes computing `slots` applied to a weight node and bias (see composition.compose)."""
        emitters: dict[int, Emitter] = {}

        def em(slot: AdapterSlot | None) -> Emitter:
            return self if slot is None else emitters.setdefault(id(slot), self.for_slot(slot))

        return compose(
            weight, bias, slots, kept=kept, adapt_bias=adapt_bias,
            call=lambda slot, fn, *args, role, **kwargs: em(slot).call(fn, *args, role=role, **kwargs),
            inputs=lambda slot: em(slot).slot_inputs(slot),
        )

    def name(self, role: str) -> str:
        return f"{self.prefix or site_prefix(self.site, self.adapter)}_{role}"

    def _tag(self, node: fx.Node, role: str) -> fx.Node:
        node.meta[TAG] = {"site": self.site.name, "adapter": self.adapter, "kind": self.kind, "role": role}
        self.created.append(node)
        return node

    def get_attr(self, qualname: str, role: str) -> fx.Node:
        return self._tag(self.graph.create_node("get_attr", qualname, name=self.name(role)), role)

    def call(self, fn: Callable, *args: Any, role: str, **kwargs: Any) -> fx.Node:
        return self._tag(self.graph.create_node("call_function", fn, args, kwargs, name=self.name(role)), role)

    def method(self, method: str, *args: Any, role: str, **kwargs: Any) -> fx.Node:
        return self._tag(self.graph.create_node("call_method", method, args, kwargs, name=self.name(role)), role)

    def module(self, child: str, *args: Any, role: str) -> fx.Node:
        """Calls a submodule of this adapter's slot (e.g. its dropout)."""
        target = f"{self.slot_path}.{child}"
        return self._tag(self.graph.create_node("call_module", target, args, {}, name=self.name(role)), role)

    def add(self, a: Any, b: Any, *, role: str) -> fx.Node:
        return self.call(operator.add, a, b, role=role)

    def mul(self, a: Any, b: Any, *, role: str) -> fx.Node:
        return self.call(operator.mul, a, b, role=role)

    def base_weight(self, *, role: str) -> fx.Node:
        """The site's base weight in the canonical (out, in/groups, *kernel) view its adapters see."""
        return self.canonical(self.get_attr(self.site.use_ref.path, role=role), self.site.weight_ref, role)

    def canonical(self, raw: fx.Node, ref: WeightRef, role: str) -> fx.Node:
        """Nodes reading the canonical view from a raw weight node (rows, then `.t()`)."""
        return ref.canonical(
            raw,
            take=lambda node, start, stop: self.call(operator.getitem, node, slice(start, stop), role=f"{role}_rows"),
            transpose=lambda node: self.method("t", node, role=f"{role}_t"),
        )

    def base_bias(self, *, role: str) -> fx.Node | Any:
        """The site's bias (its rows, for q/k/v), or None: a get_attr, or the call's own bias argument."""
        own = self.site.use_ref
        if own.bias is None:
            return self.site.bias_arg if self.site.call == "function" else None
        bias = self.get_attr(own.bias, role=role)
        if own.bias_rows is not None:
            bias = self.call(operator.getitem, bias, slice(*own.bias_rows), role=f"{role}_rows")
        return bias

    def site_call(self, x: fx.Node, weight: Any, bias: Any = None, *, groups: int | None = None, role: str) -> fx.Node:
        """The site's own operation on `x` with another (canonical-view) weight: same stride, padding,
        dilation, padding_mode; an embedding looks rows up in the weight's transpose."""
        fn, args = site_call_args(self.site, x, weight, bias, groups=groups, emit=lambda f, *a, part: self.call(f, *a, role=f"{role}_{part}"))
        return self.call(fn, *args, role=role)

    def pointwise(self, x: fx.Node, weight: Any, *, groups: int = 1, role: str) -> fx.Node:
        """A 1x1 conv (or a linear) of `x` with `weight`: mixes channels only."""
        if not self.site.is_conv:
            return self.call(F.linear, x, weight, role=role)
        return self.call(_CONV[self.site.layer], x, weight, None, 1, 0, 1, groups, role=role)

    def pointwise_add(self, y: fx.Node, x: fx.Node, weight: Any, *, scale: float = 1.0, groups: int = 1, role: str) -> fx.Node:
        """y + scale · pointwise(x, weight): one fused matmul-add when groups == 1, else a 1×1 conv,
        a scale and an add (roles `<role>_up`, `<role>_scaled`)."""
        if groups == 1:
            fn = add_channel_mix if self.site.is_conv else add_feature_mix
            return self.call(fn, y, x, weight, scale, role=role)
        up = self.pointwise(x, weight, groups=groups, role=f"{role}_up")
        if scale != 1.0:
            up = self.mul(up, scale, role=f"{role}_scaled")
        return self.add(y, up, role=role)

    def channel_view(self, vector: Any, *, role: str) -> fx.Node | Any:
        """Reshapes a per-channel vector so it broadcasts over the site's channel dimension."""
        if not self.site.is_conv:
            return vector
        return self.method("view", vector, -1, *([1] * len(self.site.kernel_size)), role=role)


def site_call_args(
    site: Site, x: Any, weight: Any, bias: Any, *, groups: int | None = None, emit: Callable[..., Any]
) -> tuple[Callable, tuple]:
    """`(fn, args)` of the functional op equal to the site's call with canonical `weight` and `bias`.

    A conv with padding_mode other than zeros is explicit `F.pad` then an unpadded conv, exactly
    what the module does; an embedding is `F.embedding(x, weight.t(), padding_idx, ...)`.
    `emit(fn, *args, part=...)` creates those extra nodes.
    """
    geo = site.geometry
    if site.layer == "embedding":
        table = emit(torch.t, weight, part="t")
        return F.embedding, (x, table, geo.padding_idx, None, geo.norm_type, geo.scale_grad_by_freq, False)
    if not site.is_conv:
        return F.linear, (x, weight, bias)
    groups = geo.groups if groups is None else groups
    padding = geo.padding
    if geo.padding_mode != "zeros":
        x = emit(F.pad, x, geo.pad_amounts, geo.padding_mode, part="pad")
        padding = 0
    return _CONV[site.layer], (x, weight, bias, geo.stride, padding, geo.dilation, groups)
