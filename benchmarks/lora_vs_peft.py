"""fxtune LoRA against PEFT LoRA on torchvision resnet50 and vit_b_16, side by side in one process.

Both libraries adapt the same call sites with r=8 (scale 1), random weights, CPU. Each
measurement interleaves the candidates (base, fxtune, PEFT, then the reverse order, ...) for
`--repeats` rounds and reports medians, so machine load hits all of them alike; ratios are the
median of the per-round ratios. Before timing, fxtune is given PEFT's A/B and both outputs are
compared, so the timings compare equal computations.

    python benchmarks/lora_vs_peft.py                    # full run, writes benchmarks/RESULTS.md
    python benchmarks/lora_vs_peft.py --quick            # smoke run (small input), prints only
    python benchmarks/lora_vs_peft.py --models resnet50:channels_last   # one model, one layout
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import statistics
import sys
import time
from typing import Callable

import peft
import torch
import torch.nn.functional as F
import torchvision
from tabulate import tabulate
from torch import nn

import fxtune
from fxtune.passes import fuse, lora

import _common as common
from _common import paired_ratio

RANK = 8
CHECK_TOL = 1e-5  # max relative difference for "the same computation" in float32
# Which call sites each model adapts, in both libraries, and why (printed with the results).
SITE_NOTES = {
    "resnet50": "every nn.Conv2d and nn.Linear (53 convs + fc)",
    "vit_b_16": (
        "every nn.Linear called as a module: the 24 MLP linears (encoder_layer_*.mlp.0/3) and heads.head. "
        "Not adapted in either library: conv_proj, and the attention projections, which "
        "nn.MultiheadAttention uses as bare weights (in_proj_weight, out_proj.weight): fxtune has them as "
        "sites (`*.self_attention.q/k/v/out_proj`, weight form), PEFT's module wrappers cannot reach them, "
        "so both adapt the same 25 here"
    ),
}


# ---------------------------------------------------------------------------------------------
# timing


CLOCK = time.perf_counter  # --clock cpu: time.process_time (robust to load with --threads 1)


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, inner: int = 1) -> dict[str, list[float]]:
    return common.interleaved(fns, repeats, inner, clock=CLOCK)


def timed_once(setup: Callable[[], object], fn: Callable[[object], object]) -> float:
    """Seconds of fn(setup()) without the setup (e.g. PEFT needs a fresh deepcopy each time)."""
    arg = setup()
    gc.collect()
    start = CLOCK()
    fn(arg)
    return CLOCK() - start


# ---------------------------------------------------------------------------------------------
# models and the two libraries


def build(name: str, quick: bool, channels_last: bool = False) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    batch, size = (2, 64) if quick else (4, 224)
    if name == "resnet50":
        model = torchvision.models.resnet50(weights=None)
    elif name == "vit_b_16":
        model = torchvision.models.vit_b_16(weights=None, image_size=size)
    else:
        raise SystemExit(f"unknown model {name!r}; choose from resnet50, vit_b_16")
    x = torch.randn(batch, 3, size, size)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    return model.eval(), x


def site_names(model: nn.Module, name: str) -> list[str]:
    """The module paths adapted in both libraries (see SITE_NOTES): layers called as modules only.

    A weight used any other way (e.g. by nn.MultiheadAttention) is left out: PEFT wraps modules,
    so a LoRA on a weight the graph never calls through its module would not act in PEFT.
    """
    kinds = (nn.Conv2d, nn.Linear) if name == "resnet50" else (nn.Linear,)

    def called_as_module(site) -> bool:
        node = site.node
        return node.op == "call_module" and node.target == site.name and isinstance(site.module, kinds)

    return [s.name for s in fxtune.sites(fxtune.trace(model), called_as_module)]


def fx_inject(model: nn.Module, names: list[str]) -> torch.fx.GraphModule:
    return lora(fxtune.trace(model), targets=names, r=RANK)


def with_code(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """gm with its Python code generated and compiled, as its first call would (fxtune defers that)."""
    gm.code  # noqa: B018 - reading it generates and compiles the code (an assert would vanish under -O)
    return gm


def peft_inject(model: nn.Module, names: list[str]) -> nn.Module:
    """PEFT on `model` itself (callers pass a deepcopy): same sites, r, scale alpha/r = 1."""
    config = peft.LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=names)
    return peft.get_peft_model(model, config)


def peft_layers(pm: nn.Module) -> dict[str, nn.Module]:
    """PEFT's LoRA layers by the path of the module they wrap in the original model."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {n[len(prefix):]: m for n, m in pm.named_modules() if isinstance(m, LoraLayer)}


