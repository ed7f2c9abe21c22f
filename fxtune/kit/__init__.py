"""The pass-writing kit: everything a technique's file in passes/ needs from the core.

Holds `Rewrite` (adapter passes) and `Restructure` (structural passes) on one base,
`WorkingCopy`; per-site settings; channel masks; the pieces several kinds share (factored
deltas); and structured pruning's kit: `channel_groups` on any GraphModule, importance per
removable unit, and `remove_channels` (slicing layers, adapters and literal sizes together). May import the graph and adapter layers; never io, compose or cli. Everyday task that
lands here: a pass needs something the core lacks — add it here once, not in two passes.
"""

from ..graph.selection import name_chosen
from .channel_groups import channel_groups
from .channel_importance import unit_importance
from .channel_surgery import remove_channels
from .factored import (
    branch_is_cheaper, checked_fraction, factored_down, plus_factored, rank_and_scale, rank_and_scale_problems, scale_of,
)
from .masks import MaskSpec, centre_tap, channel_masks, masked_bias, weight_mask
from .restructure import Restructure
from .rewrite import Rewrite
from .settings import per_site
from .working_copy import WorkingCopy

__all__ = [
    "MaskSpec", "Restructure", "Rewrite", "WorkingCopy", "branch_is_cheaper", "centre_tap", "channel_groups", "channel_masks",
    "checked_fraction", "factored_down", "masked_bias", "name_chosen", "per_site", "plus_factored", "rank_and_scale", "rank_and_scale_problems", "remove_channels", "scale_of",
    "unit_importance", "weight_mask",
]
