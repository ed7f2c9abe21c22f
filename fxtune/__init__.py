"""fxtune: torch.fx graph-rewriting passes for parameter-efficient fine-tuning and compression.

    gm = fxtune.trace(model)
    gm = lora(gm, targets="layer4.*", r=8)     # from fxtune.passes import lora, fuse
    fused = fuse(gm)                            # fused.code == fxtune.trace(model).code

The core is layered (see docs/architecture.md): frontends and graph, then adapters, the
pass-writing kit, io and compose, the command line; this module re-exports the public API.
"""

from typing import Any

from .adapter.batched import batched
from .adapter.distributed import data_parallel
from .adapter.hotswap import hotswap, live_source, prepare_hotswap
from .adapter.emitter import Emitter
from .adapter.kinds import AdapterKind, get_kind, register_kind, registered_kinds
from .adapter import fusion as _fusion
from .adapter import lifecycle as _lifecycle
from .adapter.lifecycle import AdapterInfo
from .adapter.parted import by_adapter, parted_adapters
from .adapter.slots import AdapterSlot
from .compose.pipeline import Pipeline
from .compose.registry import get_pass, pass_names, register_pass
from .compose.strategy import Strategy
from .errors import (
    AdapterError, ExportError, FusionError, FxtuneError, FxtuneWarning, SelectionError, StructureError, TraceError, warn,
)
from .frontends.trace import trace
from .graph.coverage import Coverage
from .graph import selection as _selection
from .graph.parts import is_parted, parted_sites
from .graph.selection import Selector
from .graph.sites import Site
from .inspection import coverage, diff, summary, trainable_parameters
from .io.adapter_files import load_adapters, save_adapters
from .io.export import export_onnx, export_program
from .io.graph_files import GraphFileError, load, save
from .io.peft_format import PeftFormat, PeftModule
from .io.swap_base import swap_base
from .kit import MaskSpec, Restructure, Rewrite, channel_groups, channel_masks, per_site, weight_mask
from .version import __version__


# The functions of a GraphModule below also take a model traced in parts (fxtune.trace(model, parts=[...])).
adapters = parted_adapters
set_active = by_adapter(_lifecycle.set_active, absent="empty")
delete_adapter = by_adapter(_lifecycle.delete_adapter, absent="keep")
merge = by_adapter(_lifecycle.merge, absent="keep")
unmerge = by_adapter(_lifecycle.unmerge, absent="keep")
unload = by_adapter(_lifecycle.unload, absent="keep")
fold = by_adapter(_fusion.fold, absent="empty")


def sites(gm, targets: Selector = None, *, exclude: Selector = None) -> list[Site]:
    """The call sites of gm chosen by `targets` minus `exclude`, in graph order (a model traced in parts:
    every part's). An empty choice, or an exact name that is not a site, is a SelectionError listing the sites."""
    if is_parted(gm):
        return parted_sites(gm, targets, exclude=exclude)
    return _selection.sites(gm, targets, exclude=exclude)


__all__ = [
    "AdapterError",
    "AdapterInfo",
    "AdapterKind",
    "AdapterSlot",
    "Coverage",
    "Emitter",
    "ExportError",
    "FusionError",
    "GraphFileError",
    "FxtuneError",
    "FxtuneWarning",
    "MaskSpec",
    "PeftFormat",
    "PeftModule",
    "Pipeline",
    "Restructure",
    "Rewrite",
    "SelectionError",
    "Selector",
    "Site",
    "Strategy",
    "StructureError",
    "TraceError",
    "adapters",
    "batched",
    "channel_groups",
    "channel_masks",
    "data_parallel",
    "coverage",
    "delete_adapter",
    "diff",
    "export_onnx",
    "export_program",
    "fold",
    "get_kind",
    "get_pass",
    "hotswap",
    "live_source",
    "load",
    "load_adapters",
    "merge",
    "pass_names",
    "per_site",
    "prepare_hotswap",
    "register_kind",
    "register_pass",
    "registered_kinds",
    "save",
    "save_adapters",
    "set_active",
    "sites",
    "summary",
    "swap_base",
    "trace",
    "train_module",
    "trainable_parameters",
    "unload",
    "unmerge",
    "warn",
    "weight_mask",
]


def __getattr__(name: str) -> Any:
    """Passes that are also core names (`fxtune.train_module`) come from the pass registry on first use."""
    if name == "train_module":
        return get_pass(name)
    raise AttributeError(f"module 'fxtune' has no attribute {name!r}")
