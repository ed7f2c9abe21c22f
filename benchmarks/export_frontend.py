"""fxtune's export front end beside plain `torch.export.export`: the time to trace three timm models.

`fxtune.trace(model, frontend="export", example_inputs=(x,))` runs torch.export on a module tree it
owns, then re-hosts `ep.module()`'s graph on it; with static shapes (the default) it should cost
about what `torch.export.export` costs (target ≤ 2×). `--all-dims` adds the old front end's setting,
every input dimension `Dim.AUTO` (`dynamic=True`), which took ~100× as long.
Run: `python benchmarks/export_frontend.py` (writes its section of benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import warnings

import timm
import torch
import torchvision
from tabulate import tabulate

import fxtune

import _common as common
from _common import checkout, interleaved, load, machine, paired_ratio

# Three of the timm families issue 11 found symbolic tracing stopping on: EfficientViT (an autocast region
# in its export graph, which crashed the old front end), FasterNet (a forward picked in __init__), ViT.
MODELS = ("efficientvit_b0", "fasternet_t0", "vit_small_patch16_224")


def build(name: str, size: int | None) -> tuple[torch.nn.Module, torch.Tensor]:
    """A timm model with random weights in eval mode and one example image at its input size (or `size`;
    models with a fixed input size are then built for it)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    if size and model.pretrained_cfg.get("fixed_input_size"):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, img_size=size).eval()
    side = size or model.pretrained_cfg["input_size"][-1]
    return model, torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(1))


def contenders(model: torch.nn.Module, x: torch.Tensor, all_dims: bool) -> dict:
    """The calls timed side by side: plain export, plain export then `.module()`, fxtune's front end."""
    fns = {
        "torch.export.export": lambda: torch.export.export(model, (x,)),
        "torch.export.export + .module()": lambda: torch.export.export(model, (x,)).module(),
        "fxtune.trace(frontend='export')": lambda: fxtune.trace(model, frontend="export", example_inputs=(x,)),
    }
    if all_dims:
        fns["fxtune.trace(..., dynamic=True)"] = lambda: fxtune.trace(model, frontend="export", example_inputs=(x,), dynamic=True)
    return fns


def bench_model(name: str, repeats: int, size: int | None, all_dims: bool) -> dict:
    model, x = build(name, size)
    with torch.no_grad():
        expected = model(x)
        traced = fxtune.trace(model, frontend="export", example_inputs=(x,))
        same = torch.equal(traced(x), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's notes on every call
        times = interleaved(contenders(model, x, all_dims), repeats)
    params = sum(p.numel() for p in model.parameters())
    return {"model": name, "input": tuple(x.shape), "params": params, "sites": len(fxtune.sites(traced)),
            "same": same, "times": times}


def report(results: list[dict], args: argparse.Namespace, load_start: str) -> str:
    rows = []
    for r in results:
        t = r["times"]
        base = t["torch.export.export"]
        for who, seconds in t.items():
            rows.append([r["model"], who, f"{statistics.median(seconds):.2f}", f"{paired_ratio(seconds, base):.2f}×"])
    table = tabulate(rows, headers=["model", "call", "s (median)", "÷ torch.export.export"], tablefmt="github",
                     disable_numparse=True)
    lines = [
        "## Export front end vs torch.export.export (`benchmarks/export_frontend.py`)",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- versions: torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
        f"fxtune {fxtune.__version__} ({checkout()})",
        f"- machine: {machine()}; load average (1/5/15 min) at start {load_start}, at end {load()}",
        f"- settings: CPU, eval, random weights, one example image, static shapes; {args.repeats} interleaved rounds "
        "after one warm-up call each, medians; ratios are medians of per-round ratios"
        + (" — QUICK smoke run, not representative" if args.quick else ""),
    ]
    for r in results:
        lines.append(f"- {r['model']}: input {'×'.join(map(str, r['input']))}, {r['params']:,} parameters, "
                     f"{r['sites']} sites; traced output equals the model's: {r['same']}")
    return "\n".join(lines + ["", table, ""])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.run_options(ap, repeats=5, quick_repeats=1, quick="1 round")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated timm model names")
    ap.add_argument("--size", type=int, default=None, help="input side in pixels (default: each model's own)")
    ap.add_argument("--all-dims", action="store_true", help="also time dynamic=True (every dim Dim.AUTO; slow)")
    args = common.parse_run_options(ap, argv)
    load_start = load()
    results = common.each_model(args.models, lambda name: bench_model(name, args.repeats, args.size, args.all_dims))
    common.publish("export_frontend", report(results, args, load_start), args)


if __name__ == "__main__":
    main()
