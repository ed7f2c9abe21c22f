"""Mixed-adapter batches: fxtune.batched vs PEFT's `model(x, adapter_names=[...])`, forward throughput.

Both libraries hold the same three LoRA adapters (r = 4, 8, 16; same A/B) on every linear/conv
site; each batch of 16 mixes the three adapters and the base model in a shuffled order.
Run: `python benchmarks/mixed_batches.py` (writes its section of benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics

import peft
import torch
import torchvision
from tabulate import tabulate
from torch import nn

import fxtune
from fxtune.passes import lora

import _common as common
from _common import interleaved, load, machine, paired_ratio

ADAPTERS = {"task1": 4, "task2": 8, "task3": 16}  # name -> r; alpha = 2r (scale 2)
BATCH = 16


class Block(nn.Module):
    """A transformer block's linear work without attention: qkv and output projections, MLP."""

    def __init__(self, d: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.proj(torch.tanh(q) * k + v)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class MLPStack(nn.Module):
    def __init__(self, d: int = 256, depth: int = 4, classes: int = 10):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(d) for _ in range(depth)])
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.blocks(x).mean(1))


def build(name: str, quick: bool) -> tuple[nn.Module, torch.Tensor, str]:
    torch.manual_seed(0)
    if name == "mlp_stack":
        tokens = 16 if quick else 64
        return MLPStack().eval(), torch.randn(BATCH, tokens, 256), f"4 blocks, d=256, {tokens} tokens"
    if name == "resnet18":
        size = 64 if quick else 224
        return torchvision.models.resnet18(weights=None).eval(), torch.randn(BATCH, 3, size, size), f"{size}×{size} images"
    raise SystemExit(f"unknown model {name!r}; choose from mlp_stack, resnet18")


def site_names(model: nn.Module) -> list[str]:
    return [s.target for s in fxtune.sites(fxtune.trace(model), lambda s: isinstance(s.module, (nn.Linear, nn.Conv2d)))]


def make_peft(model: nn.Module, names: list[str]) -> nn.Module:
    """PEFT with the three adapters on a copy of `model`, B random (it starts at zero)."""
    pm = None
    for adapter, r in ADAPTERS.items():
        config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=names)
        if pm is None:
            pm = peft.get_peft_model(copy.deepcopy(model), config, adapter_name=adapter)
        else:
            pm.add_adapter(adapter, config)
    with torch.no_grad():
        for module in pm.modules():
            if hasattr(module, "lora_B"):
                for b in module.lora_B.values():
                    b.weight.normal_(0.0, 0.02)
    return pm.eval()


def make_fxtune(model: nn.Module, names: list[str], pm: nn.Module) -> torch.fx.GraphModule:
    """The same adapters in fxtune (activation form, A/B copied from PEFT), not yet batched."""
    gm = fxtune.trace(model)
    for adapter, r in ADAPTERS.items():
        gm = lora(gm, targets=names, r=r, alpha=2 * r, adapter=adapter, form="activation")
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    with torch.no_grad():
        for target in names:
            for adapter in ADAPTERS:
                slot = gm.get_submodule(f"fxtune.{adapter}.{target.replace('.', '_')}")
                slot.lora_a.copy_(peft_layers[target].lora_A[adapter].weight)
                slot.lora_b.copy_(peft_layers[target].lora_B[adapter].weight)
    return gm


