"""The `fxtune` command: show, apply, demo. The top layer: it may use everything, passes through the registry."""

from .command import main

__all__ = ["main"]