def share_factors(pm: nn.Module, gm: torch.fx.GraphModule) -> None:
    """Gives PEFT's B random values (it starts at zero) and copies PEFT's A/B into fxtune."""
    slots = gm.fxtune.default
    with torch.no_grad():
        for target, layer in peft_layers(pm).items():
            layer.lora_B["default"].weight.normal_(0.0, 0.02)
            slot = getattr(slots, target.replace(".", "_"))
            slot.lora_a.copy_(layer.lora_A["default"].weight)
            slot.lora_b.copy_(layer.lora_B["default"].weight)


def realised_forms(gm: torch.fx.GraphModule) -> str:
    """How many sites got the activation / weight form, read from the nodes' `meta["fxtune"]` tags."""
    roles: dict[str, set[str]] = {"lora_down": set(), "lora_weight": set()}
    for node in gm.graph.nodes:
        tag = node.meta.get("fxtune")
        if tag and tag.get("role") in roles:
            roles[tag["role"]].add(tag["site"])
    return f"activation form on {len(roles['lora_down'])} sites, weight form on {len(roles['lora_weight'])}"


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


# ---------------------------------------------------------------------------------------------
# one model


def bench_model(spec: str, repeats: int, quick: bool) -> dict:
    name, _, layout = spec.partition(":")
    if layout not in ("", "channels_last"):
        raise SystemExit(f"unknown layout {layout!r} in {spec!r}; the only one is channels_last")
    model, x = build(name, quick, channels_last=bool(layout))
    names = site_names(model, name)
    labels = torch.randint(0, 1000, (x.shape[0],))
    fw_inner = 1 if quick else 2

    # trace + inject vs get_peft_model (PEFT's deepcopy is outside the timed region); fxtune generates
    # a GraphModule's code on first use, so also timed with it ("fxtune+code", as before a first call)
    # floor: fx's Tracer alone, the graph without code (no graph tool can skip it); then fx.symbolic_trace
    # (graph and code) and fxtune.trace alone
    setup = {"fxtune": [], "fxtune+code": [], "PEFT": [], "tracer": [], "symbolic_trace": [], "trace": []}
    interleave = [("fxtune", lambda: timed_once(lambda: None, lambda _: fx_inject(model, names))),
                  ("fxtune+code", lambda: timed_once(lambda: None, lambda _: with_code(fx_inject(model, names)))),
                  ("PEFT", lambda: timed_once(lambda: copy.deepcopy(model), lambda m: peft_inject(m, names))),
                  ("tracer", lambda: timed_once(lambda: None, lambda _: torch.fx.Tracer().trace(model))),
                  ("symbolic_trace", lambda: timed_once(lambda: None, lambda _: torch.fx.symbolic_trace(model))),
                  ("trace", lambda: timed_once(lambda: None, lambda _: fxtune.trace(model)))]
    for rep in range(repeats):
        for key, run in interleave if rep % 2 == 0 else reversed(interleave):
            setup[key].append(run())

    gm = fx_inject(model, names)
    pm = peft_inject(copy.deepcopy(model), names)
    forms = realised_forms(gm)
    adapted_peft = sorted(peft_layers(pm))
    if adapted_peft != sorted(names):
        raise SystemExit(f"{name}: PEFT adapted {len(adapted_peft)} modules, fxtune {len(names)}; they must match")

    # same A/B in both, then compare outputs (unfused and fused)
    share_factors(pm, gm)
    gm.eval()
    pm.eval()
    with torch.no_grad():
        ref_base, out_fx, out_peft = model(x), gm(x), pm(x)
        fused_check = fuse(gm)
        merged_check = copy.deepcopy(pm).merge_and_unload()
        out_fused, out_merged = fused_check(x), merged_check(x)
    check = {
        "unfused": max_rel(out_fx, out_peft),
        "fused": max_rel(out_fused, out_merged),
        "fused_vs_unfused": max_rel(out_fused, out_fx),
        "delta_vs_base": max_rel(ref_base, out_fx),  # well above the others: the adapters are not no-ops
    }
    del fused_check, merged_check
    if max(check["unfused"], check["fused"]) > CHECK_TOL:
        print(f"WARNING {name}: fxtune and PEFT outputs differ by {max(check['unfused'], check['fused']):.1e} "
              "with the same A/B; the timings below do not compare equal computations", file=sys.stderr)

    # unfused forward, eval + no_grad
    with torch.no_grad():
        fwd = interleaved({"base": lambda: model(x), "fxtune": lambda: gm(x), "PEFT": lambda: pm(x)}, repeats, fw_inner)

    # training step: forward + backward + AdamW; base = full fine-tune of a copy (all params trainable)
    full = copy.deepcopy(model).train()
    for p in full.parameters():
        p.requires_grad_(True)
    gm.train()
    pm.train()
    opts = {
        "base": torch.optim.AdamW(full.parameters(), lr=1e-5),
        "fxtune": torch.optim.AdamW(fxtune.trainable_parameters(gm), lr=1e-5),
        "PEFT": torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-5),
    }
    nets = {"base": full, "fxtune": gm, "PEFT": pm}
    trainable = {k: sum(p.numel() for g in o.param_groups for p in g["params"]) for k, o in opts.items()}

    def step(key: str) -> Callable[[], None]:
        def run() -> None:
            opts[key].zero_grad(set_to_none=True)
            F.cross_entropy(nets[key](x), labels).backward()
            opts[key].step()
        return run

    # the floor: no adapters, no weight gradients, no optimizer; the traced model's backward down
    # to the output of the lowest adapted site, which gradients must reach in any adapter method
    floor_net = fxtune.trace(model).train()
    first = fxtune.sites(floor_net, names)[0]
    floor_net.get_submodule(first.name).register_forward_hook(lambda mod, args, out: out.requires_grad_(True))

    def floor() -> None:
        F.cross_entropy(floor_net(x), labels).backward()

    train = interleaved({**{k: step(k) for k in nets}, "floor": floor}, repeats)
    gm.eval()
    pm.eval()

    # fuse vs merge_and_unload (merge_and_unload consumes its model: a fresh deepcopy each round)
    # PEFT merges in place, consuming its model; "PEFT copy" is the non-destructive equivalent of fuse
    fold = {"fxtune": [], "fxtune+code": [], "PEFT": [], "PEFT copy": []}
    interleave = [("fxtune", lambda: timed_once(lambda: None, lambda _: fuse(gm))),
                  ("fxtune+code", lambda: timed_once(lambda: None, lambda _: with_code(fuse(gm)))),
                  ("PEFT", lambda: timed_once(lambda: copy.deepcopy(pm), lambda m: m.merge_and_unload())),
                  ("PEFT copy", lambda: timed_once(lambda: None, lambda _: copy.deepcopy(pm).merge_and_unload()))]
    for rep in range(repeats):
        for key, run in interleave if rep % 2 == 0 else reversed(interleave):
            fold[key].append(run())

    # fused forward; the traced, unadapted GraphModule runs alongside: its code is what fusion restores
    fused = fuse(gm).eval()
    merged = copy.deepcopy(pm).merge_and_unload().eval()
    traced = fxtune.trace(model).eval()
    with torch.no_grad():
        fused_t = interleaved({"base": lambda: model(x), "fxtune": lambda: fused(x), "PEFT": lambda: merged(x),
                               "traced": lambda: traced(x)}, repeats, fw_inner)

    return {
        "model": spec, "first_site": first.name, "sites": len(names), "forms": forms, "input": tuple(x.shape), "check": check, "trainable": trainable,
        "setup": setup, "fwd": fwd, "train": train, "fold": fold, "fused": fused_t,
    }


