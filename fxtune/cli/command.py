"""The `fxtune` command: show a model's sites, apply passes to it, or run the demo.

    fxtune show torchvision:resnet18
    fxtune apply torchvision:resnet18 --pass lora:r=8,targets=layer4.* --pass fuse --summary --diff
    fxtune demo
"""

from __future__ import annotations

import argparse
import functools
import inspect
import sys
from typing import Any

import torch

from ..compose.pipeline import Pipeline
from ..compose.registry import get_pass, pass_options
from ..errors import FxtuneError
from ..frontends.trace import trace
from ..inspection import diff, summary
from .model_specs import DEFAULT_MODEL, load_model


def _value(text: str) -> Any:
    """A CLI option value: int, float, true/false/none, a `;`-separated list, else the string."""
    if ";" in text:
        return [_value(t) for t in text.split(";") if t]
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_pass(spec: str) -> functools.partial:
    """`lora:r=8,targets=layer4.*` -> functools.partial(lora, r=8, targets="layer4.*")."""
    name, _, options = spec.partition(":")
    fn = get_pass(name)
    kwargs = {}
    for item in filter(None, options.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise FxtuneError(f"pass option {item!r} in {spec!r} should be key=value")
        kwargs[key.strip()] = _value(value.strip())
    try:
        inspect.signature(fn).bind_partial(None, **kwargs)
    except TypeError:
        options = pass_options(fn)
        raise FxtuneError(f"pass {name!r} has no option among {sorted(kwargs)}; its options: {', '.join(options)}") from None
    return functools.partial(fn, **kwargs)


def _input_shape(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(","))


def cmd_show(args: argparse.Namespace) -> None:
    gm = trace(load_model(args.model))
    print(summary(gm))
    if args.code:
        print(gm.code)


def cmd_apply(args: argparse.Namespace) -> None:
    model = load_model(args.model).eval()
    traced = trace(model)
    pipeline = Pipeline([parse_pass(p) for p in args.passes])
    result = pipeline.run(traced)
    print(pipeline.report())
    if args.summary:
        print()
        print(summary(result))
    if args.diff:
        print()
        print(diff(traced, result) or "(generated code identical to the traced model's)")
    if args.input_shape:
        x = torch.randn(_input_shape(args.input_shape))
        with torch.no_grad():
            err = (result.eval()(x) - model(x)).abs().max().item()
        print(f"\nmax |result - model| on a random input of shape {tuple(x.shape)}: {err:.3g}")


def cmd_demo(args: argparse.Namespace) -> None:
    from ..cli.demo import run_demo

    run_demo(steps=args.steps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxtune", description="torch.fx passes for parameter-efficient fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="trace a model and list its call sites")
    show.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="torchvision:NAME or package.module:factory")
    show.add_argument("--code", action="store_true", help="also print the traced code")
    show.set_defaults(run=cmd_show)
    apply = sub.add_parser("apply", help="trace a model and run passes on it")
    apply.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    apply.add_argument("--pass", dest="passes", action="append", required=True, metavar="NAME[:k=v,...]",
                       help="a pass and its options, e.g. lora:r=8,targets=layer4.*; repeat to chain")
    apply.add_argument("--summary", action="store_true", help="print the sites table of the result")
    apply.add_argument("--diff", action="store_true", help="print the code diff traced -> result")
    apply.add_argument("--input-shape", metavar="N,C,H,W", help="run result and model on a random input and compare")
    apply.set_defaults(run=cmd_apply)
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
