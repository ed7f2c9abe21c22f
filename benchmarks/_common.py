"""What every benchmark script shares: interleaved timing, paired ratios, the machine line, RESULTS.md sections.

Each script owns one section of RESULTS.md between `<!-- name:begin -->` and `<!-- name:end -->`;
re-running a script rewrites only its own section.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# fxtune benchmark results\n\nEach section below is written by the script named in it; re-run that script to refresh it.\n"


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, inner: int = 1, clock: Callable[[], float] = time.perf_counter
) -> dict[str, list[float]]:
    """Seconds per call of each fn over `repeats` rounds, alternating the order (ABC CBA ABC ...)
    so that drifting machine load falls on every contender alike; one warm-up call each first."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for rep in range(repeats):
        gc.collect()
        for name in names if rep % 2 == 0 else reversed(names):
            start = clock()
            for _ in range(inner):
                fns[name]()
            times[name].append((clock() - start) / inner)
    return times


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num/den measured in the same round."""
    return statistics.median(a / b for a, b in zip(num, den))


def load() -> str:
    """The load average (1/5/15 min), to tell a quiet run from a busy one."""
    return ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def machine() -> str:
    return (f"{platform.platform()} ({platform.machine()}), Python {platform.python_version()}, "
            f"os.cpu_count()={os.cpu_count()}, torch.get_num_threads()={torch.get_num_threads()}")


def checkout() -> str:
    """The git commit measured, and whether fxtune/ or passes/ had uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "fxtune", "passes"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return head.stdout.strip() + (" with uncommitted changes in fxtune/ or passes/" if dirty.stdout.strip() else "")


def write_section(name: str, text: str) -> None:
    """Replaces only the text between this script's markers in RESULTS.md (appends the section if absent)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = RESULTS.read_text() if RESULTS.exists() else HEADER
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in old and end in old and old.index(begin) < old.index(end):
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    RESULTS.write_text(new)
    print(f"wrote {RESULTS} ({name})", flush=True)


def run_options(ap: argparse.ArgumentParser, *, repeats: int, quick_repeats: int, quick: str) -> None:
    """The options every model benchmark takes: --repeats, --quick (described by `quick`), --write, --threads."""
    ap.add_argument("--repeats", type=int, default=None, help=f"interleaved rounds (default {repeats}; {quick_repeats} with --quick)")
    ap.add_argument("--quick", action="store_true", help=f"smoke run: {quick}; does not write RESULTS.md")
    ap.add_argument("--write", action="store_true", help="write RESULTS.md even with --quick")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.set_defaults(default_repeats=(repeats, quick_repeats))


def parse_run_options(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parsed arguments with --repeats resolved and checked and --threads applied."""
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = args.default_repeats[1] if args.quick else args.default_repeats[0]
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def each_model(spec: str, bench: Callable[[str], Any]) -> list[Any]:
    """bench(name) for each name of a comma-separated list, saying which one runs."""
    results = []
    for name in [m.strip() for m in spec.split(",") if m.strip()]:
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        results.append(bench(name))
        gc.collect()
    return results


def publish(name: str, text: str, args: argparse.Namespace) -> None:
    """Prints the report and writes it as the script's RESULTS.md section, unless a --quick run without --write."""
    print(text)
    if not args.quick or args.write:
        write_section(name, text)
