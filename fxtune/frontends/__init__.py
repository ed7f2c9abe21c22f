"""Front ends: a user's model in, a GraphModule fxtune owns out (symbolic tracing, torch.export).

`trace(model)` tries symbolic tracing (with timm's and torchvision's own FX registrations where plain
tracing stops), then torch.export on example inputs, and records which one it used (record.py).
May import the graph layer (ownership, discovery); never adapter, kit, io, compose or cli.
Everyday task that lands here: a model that does not trace, or a new way to trace one; the
error a user sees names their file and line (explain.py).
"""

from .trace import trace

__all__ = ["trace"]
