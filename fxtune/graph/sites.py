"""Call sites: every use of a linear, conv or embedding weight in a graph, and the table a pass reads them from.

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
is `fc@1`. `site.weight_name` keys the weight's adapters: every use of one tensor (a module called
twice, tied weights) takes the name of its first use, so they share one adapter and fuse once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx, nn

from ..errors import FxtuneError
from .signatures import call_arguments

PART = "fxtune_part"  # gm.meta of a GraphModule traced as a part of a model: its path there, which prefixes its sites' names


def join(owner: str, name: str) -> str:
    """A dotted path: `owner.name`, `name` at the root, `owner` itself when name is empty."""
    return f"{owner}.{name}" if owner and name else owner or name


def identifier(name: str) -> str:
    """A site or weight name as a Python identifier for attribute keys and node names:
    `layer1.0.conv1` -> `layer1_0_conv1`, `fc@1` -> `fc_call1`, the root "" -> `root`."""
    return name.replace(".", "_").replace("@", "_call") or "root"


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

    def canonical(self, raw: Any, *, take: Callable | None = None, transpose: Callable | None = None) -> Any:
        """The canonical view of a raw weight: its rows, then its transpose. `raw` is a tensor by
        default; `take(raw, start, stop)` and `transpose(x)` read other things the same way (shapes,
        graph nodes), so this one rule serves every reader."""
        take = take or (lambda t, start, stop: t[start:stop])
        transpose = transpose or (lambda t: t.t())
        value = raw if self.rows is None else take(raw, *self.rows)
        return transpose(value) if self.transposed else value

    def canonical_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.canonical(tuple(shape), take=lambda s, a, b: (b - a, *s[1:]), transpose=lambda s: tuple(reversed(s)))

    def raw_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The raw-layout rows a canonical weight stands for (a contiguous new tensor when transposed)."""
        return weight.t().contiguous() if self.transposed else weight


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
    """One use of a weight: its name, the weight's name (adapter key), graph node, module and geometry.

    `weight_ref` is how the weight's adapters see it (shared by all its uses), `use_ref` how this
    use reads it; `layer` is the op ("linear", "conv2d", "embedding"...), `label` the summary's name
    for the use. `caller` is the module called as a whole for mha and opaque sites (at `caller_path`).
    """

    name: str
    weight_name: str
    node: fx.Node = field(repr=False)
    module: nn.Module = field(repr=False)
    layer: str
    weight_ref: WeightRef = field(default=None, repr=False)
    use_ref: WeightRef = field(default=None, repr=False)
    call: str = "module"
    shape: tuple[int, ...] = ()
    geometry: Geometry = field(default_factory=Geometry, repr=False)
    has_bias: bool = False
    caller: nn.Module | None = field(default=None, repr=False)
    caller_path: str = ""
    label: str = ""
    device: torch.device | None = field(default=None, repr=False)

    # Earlier names, kept so code written against them keeps working.
    target = property(lambda self: self.weight_name, doc="Old name of `weight_name`.")
    kind = property(lambda self: self.layer, doc="Old name of `layer`.")
    ref = property(lambda self: self.weight_ref, doc="Old name of `weight_ref`.")
    own = property(lambda self: self.use_ref, doc="Old name of `use_ref`.")
    op = property(lambda self: self.label, doc="Old name of `label`.")

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.shape

    @property
    def input(self) -> Any:
        """The input the site's call reads now (module and function sites; None otherwise)."""
        return call_arguments(self.node).get("input") if self.call in ("module", "function") else None

    @property
    def bias_arg(self) -> Any:
        """A function site's bias argument as the call reads it now (a node, or None)."""
        return call_arguments(self.node).get("bias") if self.call == "function" else None

    @property
    def is_conv(self) -> bool:
        return self.layer.startswith("conv")

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
        return self.label or type(self.module).__name__

    @property
    def canonical(self) -> bool:
        """Whether this use sees the weight as its adapters do (False: a tied use, e.g. seen transposed)."""
        return self.use_ref.view() == self.weight_ref.view()

    @property
    def padding_idx(self) -> int | None:
        return self.geometry.padding_idx

    @property
    def input_is_indices(self) -> bool:
        return self.layer == "embedding"

    @property
    def kept(self) -> tuple[int, tuple[int, ...]] | None:
        """(dim, indices) of the canonical weight's entries that are never adapted (padding rows), or None."""
        if not self.weight_ref.keep:
            return None
        return (1 if self.weight_ref.transposed else 0), self.weight_ref.keep


class SiteTable:
    """The sites of one GraphModule, found once: in graph order, by weight, by node.

    A pass reads its table once; the nodes and modules it refers to stay valid while adapters are
    stripped and re-emitted (discovery sees through fxtune's rewrites), but not after a structural
    edit, which must build a new table.
    """

    def __init__(self, sites: list[Site]):
        self.all = sites
        self.by_weight: dict[str, list[Site]] = {}
        for site in sites:
            self.by_weight.setdefault(site.weight_name, []).append(site)

    def __iter__(self):
        return iter(self.all)

    def __len__(self) -> int:
        return len(self.all)

    def first(self, weight_name: str, *, error: type[FxtuneError] = FxtuneError) -> Site:
        """The first site of a weight: its `weight_ref` is how the weight's adapters see it."""
        found = self.by_weight.get(weight_name)
        if not found:
            raise error(
                f"'{weight_name}' is no weight that the graph uses at a call site any more; weights: "
                f"{sorted(self.by_weight)[:40]}. Delete adapters on it (fxtune.delete_adapter) or re-create them on this graph"
            )
        return found[0]

    def by_node(self, weights: set[str] | None = None) -> dict[fx.Node, list[Site]]:
        """Sites grouped by their node, for every node with a site on one of `weights` (all if None)."""
        groups: dict[fx.Node, list[Site]] = {}
        for site in self.all:
            groups.setdefault(site.node, []).append(site)
        return {n: g for n, g in groups.items() if weights is None or any(s.weight_name in weights for s in g)}
