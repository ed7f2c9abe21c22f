"""The structured-pruning-adapters path of docs/pruning.md, measured: SPLoRA under channel masks → train →
fuse → prune → fold_bn, on resnet18 (random weights and data, CPU).

Prints the numbers the docs quote: parameters and MACs of the model before and after, CPU latency of
the BN-folded original and of the pruned, BN-folded model (interleaved, channels_last for both), and
how far the pruned model is from the fused one with the removed channels' BatchNorms zeroed.

    python benchmarks/pruning_path.py                 # full run
    python benchmarks/pruning_path.py --repeats 2 --steps 2 --size 64
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import fxtune
from fxtune import channel_groups
from fxtune.passes import fold_bn, fuse, sp_lora
from fxtune.passes import prune

from _common import interleaved, load, machine


def macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


def keep_half_by_norm(groups, gm) -> dict[str, torch.Tensor]:
    """Per prunable group, keep the half of its channels whose producer rows have the larger L2 norm."""
    keep = {}
    for group in groups:
        if not group.prunable:
            continue
        rows = next(m for m in group.members if m.role == "out" and m.name == f"{group.name}.weight")
        norms = gm.get_parameter(rows.name).detach().flatten(1).norm(dim=1)
        mask = torch.zeros(group.channels, dtype=torch.bool)
        mask[norms.argsort(descending=True)[: group.channels // 2]] = True
        keep[group.name] = mask
    return keep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(args.batch, 3, args.size, args.size)
    gm = fxtune.trace(model)
    groups = channel_groups(gm, example_inputs=(x,))
    keep = keep_half_by_norm(groups, gm)
    adapted = sp_lora(gm, r=8, masks=groups.site_masks(keep))
    opt = torch.optim.AdamW(fxtune.trainable_parameters(adapted), lr=1e-3)
    labels = torch.randint(0, 10, (args.batch,))
    for _ in range(args.steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(adapted(x), labels).backward()
        opt.step()
    fused = fuse(adapted).eval()
    small = fold_bn(prune(fused, masks=keep, example_inputs=(x,)).eval())
    base = fold_bn(fxtune.trace(model.eval()))
    with torch.no_grad():
        reference = prune(fused, masks=keep, example_inputs=(x,))(x)
        difference = float((small(x) - reference).abs().max() / reference.abs().max())
    models = [m.to(memory_format=torch.channels_last) for m in (base, small)]
    xl = x.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        times = interleaved({"base": lambda: models[0](xl), "small": lambda: models[1](xl)}, args.repeats)
    t0, t1 = statistics.median(times["base"]), statistics.median(times["small"])
    speedup = statistics.median(a / b for a, b in zip(times["base"], times["small"]))
    p0, p1 = sum(p.numel() for p in base.parameters()), sum(p.numel() for p in small.parameters())
    m0, m1 = macs(base, x), macs(small, x)
    print(f"{machine()}, load {load()}; batch {args.batch} at {args.size}×{args.size}, {args.steps} SPLoRA steps, "
          f"median of {args.repeats} interleaved forwards, channels_last, BatchNorm folded in both")
    print(f"groups pruned: {len(keep)} of {len(groups)} (half the channels of each)")
    print(f"parameters: {p0:,} → {p1:,} ({p1 / p0:.2f}×)")
    print(f"MACs: {m0 / 1e9:.2f}G → {m1 / 1e9:.2f}G ({m0 / m1:.2f}× fewer)")
    print(f"latency: {t0 * 1e3:.1f} ms → {t1 * 1e3:.1f} ms ({speedup:.2f}× faster)")
    print(f"fold_bn changed the pruned model's output by {difference:.1e} (relative)")


if __name__ == "__main__":
    main()
