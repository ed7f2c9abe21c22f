"""What a GraphModule remembers about how it was traced: the front end used, and why.

`gm.meta["fxtune_frontend"]` is "fx" or "export"; `gm.meta["fxtune_trace"]` a small dict of plain
values (the libraries' tracing rules used, the leaf modules they added, the reason for a fallback).
"""

from __future__ import annotations

from torch import fx

FRONTEND = "fxtune_frontend"
TRACE_RECORD = "fxtune_trace"


def frontend_of(gm: fx.GraphModule) -> str | None:
    """The front end that traced `gm` ("fx" or "export"), or None for a graph fxtune did not trace."""
    meta = getattr(gm, "meta", None)
    return meta.get(FRONTEND) if isinstance(meta, dict) else None
