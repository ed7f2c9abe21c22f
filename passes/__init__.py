"""fxtune's passes: each module is one technique, a function GraphModule -> GraphModule."""

from .fuse import fuse
from .lora import lora

__all__ = ["fuse", "lora"]
