"""fxtune: torch.fx graph-rewriting passes for parameter-efficient fine-tuning and compression.

    gm = fxtune.trace(model)
    gm = lora(gm, targets="layer4.*", r=8)     # from fxtune.passes import lora, fuse
    fused = fuse(gm)                            # fused.code == fxtune.trace(model).code
"""

from .adapter_files import load_adapters, save_adapters
from .batched import batched
from .coverage import Coverage, coverage
from .edit import Rewrite
from .emit import Emitter
from .errors import AdapterError, FusionError, FxtuneError, FxtuneWarning, SelectionError, TraceError, warn
from .folding import fold
from .inspection import diff, summary, trainable_parameters
from .kinds import AdapterKind, get_kind, register_kind
from .masks import channel_masks, weight_mask
from .lifecycle import AdapterInfo, adapters, delete_adapter, merge, set_active, unload, unmerge
from .pipeline import Pipeline
from .rebase import swap_base
from .selection import sites
from .settings import per_site
from .sites import Site
from .slots import AdapterSlot
from .strategy import Strategy
from .structure import Restructure, StructureError
from .tracing import trace
from .train_module import train_module

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "AdapterInfo",
    "adapters",
    "batched",
    "Coverage",
    "coverage",
    "load_adapters",
    "save_adapters",
    "delete_adapter",
    "merge",
    "per_site",
    "set_active",
    "swap_base",
    "train_module",
    "unload",
    "unmerge",
    "AdapterKind",
    "AdapterSlot",
    "Emitter",
    "FusionError",
    "FxtuneError",
    "FxtuneWarning",
    "Pipeline",
    "Restructure",
    "Rewrite",
    "StructureError",
    "Strategy",
    "SelectionError",
    "Site",
    "TraceError",
    "channel_masks",
    "diff",
    "fold",
    "get_kind",
    "register_kind",
    "sites",
    "summary",
    "trace",
    "trainable_parameters",
    "warn",
    "weight_mask",
]
