"""Selecting sites: glob, regex, exact names, module type or predicate; `exclude=` the same."""

from __future__ import annotations

import fnmatch
import re
from typing import Any, Callable, Iterable, Union

from torch import fx

from ..errors import SelectionError, warn
from .discovery import SITE_LAYERS, site_table
from .sites import Site, SiteTable

Selector = Union[None, str, "re.Pattern[str]", Iterable[str], type, Callable[[Site], bool]]

# A module type selects the sites whose weight its instances own, the sites inside an instance
# (nn.MultiheadAttention: its q/k/v/out_proj), and every site computing the op that type stands
# for: nn.Linear is every linear (F.linear, transformers' Conv1D, attention projections).
OP_TYPES: dict[str, type] = {layer: cls for cls, layer in SITE_LAYERS.items()}


def matches(site: Site, selector: Selector) -> bool:
    """Whether one site is chosen by a selector (None chooses every site)."""
    if selector is None:
        return True
    if isinstance(selector, type):
        return isinstance(site.module, selector) or isinstance(site.caller, selector) or OP_TYPES.get(site.layer) is selector
    return name_chosen(site.name, site, selector)


def name_chosen(name: str, subject: Any, selector: Any) -> bool:
    """Whether a selector by name chooses `subject` (a site, a channel group) called `name`: a glob, a
    compiled regex matching the whole name, a callable of the subject, or a collection of names."""
    if isinstance(selector, str):
        return fnmatch.fnmatchcase(name, selector)
    if isinstance(selector, re.Pattern):
        return selector.fullmatch(name) is not None
    if callable(selector):
        return bool(selector(subject))
    return name in selector


def _read_once(selector: Selector) -> Selector:
    """Name iterables (lists, generators...) become one frozenset, read once."""
    if selector is None or isinstance(selector, (str, re.Pattern, type)) or callable(selector):
        return selector
    return frozenset(selector)


def listing(names: list[str], limit: int = 60) -> str:
    """Names for an error message, at most `limit` of them."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


def _check_exact_names(selector: Selector, found: list[Site], role: str) -> None:
    if isinstance(selector, (str, re.Pattern, type)) or selector is None or callable(selector):
        return
    names = {s.name for s in found}
    unknown = sorted(n for n in selector if n not in names)
    if unknown:
        raise SelectionError(
            f"{role} names no site: {unknown}. Available sites: {listing(sorted(names))}"
        )


def sites(gm: fx.GraphModule, targets: Selector = None, *, exclude: Selector = None) -> list[Site]:
    """The call sites of gm chosen by `targets` minus `exclude`, in graph order.

    An empty choice, or an exact name that is not a site, raises SelectionError listing the
    sites that exist.
    """
    if not isinstance(gm, fx.GraphModule):
        raise SelectionError(f"expected a GraphModule (use fxtune.trace(model) first), got {type(gm).__name__}")
    return choose(site_table(gm), targets, exclude=exclude)


def choose(table: SiteTable, targets: Selector = None, *, exclude: Selector = None) -> list[Site]:
    """`sites` on a table already found."""
    targets, exclude = _read_once(targets), _read_once(exclude)
    found = table.all
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
            f"targets={show(targets)} exclude={show(exclude)} selects no site. "
            f"Available sites: {listing([s.name for s in found])}"
        )
    return chosen


def select_weights(table: SiteTable, targets: Selector = None, *, exclude: Selector = None) -> dict[str, list[Site]]:
    """Chosen sites grouped by the weight they use; refuses to split a shared weight.

    A module called from several places may be adapted only with all its sites at once,
    so that one shared adapter is fused into the one shared weight.
    """
    by_weight: dict[str, list[Site]] = {}
    for s in choose(table, targets, exclude=exclude):
        by_weight.setdefault(s.weight_name, []).append(s)
    partial = []
    for weight, group in list(by_weight.items()):
        every = [s.name for s in table.by_weight[weight]]
        missing = [n for n in every if n not in {s.name for s in group}]
        if not missing:
            continue
        if not (_by_kind(targets) or _by_kind(exclude)):
            raise SelectionError(
                f"site '{group[0].name}' shares its weight with {missing} (the weight of '{weight}' is "
                f"used by {len(every)} sites); select all of {every} to share one "
                "adapter between them, or none of them"
            )
        partial.append(f"'{weight}' (used by {every}; selected {[s.name for s in group]})")
        del by_weight[weight]
    if partial:
        message = (f"left out {len(partial)} weight(s) that the selection reaches at only some of their uses: "
                   f"{', '.join(partial)}. One tensor takes one adapter shared by all its uses: to adapt it, "
                   "add every use to targets (by name), e.g. targets=[..., *uses]")
        if not by_weight:
            raise SelectionError(message)
        warn(message)
    return by_weight


def _by_kind(selector: Selector) -> bool:
    """A selection by module type or predicate (it may reach a tied weight's uses unevenly)."""
    return isinstance(selector, type) or (callable(selector) and not isinstance(selector, (str, re.Pattern)))


def show(selector: Selector) -> str:
    """A selector as an error message shows it."""
    if isinstance(selector, re.Pattern):
        return f"re.compile({selector.pattern!r})"
    if isinstance(selector, type):
        return selector.__name__
    if callable(selector) and not isinstance(selector, (str, list, tuple, set)):
        return getattr(selector, "__name__", "<predicate>")
    return repr(selector)