# ---------------------------------------------------------------------------------------------
# report


def ms(s: float) -> str:
    return f"{s * 1e3:.1f}"


def targets_for(name: str, measure: str, fx: float, pf: float) -> tuple[str, str]:
    """(target text, met) for fxtune's ratio; '-' when no target applies."""
    if measure == "fused forward":
        return "≤ 1.01", "yes" if fx <= 1.01 else "no"
    if measure == "unfused forward" and name == "resnet50":
        return "≤ 1.30", "yes" if fx <= 1.30 else "no"
    if measure == "train step" and name == "resnet50":
        return "≤ 0.65", "yes" if fx <= 0.65 else "no"
    if measure == "train step":
        return f"< PEFT ({pf:.3f})", "yes" if fx < pf else "no"
    return "-", "-"


def tables(results: list[dict]) -> tuple[str, str]:
    ratio_rows, once_rows = [], []
    for r in results:
        for measure, key, note in (
            ("unfused forward", "fwd", "eval, no_grad"),
            ("train step", "train", "fwd+bwd+AdamW; base = full fine-tune"),
            ("fused forward", "fused", "fxtune fuse / PEFT merge_and_unload"),
        ):
            t = r[key]
            fx, pf = paired_ratio(t["fxtune"], t["base"]), paired_ratio(t["PEFT"], t["base"])
            target, met = targets_for(r["model"].partition(":")[0], measure, fx, pf)
            ratio_rows.append([r["model"], f"{measure} ({note})", ms(med(t["base"])), ms(med(t["fxtune"])),
                               ms(med(t["PEFT"])), f"{fx:.3f}", f"{pf:.3f}", target, met])
        for op, key, ours, theirs in (
            ("trace+lora / get_peft_model", "setup", "fxtune", "PEFT"),
            ("trace+lora, code generated (gm.code) / get_peft_model", "setup", "fxtune+code", "PEFT"),
            ("floor: fx.Tracer().trace alone (graph, no code) / get_peft_model", "setup", "tracer", "PEFT"),
            ("fx.symbolic_trace alone (graph and code) / get_peft_model", "setup", "symbolic_trace", "PEFT"),
            ("fxtune.trace alone / get_peft_model", "setup", "trace", "PEFT"),
            ("fuse / merge_and_unload", "fold", "fxtune", "PEFT"),
            ("fuse, code generated / merge_and_unload", "fold", "fxtune+code", "PEFT"),
            ("fuse / deepcopy + merge_and_unload", "fold", "fxtune", "PEFT copy"),
        ):
            t = r[key]
            once_rows.append([r["model"], op, ms(med(t[ours])), ms(med(t[theirs])),
                              f"{paired_ratio(t[ours], t[theirs]):.2f}"])
    ratio = tabulate(ratio_rows, headers=["model", "measurement", "base ms", "fxtune ms", "PEFT ms",
                                          "fxtune ÷ base", "PEFT ÷ base", "target (fxtune ÷ base)", "met"],
                     tablefmt="github", disable_numparse=True)
    once = tabulate(once_rows, headers=["model", "operation (fxtune / PEFT)", "fxtune ms", "PEFT ms", "÷"],
                    tablefmt="github", disable_numparse=True)
    return ratio, once


