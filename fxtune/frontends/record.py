"""What a GraphModule remembers about how it was traced: the front end used, and why.

`gm.meta["fxtune_frontend"]` is "fx" or "export"; `gm.meta["fxtune_trace"]` a small dict of plain
values (the libraries' tracing rules used, the leaf modules they added, the reason for a fallback).
"""

from __future__ import annotations

FRONTEND = "fxtune_frontend"
TRACE_RECORD = "fxtune_trace"

