"""fxtune's passes: each module is one technique, a function GraphModule -> GraphModule.

Each registers its pass (and its adapter kind) with the core when imported, so strategies and the
command line can name it.
"""

from .dora import dora
from .fold_bn import fold_bn
from .fuse import fuse
from .ia3 import ia3
from .lora import lora
from .low_rank import low_rank
from .prune import prune
from .slice_delta import slice_delta
from .sp_lopa import sp_lopa
from .sp_lora import sp_lora
from .sp_para import sp_para
from .svdiff import svdiff
from .train_module import train_module

__all__ = ["dora", "fold_bn", "fuse", "ia3", "lora", "low_rank", "prune", "slice_delta", "sp_lopa", "sp_lora", "sp_para", "svdiff", "train_module"]
