"""Selecting sites: glob, regex, exact names, module type or predicate; `exclude=` the same."""

from __future__ import annotations

import fnmatch
import re
from typing import Callable, Iterable, Union

from torch import fx

from .errors import SelectionError
from .sites import SITE_KINDS, Site, all_sites

Selector = Union[None, str, "re.Pattern[str]", Iterable[str], type, Callable[[Site], bool]]

# A module type selects the sites whose weight its instances own, the sites inside an instance
# (nn.MultiheadAttention: its q/k/v/out_proj), and every site computing the op that type stands
# for: nn.Linear is every linear (F.linear, transformers' Conv1D, attention projections).
OP_TYPES: dict[str, type] = {kind: cls for cls, kind in SITE_KINDS.items()}


def matches(site: Site, selector: Selector) -> bool:
    """Whether one site is chosen by a selector (None chooses every site)."""
    if selector is None:
        return True
    if isinstance(selector, str):
        return fnmatch.fnmatchcase(site.name, selector)
    if isinstance(selector, re.Pattern):
        return selector.fullmatch(site.name) is not None
    if isinstance(selector, type):
        return isinstance(site.module, selector) or isinstance(site.caller, selector) or OP_TYPES.get(site.kind) is selector
    if callable(selector):
        return bool(selector(site))
    return site.name in selector


def _frozen(selector: Selector) -> Selector:
    """Name iterables (lists, generators...) become one frozenset, read once."""
    if selector is None or isinstance(selector, (str, re.Pattern, type)) or callable(selector):
        return selector
    return frozenset(selector)


def _listing(names: list[str], limit: int = 60) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


def _check_exact_names(selector: Selector, found: list[Site], role: str) -> None:
    if isinstance(selector, (str, re.Pattern, type)) or selector is None or callable(selector):
        return
    names = {s.name for s in found}
    unknown = sorted(n for n in selector if n not in names)
    if unknown:
        raise SelectionError(
            f"{role} names no site: {unknown}. Available sites: {_listing(sorted(names))}"
        )


def sites(gm: fx.GraphModule, targets: Selector = None, *, exclude: Selector = None) -> list[Site]:
    """The call sites of gm chosen by `targets` minus `exclude`, in graph order.

    An empty choice, or an exact name that is not a site, raises SelectionError listing the
    sites that exist.
    """
    if not isinstance(gm, fx.GraphModule):
        raise SelectionError(f"expected a GraphModule (use fxtune.trace(model) first), got {type(gm).__name__}")
    targets, exclude = _frozen(targets), _frozen(exclude)
    found = all_sites(gm)
    if not found:
        raise SelectionError(
            "the graph has no call sites (uses of the weight of an nn.Linear, nn.Conv1d/2d/3d, nn.Embedding, "
            "nn.MultiheadAttention or F.linear/conv/embedding); if they sit inside a leaf module, trace "
            "without marking it as a leaf (fxtune.coverage(model, gm) lists the weights that are no sites)"
        )
    _check_exact_names(targets, found, "targets")
    _check_exact_names(exclude, found, "exclude")
    chosen = [s for s in found if matches(s, targets) and not (exclude is not None and matches(s, exclude))]
    if not chosen:
        raise SelectionError(
            f"targets={_show(targets)} exclude={_show(exclude)} selects no site. "
            f"Available sites: {_listing([s.name for s in found])}"
        )
    return chosen


def select_targets(gm: fx.GraphModule, targets: Selector = None, *, exclude: Selector = None) -> dict[str, list[Site]]:
    """Chosen sites grouped by the weight they use; refuses to split a shared weight.

    A module called from several places may be adapted only with all its sites at once,
    so that one shared adapter is fused into the one shared weight.
    """
    chosen = sites(gm, targets, exclude=exclude)
    by_target: dict[str, list[Site]] = {}
    for s in chosen:
        by_target.setdefault(s.target, []).append(s)
    every = {}
    for s in all_sites(gm):
        every.setdefault(s.target, []).append(s.name)
    for target, group in by_target.items():
        missing = [n for n in every[target] if n not in {s.name for s in group}]
        if missing:
            raise SelectionError(
                f"site '{group[0].name}' shares its weight with {missing} (the weight of '{target}' is "
                f"used by {len(every[target])} sites); select all of {every[target]} to share one "
                "adapter between them, or none of them"
            )
    return by_target


def _show(selector: Selector) -> str:
    if isinstance(selector, re.Pattern):
        return f"re.compile({selector.pattern!r})"
    if isinstance(selector, type):
        return selector.__name__
    if callable(selector) and not isinstance(selector, (str, list, tuple, set)):
        return getattr(selector, "__name__", "<predicate>")
    return repr(selector)
