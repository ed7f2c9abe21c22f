"""`fxtune.channel_groups`: the base graph's coupled channel groups, whatever adapters it carries.

The analysis itself (graph/channels/) reads a graph without adapter code; this is the public entry
that takes any fxtune GraphModule, adapted or not, and gives it the base graph.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from ..adapter.strip import without_adapter_code
from ..errors import StructureError
from ..graph.channels.groups import ChannelGroups, analyse_channels


def channel_groups(gm: fx.GraphModule, *, example_inputs: Any = None) -> ChannelGroups:
    """The groups of channels that must be removed together, named by producing site, in graph order.

    Shapes come from the graph's metadata (torch.export graphs) or from running it once on fake
    copies of `example_inputs` (a symbolic trace records none). Adapters are ignored: the base graph
    is analysed. Prints as a table; `groups["layer1.0.conv1"]` prints one group's members.
    """
    if not isinstance(gm, fx.GraphModule):
        raise StructureError(f"channel_groups takes a GraphModule (use fxtune.trace(model) first), got {type(gm).__name__}")
    return analyse_channels(without_adapter_code(gm), example_inputs)
