"""fxtune.save / fxtune.load: a GraphModule as a directory of data — `graph.json` and `tensors.safetensors`.

`graph.json` holds the graph (nodes, call targets by qualified name, args, fxtune's node.meta),
the module tree (types, constructor arguments, flags, fxtune's records), `gm.meta` and the
class name; `tensors.safetensors` every tensor once (its SHA-256 is in `graph.json`). Loading
never unpickles and never evaluates file content: targets and module types come from an
allow-list (graph_targets.py), tensors are copied into fresh storage, and every field is
checked, so a hostile or damaged directory is refused with an error naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import fx

from ...errors import warn
from ..files import write_files
from .targets import Allowed, name_callable
from .values import GraphFileError, ValueCodec, check_fields, expect
from ...adapter.kinds import registered_kinds
from .module_tree import TreeReader, TreeWriter
from ...adapter.slots import all_slots
from .tensor_table import TensorReader, TensorWriter

FORMAT = "fxtune.graph"
FORMAT_VERSION = 1
GRAPH_NAME, TENSORS_NAME = "graph.json", "tensors.safetensors"


def save(gm: fx.GraphModule, path: str | os.PathLike) -> None:
    """Writes `gm` into the directory `path` (created if needed) as graph.json + tensors.safetensors.

    Works for any fxtune GraphModule (traced by either front end, adapted, fused, restructured);
    a function without an importable name, a module with hooks, or a called module that cannot
    be rebuilt from its attributes is a GraphFileError naming it.
    """
    if not isinstance(gm, fx.GraphModule):
        raise GraphFileError(f"fxtune.save expects a GraphModule (from fxtune.trace and passes), got {type(gm).__name__}")
    from ...version import __version__

    tensors = TensorWriter()
    codec = ValueCodec(callable=name_callable, tensor=tensors.add)
    module = TreeWriter(codec, tensors).graph_module(gm)
    os.makedirs(path, exist_ok=True)
    digest = {}

    def write_tensors(file: str) -> None:
        save_file(tensors.data, file, metadata={"format": FORMAT})
        digest["sha256"] = _sha256(file)

    def write_graph(file: str) -> None:
        document = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "fxtune_version": __version__,
            "torch_version": torch.__version__,
            "tensors": {"sha256": digest["sha256"], "data": tensors.entries, "objects": tensors.objects},
            "module": module,
        }
        with open(file, "w") as f:
            f.write(_pretty(document) + "\n")

    write_files(str(path), {TENSORS_NAME: write_tensors, GRAPH_NAME: write_graph})  # tensors first: the graph names their hash


def load(path: str | os.PathLike, *, allow: Iterable[Any] = ()) -> fx.GraphModule:
    """The GraphModule saved in directory `path`: same code, outputs, node.meta, adapters and flags.

    Call targets and module types must be allowed: torch, torch.nn.functional, torch.ops.aten,
    operator, math, a few builtins, torchvision.ops, fxtune's own functions and those of
    registered adapter kinds, torch.nn module types; `allow=` adds functions, classes, modules
    or qualified names (e.g. allow=['torchvision.models.swin_transformer']). Anything else, and
    any damaged or inconsistent content, is a GraphFileError; nothing from the files is run.
    """
    allowed = Allowed(allow)
    graph_file = os.path.join(path, GRAPH_NAME)
    document = _read_json(graph_file)
    check_fields(document, GRAPH_NAME, {"format": str, "format_version": int, "tensors": dict, "module": dict},
                 {"fxtune_version": str, "torch_version": str})
    if document["format"] != FORMAT:
        raise GraphFileError(f"{graph_file}: format {document['format']!r} is not an fxtune graph file ({FORMAT!r})")
    version = document["format_version"]
    if version > FORMAT_VERSION:
        raise GraphFileError(
            f"{graph_file} was written by a newer fxtune ({document.get('fxtune_version', '?')}, graph format version "
            f"{version}); this fxtune reads format version {FORMAT_VERSION}. Upgrade fxtune to load it"
        )
    if version < 1:
        raise GraphFileError(f"{graph_file}: format_version {version} does not exist")
    section = check_fields(document["tensors"], f"{GRAPH_NAME}.tensors", {"sha256": str, "data": dict, "objects": list})
    data = _read_tensors(os.path.join(path, TENSORS_NAME), section["sha256"])
    reader = TensorReader(section["objects"], section["data"], data, f"{GRAPH_NAME}.tensors")
    codec = ValueCodec(callable_back=allowed.function, tensor_back=reader.get)
    try:
        gm = TreeReader(codec, allowed, GRAPH_NAME).graph_module(document["module"])
    except RecursionError:
        raise GraphFileError(f"{graph_file}: nested too deeply to be a graph file") from None
    unknown = sorted({slot.kind for slot in all_slots(gm)} - set(registered_kinds()))
    if unknown:
        warn(
            f"{graph_file}: adapter kind(s) {unknown} are not registered, so fuse, merge and the other adapter "
            "functions cannot handle them; import the modules that define them (fxtune's own: import fxtune.passes)"
        )
    return gm


def _pretty(value: Any, indent: int = 0) -> str:
    """JSON with every object or list that fits in a line on one line (one node per line, typically)."""
    compact = json.dumps(value, allow_nan=False)
    if len(compact) + indent <= 160 or not isinstance(value, (dict, list)) or not value:
        return compact
    pad = " " * (indent + 1)
    if isinstance(value, list):
        items = [_pretty(v, indent + 1) for v in value]
        return "[\n" + ",\n".join(pad + item for item in items) + "\n" + " " * indent + "]"
    items = [f"{json.dumps(k)}: {_pretty(v, indent + 1)}" for k, v in value.items()]
    return "{\n" + ",\n".join(pad + item for item in items) + "\n" + " " * indent + "}"


def _read_json(file: str) -> Any:
    try:
        with open(file, "rb") as f:
            text = f.read().decode("utf-8")
        return json.loads(text, parse_constant=_no_constant)
    except FileNotFoundError:
        raise GraphFileError(f"{file} does not exist; fxtune.load reads a directory written by fxtune.save") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise GraphFileError(f"{file} is not valid JSON: {exc}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _read_tensors(file: str, sha256: str) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file, after checking its SHA-256 against the graph file."""
    try:
        with open(file, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise GraphFileError(f"{file} is missing; a graph directory holds {GRAPH_NAME} and {TENSORS_NAME}") from None
    if hashlib.sha256(raw).hexdigest() != expect(sha256, str, f"{GRAPH_NAME}.tensors.sha256"):
        raise GraphFileError(
            f"{file} is damaged or not the one saved with {GRAPH_NAME} (its SHA-256 differs; truncated or modified?)"
        )
    try:
        return load_safetensors(raw)
    except (SafetensorError, ValueError, RuntimeError, KeyError) as exc:
        raise GraphFileError(f"{file} is not a readable safetensors file: {exc}") from None


def _sha256(file: str) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
