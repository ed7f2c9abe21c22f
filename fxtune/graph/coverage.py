"""How many of a model's linear, conv, embedding and attention-projection weights are call sites.

`targets=None` adapts every site; this report says whether "every site" is every such weight
of the model, and names the ones that are not (inside a leaf module, renormalised in place...).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from .discovery import SITE_LAYERS, discover_sites, qkv_weights, site_layer
from .sites import join
from .traced_calls import TAG, original_call
from .weights import Weights


@dataclass(frozen=True)
class Coverage:
    """Weights found as call sites, weights used by the graph but not sites (with why), and unused ones."""

    found: tuple[str, ...]
    missing: dict[str, str]
    unused: tuple[str, ...]

    @property
    def total(self) -> int:
        """Weights the graph uses: found plus missing."""
        return len(self.found) + len(self.missing)

    @property
    def fraction(self) -> float:
        return len(self.found) / self.total if self.total else 1.0

    @property
    def complete(self) -> bool:
        return not self.missing

    def __str__(self) -> str:
        lines = [f"{len(self.found)} of {self.total} weights the graph uses are call sites ({100 * self.fraction:.1f}%)"]
        if self.missing:
            lines.append("not call sites:")
            lines += [f"  {name}: {why}" for name, why in self.missing.items()]
        if self.unused:
            lines.append(f"not used by the graph at all (their layers never run here): {', '.join(self.unused)}")
        return "\n".join(lines)


def model_weights(model: nn.Module) -> dict[str, tuple[str, str, tuple[int, int] | None]]:
    """{name: (module path, parameter, rows)} of every Linear/Conv/Embedding/Conv1D weight and every
    MultiheadAttention q/k/v projection (`<path>.q`...); a tensor reached under several names counts once."""
    out, seen = {}, set()
    for path, module in model.named_modules():
        entries = []
        if isinstance(module, nn.MultiheadAttention):
            entries = [(join(path, letter), param, rows) for letter, param, rows in qkv_weights(module)]
        elif isinstance(module, tuple(SITE_LAYERS)) or site_layer(module) is not None:
            if isinstance(getattr(module, "weight", None), nn.Parameter):
                entries.append((path, "weight", None))
        for name, param, rows in entries:
            key = (id(getattr(module, param)), rows)
            if key not in seen:
                seen.add(key)
                out[name] = (path, param, rows)
    return out


def coverage_of(model: nn.Module, gm: fx.GraphModule) -> Coverage:
    """Which of `model`'s Linear/Conv/Embedding/Conv1D weights and MultiheadAttention projections are
    call sites of `gm` (traced from it), and why the others are not."""
    store = Weights(gm)
    covered = {(id(store.tensor(s.use_ref.path)), s.use_ref.rows) for s in discover_sites(gm)}
    by_name = {n.name: n for n in gm.graph.nodes}
    read, called = set(), {}
    for node in gm.graph.nodes:
        if TAG in node.meta:
            continue
        op, target, _, _ = original_call(node, by_name)
        if op == "get_attr":
            read.add(target)
        elif op == "call_module":
            called[target] = type(gm.get_submodule(target)).__name__
    found, missing, unused = [], {}, []
    for name, (path, param, rows) in model_weights(model).items():
        try:
            tensor = store.tensor(join(path, param))
        except (AttributeError, KeyError):
            missing[name] = "the GraphModule has no such parameter (a structural pass replaced its module?)"
            continue
        if (id(tensor), rows) in covered:
            found.append(name)
            continue
        leaf = next((c for c in sorted(called, key=len) if path == c or path.startswith(c + ".")), None)
        if leaf is not None:
            missing[name] = _why(model.get_submodule(path), leaf, called[leaf], path)
        elif join(path, param) in read:
            missing[name] = "read by get_attr, but not as a weight fxtune recognises"
        else:
            unused.append(name)
    return Coverage(tuple(found), missing, tuple(unused))


def _why(module: nn.Module, leaf: str, leaf_type: str, path: str) -> str:
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return "an nn.Embedding with max_norm renormalises its weight in place when called; fxtune leaves it alone"
    if leaf == path:
        return f"'{leaf}' ({leaf_type}) is called, but fxtune does not adapt this kind of layer"
    return (f"inside leaf module '{leaf}' ({leaf_type}), which the graph calls as a whole; trace through it "
            "(drop it from leaf_modules=...) to make its weights call sites")
