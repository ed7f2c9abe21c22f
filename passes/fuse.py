"""fuse: fold adapters into constant weights and restore the traced code (`fused.code == traced.code`)."""

from __future__ import annotations

from typing import Iterable

from torch import fx

import fxtune


@fxtune.register_pass(parts="whole")  # fxtune.fold handles models traced in parts itself
def fuse(gm: fx.GraphModule, adapters: Iterable[str] | str | None = None) -> fx.GraphModule:
    """A new GraphModule with the active (or the named) adapters folded in and every adapter gone."""
    return fxtune.fold(gm, adapters)
