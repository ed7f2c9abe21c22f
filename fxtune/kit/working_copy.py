"""What every pass starts from: its own copy of the GraphModule, the sites on it, read once.

`Rewrite` (adapter passes) and `Restructure` (structural passes) both build on it: the input
GraphModule is never touched, the copy's base weights are frozen, sites are discovered once per
pass, and the code is generated once, when the pass finishes.
"""

from __future__ import annotations

import torch
from torch import fx

from ..errors import FxtuneError
from ..graph.code_on_first_use import generate_code_on_first_use
from ..graph.discovery import site_table
from ..graph.ownership import clone_graph_module
from ..graph.selection import Selector, select_weights
from ..graph.sites import Site, SiteTable
from ..graph.weights import Weights


class WorkingCopy:
    """A pass's own copy of `gm` (input untouched, base frozen) and its sites."""

    error: type[FxtuneError] = FxtuneError  # what this kind of pass raises

    def __init__(self, gm: fx.GraphModule):
        if not isinstance(gm, fx.GraphModule):
            raise self.error(f"passes take a GraphModule (use fxtune.trace(model) first), got {type(gm).__name__}")
        self.gm = clone_graph_module(gm)
        self.store = Weights(self.gm)
        self._table: SiteTable | None = None

    @property
    def sites(self) -> SiteTable:
        """The copy's sites, found on first use and kept until a structural edit (`forget_sites`)."""
        if self._table is None:
            self._table = site_table(self.gm)
        return self._table

    def module_path(self, weight_name: str) -> str:
        """Where a weight's module is in this GraphModule (in a part of a model traced in parts, sites are
        named as in the whole model; their references are the part's own)."""
        return self.site(weight_name).use_ref.owner

    def forget_sites(self) -> None:
        """After an edit that changes which modules the graph calls, sites are found again when next read."""
        self._table = None
        self.store = Weights(self.gm)

    def select(self, targets: Selector = None, *, exclude: Selector = None) -> dict[str, list[Site]]:
        """Chosen sites grouped by the weight they use; shared weights come whole or not at all."""
        return select_weights(self.sites, targets, exclude=exclude)

    def site(self, weight_name: str) -> Site:
        """The first site of a weight: its `weight_ref` is how the weight's adapters see it."""
        return self.sites.first(weight_name, error=self.error)

    def weight(self, weight_name: str) -> torch.Tensor:
        """The current base weight in its canonical (out, in/groups, *kernel) view, detached (read it,
        never write it): e.g. the q rows of an in_proj_weight, an embedding's table transposed."""
        weight = self.store.read(self.site(weight_name).weight_ref)[0]
        if not weight.is_floating_point():
            raise self.error(
                f"'{weight_name}' has a weight of dtype {str(weight.dtype).removeprefix('torch.')}; fxtune's passes compute with "
                "floating-point weights. Dequantize the model first (e.g. model.float(), or your quantizer's "
                "dequantize()), or exclude this site: exclude=..."
            )
        return weight

    def bias(self, weight_name: str) -> torch.Tensor | None:
        """The current base bias of a weight (its rows, for q/k/v), detached, or None."""
        return self.store.read(self.site(weight_name).weight_ref)[1]

    def finish(self) -> fx.GraphModule:
        """Checks the graph and marks its code for generation on first use; returns the new GraphModule."""
        self.gm.graph.lint()
        generate_code_on_first_use(self.gm)
        return self.gm
