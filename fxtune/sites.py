"""Call sites: the uses of a linear/conv weight in a graph, found by module type.

A module called from two places is two sites (`fc`, `fc@1`) sharing one weight; the site's
`target` is the owning module's path, which is where adapters and folded weights live.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import fx, nn

SITE_KINDS: dict[type, str] = {
    nn.Linear: "linear",
    nn.Conv1d: "conv1d",
    nn.Conv2d: "conv2d",
    nn.Conv3d: "conv3d",
}

BASE_META = "fxtune_base"  # on a site's call node once fxtune rewrote it: how to restore it


@dataclass(frozen=True, eq=False)
class Site:
    """One use of a weight: its name, owning module path, graph node and geometry."""

    name: str
    target: str
    node: fx.Node = field(repr=False)
    module: nn.Module = field(repr=False)
    kind: str

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.module.weight.shape)

    @property
    def is_conv(self) -> bool:
        return self.kind != "linear"

    @property
    def groups(self) -> int:
        return getattr(self.module, "groups", 1)

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def in_features(self) -> int:
        """Input features (linear) or input channels (conv), all groups together."""
        return self.weight_shape[1] * self.groups

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.weight_shape[2:]

    @property
    def kernel_volume(self) -> int:
        return math.prod(self.kernel_size)

    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None

    @property
    def weight_numel(self) -> int:
        return math.prod(self.weight_shape)

    @property
    def type_name(self) -> str:
        return type(self.module).__name__


def site_kind(module: nn.Module) -> str | None:
    """The site kind of a module instance, or None when it is not a supported layer."""
    for cls, kind in SITE_KINDS.items():
        if isinstance(module, cls):
            return kind
    return None


def all_sites(gm: fx.GraphModule) -> list[Site]:
    """Every call site of gm in graph order, including ones fxtune has already rewritten."""
    found: list[Site] = []
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        base = node.meta.get(BASE_META)
        if base is not None:
            target = base["target"]
        elif node.op == "call_module":
            target = node.target
        else:
            continue
        module = gm.get_submodule(target)
        kind = site_kind(module)
        if kind is None:
            continue
        count = calls.get(target, 0)
        calls[target] = count + 1
        name = target if count == 0 else f"{target}@{count}"
        found.append(Site(name=name, target=target, node=node, module=module, kind=kind))
    return found