def machine() -> str:
    return f"{common.machine()}, load average (1/5/15 min) at the end: {common.load()}"


def report(results: list[dict], args: argparse.Namespace, load_start: str) -> str:
    ratio, once = tables(results)
    lines = [
        "## LoRA: fxtune vs PEFT (`benchmarks/lora_vs_peft.py`)",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- versions: torch {torch.__version__}, torchvision {torchvision.__version__}, peft {peft.__version__}, "
        f"fxtune {fxtune.__version__} ({common.checkout()})",
        f"- machine: {machine()}; load average at the start: {load_start}",
        f"- settings: CPU, float32, random weights, LoRA r={RANK}, alpha={RANK} (scale 1), no dropout; "
        f"{args.repeats} interleaved rounds per measurement, medians of {'process CPU' if args.clock == 'cpu' else 'wall-clock'} "
        "time; ratios are medians of per-round ratios"
        + (" — QUICK smoke run, not representative" if args.quick else ""),
    ]
    for r in results:
        c = r["check"]
        tr = r["trainable"]
        lines += [
            f"- {r['model']}: input {'×'.join(map(str, r['input']))}; {r['sites']} sites adapted in both "
            f"libraries: {SITE_NOTES[r['model'].partition(':')[0]]}; fxtune form='auto' gave the {r['forms']}; trainable parameters fxtune {tr['fxtune']:,}, "
            f"PEFT {tr['PEFT']:,}, full fine-tune {tr['base']:,}",
            f"- {r['model']} numerical check (same A/B, B random): max|fxtune − PEFT| / max|PEFT| = "
            f"{c['unfused']:.1e} unfused, {c['fused']:.1e} fused "
            f"({'equal' if max(c['unfused'], c['fused']) <= CHECK_TOL else 'NOT EQUAL'} within {CHECK_TOL:.0e}); fused vs unfused {c['fused_vs_unfused']:.1e}; "
            f"adapted vs base model {c['delta_vs_base']:.1e} (the adapters change the output)",
        ]
    for r in results:
        lines.append(
            f"- {r['model']} train-step floor: the traced model without adapters, backward down to the output of "
            f"the lowest adapted site ({r['first_site']}) with no weight gradient and no optimizer, takes "
            f"{paired_ratio(r['train']['floor'], r['train']['base']):.3f}× the full fine-tune step; "
            "no adapter method on these sites can go below it"
        )
    for r in results:
        t = r["fused"]
        lines.append(
            f"- {r['model']} fused forward in context: the traced, unadapted GraphModule (`fxtune.trace(model)`, "
            f"whose code `fuse` restores) runs at {paired_ratio(t['traced'], t['base']):.3f}× the eager model; "
            f"fused ÷ traced = {paired_ratio(t['fxtune'], t['traced']):.3f}"
        )
    lines += ["", ratio, "", once, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.run_options(ap, repeats=7, quick_repeats=2, quick="batch 2 at 64×64")
    ap.add_argument("--models", default="resnet50,resnet50:channels_last,vit_b_16",
                    help="comma-separated resnet50 / vit_b_16, each optionally :channels_last (model and input in that layout)")
    ap.add_argument("--raw", action="store_true", help="also print every round's time (ms) to stderr")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall (default) or cpu = process CPU time, steadier on a loaded machine with --threads 1")
    args = common.parse_run_options(ap, argv)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    load_start = common.load()

    def bench(name: str) -> dict:
        result = bench_model(name, args.repeats, args.quick)
        for key in ("setup", "fwd", "train", "fold", "fused") if args.raw else ():
            rounds = {k: [round(v * 1e3, 1) for v in vs] for k, vs in result[key].items()}
            print(f"  {name} {key}: {rounds}", file=sys.stderr)
        return result

    common.publish("lora_vs_peft", report(common.each_model(args.models, bench), args, load_start), args)


if __name__ == "__main__":
    main()
