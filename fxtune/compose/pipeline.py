"""Chaining passes with a record of what each one did (sites touched, parameters added, time)."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from tabulate import tabulate
from torch import fx

from ..adapter.slots import slots_by_weight
from ..graph.discovery import discover_sites
from ..graph.parts import graphs_of
from ..graph.weights import Weights
from .registry import pass_label

Pass = Callable[[fx.GraphModule], fx.GraphModule]


@dataclass
class PassRecord:
    name: str
    sites_touched: int
    params_added: int
    trainable: int
    seconds: float


def _fingerprint(gm: fx.GraphModule) -> dict[str, tuple]:
    """Per site: its adapters and the identity of its weight, to tell which sites a pass changed."""
    out = {}
    for graph in graphs_of(gm):
        store, by_weight = Weights(graph), slots_by_weight(graph, active_only=False)
        for site in discover_sites(graph):
            slots = by_weight.get(site.weight_name, [])
            weight = store.tensor(site.use_ref.path)
            out[site.name] = (
                tuple((s.adapter, s.kind, s.active, s.order) for s in slots),
                weight.data_ptr(),
                tuple(weight.shape),
                type(site.module),
            )
    return out


class Pipeline:
    """Runs passes in order; `report()` shows a table of what each did.

    Steps are callables GraphModule -> GraphModule (use functools.partial for options) or
    `(pass, {"option": value})` pairs.
    """

    def __init__(self, passes: Iterable[Pass | tuple[Pass, dict[str, Any]]]):
        self.passes = [functools.partial(p[0], **p[1]) if isinstance(p, tuple) else p for p in passes]
        self.records: list[PassRecord] = []

    def run(self, gm: fx.GraphModule) -> fx.GraphModule:
        """Runs every pass in order and records, per pass, the sites it changed (a site replaced by
        new sites, e.g. `fc` by `fc.0` and `fc.1`, counts once), parameters added and seconds."""
        self.records = []
        for step in self.passes:
            before = _fingerprint(gm)
            params_before = sum(p.numel() for p in gm.parameters())
            start = time.perf_counter()
            gm = step(gm)
            seconds = time.perf_counter() - start
            after = _fingerprint(gm)
            changed = {k for k in before if before[k] != after.get(k)}
            touched = len(changed) + sum(
                1 for k in after.keys() - before.keys() if not any(k.startswith(c + ".") for c in changed)
            )
            self.records.append(
                PassRecord(
                    name=pass_label(step),
                    sites_touched=touched,
                    params_added=sum(p.numel() for p in gm.parameters()) - params_before,
                    trainable=sum(p.numel() for p in gm.parameters() if p.requires_grad),
                    seconds=seconds,
                )
            )
        return gm

    def report(self) -> str:
        rows = [[r.name, r.sites_touched, f"{r.params_added:+,}", f"{r.trainable:,}", f"{r.seconds:.3f}"] for r in self.records]
        return tabulate(rows, headers=["pass", "sites touched", "params added", "trainable after", "seconds"])
