"""The `fxtune` command: show a model's sites, apply passes to it, or run the demo.

    fxtune show torchvision:resnet18
    fxtune apply torchvision:resnet18 --pass lora:r=8,targets=layer4.* --pass fuse --summary --diff
    fxtune apply transformers:GPT2Config --model-kwargs n_layer=2,n_embd=64 --input-shape 2,16 --pass lora:r=4 --out out/
    fxtune show out/                     # a saved GraphModule (apply --out writes it to out/graph)
    fxtune export out/ --pt2 model.pt2 --onnx model.onnx --input-shape 2,16
    fxtune demo
"""

from __future__ import annotations

import argparse
import functools
import inspect
import sys

import torch
from torch import fx, nn

from ..compose.pipeline import Pipeline
from ..compose.registry import get_pass, pass_options
from ..errors import FxtuneError
from ..frontends.trace import trace
from ..inspection import diff, summary
from ..version import __version__
from .model_specs import DEFAULT_MODEL, FORMS, default_frontend, load_model
from .options import example_input, input_dtype, parse_keywords, parse_shape, parse_value
from .results import change_report, write_result
from .saved import add_export_command, graph_dir, load_saved


def parse_pass(spec: str) -> functools.partial:
    """`lora:r=8,targets=layer4.*` -> functools.partial(lora, r=8, targets="layer4.*")."""
    name, _, options = spec.partition(":")
    fn = get_pass(name)
    kwargs = {}
    for item in filter(None, options.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise FxtuneError(f"pass option {item!r} in {spec!r} should be key=value")
        kwargs[key.strip()] = parse_value(value.strip())
    try:
        inspect.signature(fn).bind_partial(None, **kwargs)
    except TypeError:
        options = pass_options(fn)
        raise FxtuneError(f"pass {name!r} has no option among {sorted(kwargs)}; its options: {', '.join(options)}") from None
    return functools.partial(fn, **kwargs)


def _traced(args: argparse.Namespace) -> tuple[nn.Module, fx.GraphModule, torch.Tensor | None]:
    """(model, its GraphModule, the example input or None), as the common options ask."""
    torch.manual_seed(args.seed)  # random weights and adapter inits, reproducible run to run
    model = load_model(args.model, parse_keywords(args.model_kwargs, "--model-kwargs")).eval()
    x = None
    if args.input_shape:
        x = example_input(model, parse_shape(args.input_shape), input_dtype(args.input_dtype, model))
    frontend = default_frontend(args.model) if args.frontend == "auto" else args.frontend
    if frontend == "export":
        if x is None:
            raise FxtuneError("--frontend export runs the model once on an example input: give --input-shape, e.g. "
                              "2,16 for token ids or 1,3,224,224 for images")
        return model, trace(model, frontend="export", example_inputs=(x,)), x
    return model, trace(model, frontend=frontend), x


def cmd_show(args: argparse.Namespace) -> None:
    if graph_dir(args.model) is not None:
        gm = load_saved(args.model, args.allow)
    else:
        _, gm, _ = _traced(args)
    print(summary(gm))
    if args.code:
        print(gm.code)


def cmd_apply(args: argparse.Namespace) -> None:
    model, traced, x = _traced(args)
    pipeline = Pipeline([parse_pass(p) for p in args.passes])
    result = pipeline.run(traced)
    print(pipeline.report())
    if args.summary:
        print()
        print(summary(result))
    if args.diff:
        print()
        print(diff(traced, result) or "(generated code identical to the traced model's)")
    if x is not None:
        print()
        print("\n".join(change_report(model, result, x)))
    if args.out:
        written = write_result(result, args.out, format=args.format, overwrite=args.overwrite)
        print("\nwrote " + "\nwrote ".join(written))


def cmd_demo(args: argparse.Namespace) -> None:
    from ..cli.demo import run_demo

    run_demo(steps=args.steps)


def _model_options() -> argparse.ArgumentParser:
    """The options `show` and `apply` share: which model, how to build it, how to trace it."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                        help=f"{FORMS} (default {DEFAULT_MODEL}); for show, also a directory a GraphModule was saved in")
    common.add_argument("--model-kwargs", metavar="JSON|k=v,...",
                        help='keyword arguments for the model (or its config): {"num_classes": 10} or n_layer=2,n_embd=64')
    common.add_argument("--frontend", choices=("auto", "fx", "export"), default="auto",
                        help="fx = symbolic tracing, export = torch.export on the example input "
                             "(auto: export for transformers:..., fx otherwise)")
    common.add_argument("--input-shape", metavar="N,C,H,W",
                        help="an example input's shape (export traces on it; apply compares result and model on it)")
    common.add_argument("--input-dtype", default="auto",
                        help="the example input's dtype; integer dtypes draw token ids below the vocabulary size "
                             "(auto: int64 for models with config.vocab_size, else float32)")
    common.add_argument("--seed", type=int, default=0, help="seed of the random weights, adapter inits and input (default 0)")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxtune", description="torch.fx passes for parameter-efficient fine-tuning")
    parser.add_argument("--version", action="version", version=f"fxtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    common = _model_options()
    show = sub.add_parser("show", parents=[common], help="trace a model and list its call sites")
    show.add_argument("--code", action="store_true", help="also print the traced code")
    show.add_argument("--allow", action="append", default=[], metavar="QUALNAME",
                      help="for a saved GraphModule: a function or module class its graph may name beyond fxtune's allow-list")
    show.set_defaults(run=cmd_show)
    apply = sub.add_parser("apply", parents=[common], help="trace a model and run passes on it")
    apply.add_argument("--pass", dest="passes", action="append", required=True, metavar="NAME[:k=v,...]",
                       help="a pass and its options, e.g. lora:r=8,targets=layer4.*; repeat to chain")
    apply.add_argument("--summary", action="store_true", help="print the sites table of the result")
    apply.add_argument("--diff", action="store_true", help="print the code diff traced -> result")
    apply.add_argument("--out", metavar="DIR", help="write the result into DIR: the GraphModule (DIR/graph, fxtune.save) and "
                       "its adapters (the 'default' one into DIR, others into DIR/NAME)")
    apply.add_argument("--format", choices=("fxtune", "peft"), default="fxtune", help="adapter file format for --out")
    apply.add_argument("--overwrite", action="store_true", help="with --out: replace another format's files there")
    apply.set_defaults(run=cmd_apply)
    add_export_command(sub)
    demo = sub.add_parser("demo", help="trace, LoRA, train a few steps, fuse and verify resnet18")
    demo.add_argument("--steps", type=int, default=8)
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except FxtuneError as exc:
        print(f"fxtune: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
