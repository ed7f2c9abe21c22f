"""fxtune's own exception types: every message names the site or module and says what to do."""

import sys
import warnings


class FxtuneError(Exception):
    """Base class of every error fxtune raises on purpose."""


class TraceError(FxtuneError):
    """The model could not be turned into a GraphModule."""


class SelectionError(FxtuneError):
    """A `targets=` / `exclude=` selection is empty, unknown or splits a shared weight."""


class AdapterError(FxtuneError):
    """An adapter cannot be added, found or configured as asked."""


class StructureError(FxtuneError):
    """A structural edit cannot be made as asked (adapted module, weight used outside calls, nothing to do)."""


class FusionError(FxtuneError):
    """Folding adapters into constant weights was refused (e.g. a non-finite adapter)."""


class ExportError(FxtuneError):
    """A GraphModule could not be exported, or the export computes something else than it does."""


class FxtuneWarning(UserWarning):
    """Something works but is probably not what was meant (e.g. an adapter larger than its layer)."""


def warn(message: str, category: type[Warning] = FxtuneWarning) -> None:
    """Issues a warning attributed to the first caller outside fxtune (the user's line, even when a
    pass runs inside a Pipeline or Strategy), not to the pass that noticed."""
    level, frame = 1, sys._getframe(0)
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "fxtune":
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