def bench_model(name: str, repeats: int, quick: bool) -> dict:
    model, x, shape = build(name, quick)
    names = site_names(model)
    pm = make_peft(model, names)
    gm = make_fxtune(model, names, pm)
    bm, generic = fxtune.batched(gm, list(ADAPTERS)).eval(), fxtune.batched(gm, list(ADAPTERS), form="weight").eval()
    g = torch.Generator().manual_seed(1)
    index = torch.arange(BATCH) % (len(ADAPTERS) + 1) - 1
    index = index[torch.randperm(BATCH, generator=g)]
    labels = ["__base__" if i < 0 else list(ADAPTERS)[i] for i in index.tolist()]
    order = torch.argsort(index, stable=True)
    x_sorted, index_sorted = x[order], index[order]
    with torch.no_grad():
        y_peft, y_fx, y_generic = pm(x, adapter_names=labels), bm(x, index), generic(x, index)
        y_base = model(x)
        check = ((y_fx - y_peft).abs().max() / y_peft.abs().max()).item()
        check_generic = ((y_generic - y_peft).abs().max() / y_peft.abs().max()).item()
        moved = ((y_peft - y_base).abs().max() / y_base.abs().max()).item()
        fns = {
            "base": lambda: model(x),
            "fxtune": lambda: bm(x, index),
            "fxtune, batch sorted by adapter": lambda: bm(x_sorted, index_sorted),
            "fxtune generic (form=\"weight\")": lambda: generic(x, index),
            "PEFT": lambda: pm(x, adapter_names=labels),
        }
        times = interleaved(fns, repeats)
    return {"model": name, "shape": shape, "sites": len(names), "check": check, "check_generic": check_generic,
            "moved": moved, "times": times}


def report(results: list[dict], args: argparse.Namespace, load_start: str) -> str:
    rows = []
    for r in results:
        t = r["times"]
        for who in [k for k in t if k != "base"]:
            rows.append([r["model"], who, f"{statistics.median(t[who]) * 1e3:.1f}", f"{BATCH / statistics.median(t[who]):.0f}",
                         f"{paired_ratio(t[who], t['base']):.2f}", f"{paired_ratio(t[who], t['PEFT']):.2f}"])
        rows.append([r["model"], "base model (no adapters)", f"{statistics.median(t['base']) * 1e3:.1f}",
                     f"{BATCH / statistics.median(t['base']):.0f}", "1.00", f"{paired_ratio(t['base'], t['PEFT']):.2f}"])
    table = tabulate(rows, headers=["model", "forward", "ms / batch", "samples / s", "÷ base", "÷ PEFT"],
                     tablefmt="github", disable_numparse=True)
    lines = [
        "## Mixed-adapter batches: fxtune.batched vs PEFT adapter_names (`benchmarks/mixed_batches.py`)",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- versions: torch {torch.__version__}, torchvision {torchvision.__version__}, peft {peft.__version__}, fxtune {fxtune.__version__}",
        f"- machine: {machine()}; load average (1/5/15 min) at start {load_start}, at end {load()}",
        f"- settings: CPU, float32, eval, no_grad, random weights; LoRA adapters task1..3 with r = 4, 8, 16 "
        f"(alpha = 2r) on every Linear/Conv2d in both libraries, same A/B; batch {BATCH} = 4 samples each of "
        f"task1..3 and the base, shuffled; {args.repeats} interleaved rounds, medians; ratios are medians of per-round ratios"
        + (" — QUICK smoke run, not representative" if args.quick else ""),
        "- fxtune: `fxtune.batched(gm, names)` with LoRA in activation form (PEFT's form); sorted: the same samples "
        "ordered by adapter (row groups are views, nothing gathered); generic: `form=\"weight\"`, every group "
        "calls the site with its own W + s·B@A (the path every adapter kind can take)",
    ]
    for r in results:
        lines.append(f"- {r['model']}: {r['shape']}, {r['sites']} sites; max|fxtune − PEFT| / max|PEFT| = {r['check']:.1e} "
                     f"(generic {r['check_generic']:.1e}; adapters move the output by {r['moved']:.1e} of max|base|)")
    return "\n".join(lines + ["", table, ""])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.run_options(ap, repeats=9, quick_repeats=3, quick="small inputs")
    ap.add_argument("--models", default="mlp_stack,resnet18", help="comma-separated: mlp_stack,resnet18")
    args = common.parse_run_options(ap, argv)
    load_start = load()
    results = common.each_model(args.models, lambda name: bench_model(name, args.repeats, args.quick))
    common.publish("mixed_batches", report(results, args, load_start), args)


if __name__ == "__main__":
    main()
