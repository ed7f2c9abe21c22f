"""Benchmark of structured pruning (`prune`) against Torch-Pruning on the same channels (random weights, CPU).

Per model and ratio: the groups fxtune finds prunable lose floor(ratio · units) units each, chosen
at random (seeded); Torch-Pruning's DependencyGraph removes the same channel indices from a copy of
the model. Both pruned models, and the original, run with the same settings (eval, channels_last
and BatchNorm folded with `fold_bn` for convnets), timed interleaved in one process. Reported:
parameters, MACs (torch.utils.flop_counter, whole forward), latency, speedup, fxtune ÷ Torch-Pruning
latency (target ≤ 1.02) and, for resnet50, speedup against 0.8 × the MAC reduction (the target).
Prints a table and writes the `pruning` section of benchmarks/RESULTS.md.

    python benchmarks/pruning.py                                     # full run
    python benchmarks/pruning.py --models resnet50 --ratios 0.3 --batch 1 --size 64 --repeats 2 --no-write
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import warnings

import torch
import torchvision
from tabulate import tabulate
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fxtune
from fxtune import channel_groups
from fxtune.passes import fold_bn
from fxtune.passes.prune import keep_count, prune

from _common import interleaved, load, machine, write_section

MODELS = {"resnet50": torchvision.models.resnet50, "mobilenet_v2": torchvision.models.mobilenet_v2,
          "vit_b_16": torchvision.models.vit_b_16}
CONVNETS = ("resnet50", "mobilenet_v2")


def build(name: str, size: int) -> nn.Module:
    torch.manual_seed(0)
    extra = {"image_size": size} if name.startswith("vit") else {}
    model = MODELS[name](weights=None, **extra).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # BatchNorms away from their (0, 1) defaults, so folding is no no-op; ViT's head non-zero
        if name.startswith("vit"):
            model.heads.head.weight.normal_(0, 0.02, generator=g)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def choose(groups, ratio: float, round_to: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keep masks (over channels) removing floor(ratio·units) random units of every prunable group."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for group in groups:
        if not group.prunable or group.units < 2:
            continue
        keep = keep_count(group.units, ratio, group.unit_size, round_to)
        units = torch.zeros(group.units, dtype=torch.bool)
        units[torch.randperm(group.units, generator=g)[:keep]] = True
        if not bool(units.all()):
            masks[group.name] = units[group.channel_units]
    return masks


def torch_pruning(model: nn.Module, masks: dict[str, torch.Tensor], x: torch.Tensor) -> nn.Module:
    """A copy of `model` with the same channels removed by Torch-Pruning's dependency graph."""
    import torch_pruning as tp

    theirs = copy.deepcopy(model)
    graph = tp.DependencyGraph().build_dependency(theirs, example_inputs=x)
    for name, keep in masks.items():
        module = theirs.get_submodule(name)
        prune_fn = tp.prune_conv_out_channels if isinstance(module, nn.Conv2d) else tp.prune_linear_out_channels
        graph.get_pruning_group(module, prune_fn, idxs=(~keep).nonzero().flatten().tolist()).prune()
    return theirs


def macs(model: nn.Module, x: torch.Tensor) -> int:
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops() // 2


def deployed(model: nn.Module, name: str, channels_last: bool) -> nn.Module:
    """The form every contender is timed in: traced, BatchNorm folded (convnets), channels_last if asked."""
    gm = model if isinstance(model, torch.fx.GraphModule) else fxtune.trace(model)
    if name in CONVNETS:
        gm = fold_bn(gm.eval())
    return gm.to(memory_format=torch.channels_last) if channels_last and name in CONVNETS else gm


