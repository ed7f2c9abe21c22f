"""Per-site settings: a value, a dict of glob -> value (first match wins), or a callable Site -> value."""

from __future__ import annotations

import fnmatch
from typing import Any

from ..graph.sites import Site


def per_site(value: Any, site: Site, default: Any) -> Any:
    """The setting for one site: dict keys are globs over site names tried in order, else `default`.

    `r={"layer4.*": 16}` gives layer4's sites r=16 and every other site the pass's default;
    `r=lambda site: 4 if site.is_conv else 8` decides per site.
    """
    if isinstance(value, dict):
        for pattern, chosen in value.items():
            if fnmatch.fnmatchcase(site.name, pattern):
                return chosen
        return default
    if callable(value) and not isinstance(value, type):
        return value(site)
    return value
