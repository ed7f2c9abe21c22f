"""Commands on a saved GraphModule (`fxtune apply ... --out DIR` writes it to DIR/graph): show it, export it.

    fxtune show out/                                   # the sites of the saved GraphModule
    fxtune export out/ --pt2 model.pt2 --onnx model.onnx --input-shape 1,3,224,224
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import fx

from ..errors import FxtuneError
from ..graph.discovery import discover_sites
from ..io.export import export_onnx, export_program
from ..io.graph_files import load
from ..io.graph_files.store import GRAPH_NAME as GRAPH_FILE
from .options import example_input, input_dtype, parse_shape

GRAPH_DIR = "graph"  # where `apply --out DIR` puts the GraphModule


def graph_dir(path: str) -> str | None:
    """The directory holding a saved GraphModule: `path` itself, or `path/graph` (apply's --out); None if neither."""
    for candidate in (path, os.path.join(path, GRAPH_DIR)):
        if os.path.isfile(os.path.join(candidate, GRAPH_FILE)):
            return candidate
    return None


def load_saved(path: str, allow: list[str]) -> fx.GraphModule:
    """The GraphModule saved under `path`, loaded with fxtune.load (qualified names in `allow` allowed too)."""
    found = graph_dir(path)
    if found is None:
        raise FxtuneError(f"{path!r} holds no saved GraphModule ({GRAPH_FILE}, or {GRAPH_DIR}/{GRAPH_FILE}); "
                          "write one with fxtune.save(gm, DIR) or `fxtune apply ... --out DIR`")
    return load(found, allow=tuple(allow))


def _example(gm: fx.GraphModule, shape: tuple[int, ...], dtype_name: str, seed: int) -> torch.Tensor:
    """A reproducible input for a saved GraphModule: token ids when its first input feeds an embedding."""
    if dtype_name == "auto":  # a saved GraphModule has no config to ask (options.input_dtype); its graph says
        first = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
        tokens = any(s.layer == "embedding" and s.input is first for s in discover_sites(gm))
        dtype = torch.int64 if tokens else torch.float32
    else:
        dtype = input_dtype(dtype_name, gm)
    return example_input(gm, shape, dtype, seed)


def cmd_export(args: argparse.Namespace) -> None:
    """`fxtune export DIR --pt2 FILE [--onnx FILE] --input-shape ...`: checked exports of a saved GraphModule."""
    if not args.pt2 and not args.onnx:
        raise FxtuneError("fxtune export writes --pt2 FILE and/or --onnx FILE; give at least one")
    gm = load_saved(args.path, args.allow).eval()
    x = _example(gm, parse_shape(args.input_shape), args.input_dtype, args.seed)
    if args.pt2:
        program = export_program(gm, (x,), dynamic_batch=not args.static)
        torch.export.save(program, args.pt2)
        print(f"wrote {args.pt2} (torch.export program; checked against the GraphModule on an input of shape {tuple(x.shape)})")
    if args.onnx:
        export_onnx(gm, (x,), args.onnx, dynamic_batch=not args.static)
        print(f"wrote {args.onnx} (ONNX; checked against the GraphModule on an input of shape {tuple(x.shape)})")


def add_export_command(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="export a saved GraphModule (apply --out DIR) to torch.export and/or ONNX")
    export.add_argument("path", metavar="DIR", help="a directory written by `fxtune apply --out` or fxtune.save")
    export.add_argument("--pt2", metavar="FILE", help="write a torch.export program (torch.export.save)")
    export.add_argument("--onnx", metavar="FILE", help="write an ONNX file (needs the onnx extra)")
    export.add_argument("--input-shape", metavar="N,...", required=True, help="the example input's shape")
    export.add_argument("--input-dtype", default="auto", help="auto: int64 token ids if the first input feeds an embedding")
    export.add_argument("--static", action="store_true", help="fix the batch size instead of keeping dim 0 dynamic")
    export.add_argument("--allow", action="append", default=[], metavar="QUALNAME",
                        help="a function or module class the saved graph may name beyond fxtune's allow-list")
    export.add_argument("--seed", type=int, default=0)
    export.set_defaults(run=cmd_export)