def run(name: str, ratio: float, round_to: int, args) -> dict:
    model = build(name, args.size)
    x = torch.randn(args.batch, 3, args.size, args.size)
    gm = fxtune.trace(model)
    groups = channel_groups(gm, example_inputs=(x,))
    masks = choose(groups, ratio, round_to)
    ours = prune(gm, masks=masks, example_inputs=(x,))
    theirs = torch_pruning(model, masks, x)
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    agreement = float((a - b).abs().max() / b.abs().max())
    contenders = [deployed(m, name, args.channels_last) for m in (gm, ours, theirs)]
    xl = x.to(memory_format=torch.channels_last) if args.channels_last and name in CONVNETS else x
    with torch.inference_mode():
        for _ in range(max(0, args.warmup - 1)):
            for m in contenders:
                m(xl)
        times = interleaved({str(i): (lambda m=m: m(xl)) for i, m in enumerate(contenders)}, args.repeats)
    t = [times[str(i)] for i in range(3)]
    return {
        "model": name, "ratio": ratio, "round_to": round_to, "groups": f"{len(masks)}/{len(groups)}",
        "params": [sum(p.numel() for p in m.parameters()) for m in (model, ours, theirs)],
        "macs": [macs(m, x) for m in (model, ours, theirs)],
        "latency": [statistics.median(s) for s in t],
        "speedup": statistics.median(b / o for b, o in zip(t[0], t[1])),
        "vs_tp": statistics.median(o / p for o, p in zip(t[1], t[2])),
        "agreement": agreement,
    }


def table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        (p0, p1, p2), (m0, m1, m2), (t0, t1, t2) = r["params"], r["macs"], r["latency"]
        reduction = m0 / m1
        target = f"{'yes' if r['speedup'] >= 0.8 * reduction else 'no'} (needs ≥ {0.8 * reduction:.2f}×)" if r["model"] == "resnet50" else "-"
        out.append([
            r["model"], r["ratio"], r["round_to"], r["groups"], f"{p0 / 1e6:.2f}M → {p1 / 1e6:.2f}M (TP {p2 / 1e6:.2f}M)",
            f"{m0 / 1e9:.2f} → {m1 / 1e9:.2f} ({reduction:.2f}× fewer; TP {m2 / 1e9:.2f})",
            f"{t0 * 1e3:.1f} → {t1 * 1e3:.1f} (TP {t2 * 1e3:.1f})", f"{r['speedup']:.2f}×",
            f"{r['vs_tp']:.3f} ({'ok' if r['vs_tp'] <= 1.02 else 'above 1.02'})", target, f"{r['agreement']:.1e}",
        ])
    headers = ["model", "ratio", "round_to", "groups pruned", "params", "GMACs", "latency ms", "speedup", "fxtune ÷ TP latency",
               "speedup ≥ 0.8 × MAC reduction", "max |fxtune − TP| / max |TP|"]
    return tabulate(out, headers=headers, tablefmt="github")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--round-to", nargs="+", type=int, default=[1, 16],
                        help="kept channels per group rounded up to multiples of these (one row each)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="torch_pruning")
    rows = [run(name, ratio, round_to, args) for name in args.models for ratio in args.ratios for round_to in args.round_to]
    text = (
        f"## pruning: fxtune `prune` vs Torch-Pruning on the same channels (`benchmarks/pruning.py`)\n\n"
        f"{datetime.date.today().isoformat()} · torch {torch.__version__} · torchvision {torchvision.__version__} · {machine()}, load {load()}\n"
        f"batch {args.batch} at {args.size}×{args.size}, median of {args.repeats} forwards after {args.warmup} warm-up "
        f"(interleaved: original, fxtune, Torch-Pruning), random weights; convnets with "
        f"BatchNorm folded{' and channels_last' if args.channels_last else ''} on all three."
        f"{' Few repeats: a sanity run, not final numbers.' if args.repeats < 10 else ''}\n\n"
        f"{table(rows)}\n\n"
        "Each prunable group (fxtune's `channel_groups`) loses floor(ratio · units) random units, fewer where round_to "
        "rounds the kept channels up to its multiples (CPU kernels run those faster); Torch-Pruning removes "
        "the same channel indices through `DependencyGraph.get_pruning_group(producer, idxs)`. vit_b_16's residual "
        "stream passes through `nn.MultiheadAttention` (opaque to both), so only its 12 MLP hidden groups are pruned. "
        "Targets: fxtune ÷ Torch-Pruning latency ≤ 1.02; resnet50 speedup ≥ 0.8 × MAC reduction.\n"
    )
    print(text)
    if not args.no_write:
        write_section("pruning", text)


if __name__ == "__main__":
    main()
