"""Benchmark of the low_rank pass on torchvision resnet50 and vit_b_16 (random weights, CPU).

Per model: parameters, FLOPs (torch.utils.flop_counter, whole forward), CPU latency of the
original and the factored GraphModule measured interleaved in one process, and the time to
factorize. Prints a table and writes the `low_rank` section of benchmarks/RESULTS.md.

    python benchmarks/low_rank.py                      # full run
    python benchmarks/low_rank.py --repeats 2 --no-write   # quick sanity run
"""

from __future__ import annotations

import argparse
import collections
import datetime
import statistics
import time
import warnings

import torch
import torchvision
from tabulate import tabulate
from torch.utils.flop_counter import FlopCounterMode

import fxtune
from fxtune.passes import fold_bn, low_rank

from _common import interleaved, load, machine, write_section

MODELS = {"resnet50": torchvision.models.resnet50, "vit_b_16": torchvision.models.vit_b_16}


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Total FLOPs of one forward; MHA's fused inference kernel is switched off, as the counter cannot see into it."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops()


def latencies(models: list[torch.nn.Module], x: torch.Tensor, repeats: int, warmup: int) -> list[float]:
    """Median seconds per forward of each model, timed in alternation so load affects all alike."""
    with torch.inference_mode():
        for _ in range(max(0, warmup - 1)):  # interleaved() warms up once itself
            for model in models:
                model(x)
        times = interleaved({str(i): (lambda m=m: m(x)) for i, m in enumerate(models)}, repeats)
    return [statistics.median(t) for t in times.values()]


# (label, round_to, channels_last, fold BatchNorms): the pass's defaults; the layout and ranks CPU kernels
# run fastest; and that deployed as inference models are, with BatchNorm folded into the convs of both
# the original (the baseline) and the factored model, `low_rank(fold_bn(gm))`
CONFIGS = {
    "plain": ("NCHW, exact ranks", 1, False, False),
    "tuned": ("channels_last, round_to=16", 16, True, False),
    "deployed": ("channels_last, round_to=16, BN folded in both", 16, True, True),
}


def run(name: str, rank: float, batch: int, repeats: int, warmup: int, config: str) -> dict | None:
    label, round_to, channels_last, fold = CONFIGS[config]
    torch.manual_seed(0)
    model = MODELS[name](weights=None).eval()
    if fold and not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return None  # nothing to fold: the same as "tuned"
    traced = fold_bn(fxtune.trace(model)) if fold else fxtune.trace(model)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", fxtune.FxtuneWarning)
        factored = low_rank(traced, rank=rank, round_to=round_to).eval()
    seconds = time.perf_counter() - start
    tags = [n.meta["fxtune_structure"] for n in factored.graph.nodes if n.meta.get("fxtune_structure", {}).get("index") == 0]
    x = torch.randn(batch, 3, 224, 224)
    if channels_last:
        traced, factored = traced.to(memory_format=torch.channels_last), factored.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    base_lat, lr_lat = latencies([traced, factored], x, repeats, warmup)
    base_flops, lr_flops = flops(traced, x), flops(factored, x)
    return {
        "model": name,
        "config": label,
        "sites": f"{len(tags)}/{len(fxtune.sites(traced))}",
        "skipped": sum(1 for w in caught if issubclass(w.category, fxtune.FxtuneWarning)),
        "solvers": dict(collections.Counter(t["solver"] for t in tags)),
        "params": (parameters(traced), parameters(factored)),
        "flops": (base_flops, lr_flops),
        "latency": (base_lat, lr_lat),
        "factorize_s": seconds,
    }


def table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        (p0, p1), (f0, f1), (t0, t1) = r["params"], r["flops"], r["latency"]
        reduction, speedup = f0 / f1, t0 / t1
        out.append([
            r["model"], r["config"], r["sites"], f"{p0 / 1e6:.1f}M → {p1 / 1e6:.1f}M ({p1 / p0:.2f}×)",
            f"{f0 / 1e9:.1f} → {f1 / 1e9:.1f} ({reduction:.2f}× fewer)", f"{t0 * 1e3:.0f} → {t1 * 1e3:.0f}",
            f"{speedup:.2f}×", f"{'yes' if speedup >= 0.8 * reduction else 'no'} (needs ≥ {0.8 * reduction:.2f}×)",
            f"{r['factorize_s']:.1f}", ", ".join(f"{k}: {v}" for k, v in sorted(r["solvers"].items())),
        ])
    headers = ["model", "layout, ranks", "sites factorized", "params", "GFLOPs", "latency ms", "speedup", "≥ 0.8 × FLOP reduction",
               "factorize s", "solver"]
    return tabulate(out, headers=headers, tablefmt="github")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rank", type=float, default=0.5)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help="plain: NCHW and exact ranks; tuned: channels_last and ranks rounded to multiples of 16; "
                        "deployed: tuned, with BatchNorm folded into the convs of both models (models that have BatchNorm)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [run(name, args.rank, args.batch, args.repeats, args.warmup, config) for name in args.models for config in args.configs]
    rows = [r for r in rows if r is not None]
    result = table(rows)
    text = (
        f"## low_rank (rank={args.rank} of break-even, solver=auto)\n\n"
        f"{datetime.date.today().isoformat()} · torch {torch.__version__} · torchvision {torchvision.__version__} · {machine()}, load {load()}\n"
        f"batch {args.batch} at 224×224, median of {args.repeats} forwards after {args.warmup} warm-up (interleaved), random weights."
        f"{' Few repeats: a sanity run, not final numbers.' if args.repeats < 10 else ''}\n\n"
        f"{result}\n\n"
        "Factorized: every site that is a `nn.Linear`/`nn.Conv*` module called in the graph; vit_b_16's attention "
        "projections are sites too, but live inside `nn.MultiheadAttention`, which `low_rank` cannot split into two "
        "calls, so they stay dense (the pass says so in a warning). "
        "FLOPs are the whole forward's (torch.utils.flop_counter). The target is speedup ≥ 0.8 × FLOP reduction. "
        "\"BN folded in both\": `fold_bn` on the traced model is the baseline, `low_rank` of it the factored model "
        "(vit_b_16 has no BatchNorm, so that row would repeat the one above).\n"
    )
    print(text)
    if not args.no_write:
        write_section("low_rank", text)


if __name__ == "__main__":
    main()
