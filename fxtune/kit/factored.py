"""Factored deltas, the pieces low-rank kinds share: W + s·B@A shaped like the weight, and its branch.

A is (r, in/groups, *kernel) and B is (out, r, 1, ...) (PEFT's layout), so on activations the
delta is the site's own op with A (its stride, padding, dilation; grouped convs repeat A per
group), then a 1×1 channel mix with B. Any kind built on such a product (LoRA, DoRA, VeRA-like
kinds) uses these, so each states only what is its own.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx

from ..adapter.emitter import Emitter
from ..errors import AdapterError
from ..graph.sites import Site
from .settings import per_site


def plus_factored(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale · (B @ A) viewed as W's shape (out, in/groups, *kernel), in one addmm: the weight-sized
    result is written once (a product, a scaled copy and a sum wrote it three times: half of a fuse)."""
    return torch.addmm(w.reshape(w.shape[0], -1), b.flatten(1), a.flatten(1), alpha=scale).view(w.shape)


def factored_down(em: Emitter, x: fx.Node, a: Any, *, role: str) -> tuple[fx.Node, int]:
    """A applied to the site input with the site's own geometry (`<role>_down`), and the groups B must use."""
    groups = em.site.groups
    if groups > 1:
        a = em.method("repeat", a, groups, *([1] * (len(em.site.weight_shape) - 1)), role=f"{role}_a_grouped")
    return em.site_call(x, a, groups=groups, role=f"{role}_down"), groups


def branch_is_cheaper(site: Site, r: int) -> bool:
    """The `form="auto"` rule for a rank-r branch, per output position in training: the branch's extra
    multiply-adds, r·(in·k + out), against the weight gradient the weight form pays, out·(in/groups)·k."""
    k = site.kernel_volume
    return r * (site.in_features * k + site.out_features) < site.out_features * (site.in_features // site.groups) * k


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def rank_and_scale(site: Site, *, r: Any, alpha: Any, stabilized: Any) -> tuple[int, float, bool, float]:
    """This site's (r, alpha, stabilized, scale), each resolved with `per_site` and validated: scale = alpha/r
    (alpha/sqrt(r) when rank-stabilized), alpha defaulting to r."""
    r = per_site(r, site, 8)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterError(f"r must be a positive int, got {r!r} for '{site.name}'")
    alpha = per_site(alpha, site, None)
    alpha = r if alpha is None else alpha
    if not _finite_number(alpha):
        raise AdapterError(f"alpha must be a finite number, got {alpha!r} for '{site.name}'")
    stabilized = bool(per_site(stabilized, site, False))
    return r, alpha, stabilized, scale_of(r, alpha, stabilized)


def scale_of(r: int, alpha: float, stabilized: bool) -> float:
    """A rank-r delta's scale: alpha/r, or alpha/sqrt(r) rank-stabilized."""
    return alpha / math.sqrt(r) if stabilized else alpha / r


def rank_and_scale_problems(config: dict, factors: dict[str, Any], *, stabilized: str) -> list[str]:
    """What a saved rank-r adapter's settings get wrong against `factors` ({A's name: A (rank on dim 0)} and
    optionally B's, rank on dim 1): r must be their rank, alpha a number, scale what alpha, r and the
    config's `stabilized` flag give."""
    names = list(factors)
    a, b = factors[names[0]], factors[names[1]] if len(names) > 1 else None
    r, alpha = config.get("r"), config.get("alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1 or not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        return [f"r={r!r}, alpha={alpha!r}; r must be a positive int and alpha a number"]
    problems = []
    if a is not None and b is not None and (a.shape[0] != r or b.shape[1] != r):
        problems.append(f"r={r}, but {names[0]} {list(a.shape)} and {names[1]} {list(b.shape)} have rank {a.shape[0]}")
    elif a is not None and b is None and a.shape[0] != r:
        problems.append(f"r={r}, but {names[0]} {list(a.shape)} has rank {a.shape[0]}")
    expected = scale_of(r, alpha, bool(config.get(stabilized)))
    scale = config.get("scale")
    if not isinstance(scale, (int, float)) or not math.isclose(scale, expected, rel_tol=1e-9):
        problems.append(f"scale={scale!r}, but alpha={alpha}, r={r}, {stabilized}={config.get(stabilized)} give {expected!r}")
    return problems


def checked_fraction(value: Any, name: str, site: Site) -> float:
    """A setting in [0, 1) (e.g. a dropout probability), resolved with `per_site`."""
    value = per_site(value, site, 0.0)
    if not _finite_number(value) or not 0.0 <= value < 1.0:
        raise AdapterError(f"{name} must be in [0, 1), got {value!r} for '{site.name}'")
    return value
