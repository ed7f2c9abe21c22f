"""fxtune's own exception types: every message names the site or module and says what to do."""


class FxtuneError(Exception):
    """Base class of every error fxtune raises on purpose."""


class TraceError(FxtuneError):
    """The model could not be turned into a GraphModule."""


class SelectionError(FxtuneError):
    """A `targets=` / `exclude=` selection is empty, unknown or splits a shared weight."""


class AdapterError(FxtuneError):
    """An adapter cannot be added, found or configured as asked."""


class FusionError(FxtuneError):
    """Folding adapters into constant weights was refused (e.g. a non-finite adapter)."""


class FxtuneWarning(UserWarning):
    """Something works but is probably not what was meant (e.g. an adapter larger than its layer)."""
