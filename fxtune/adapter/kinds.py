"""Adapter kinds: what an adapter means, as a weight transform, and how it may act on activations.

A kind is registered once by the module that defines it (a file in `passes/`, or user code).
The core only ever calls its functions; it knows no particular adapter.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import Tensor

from ..errors import AdapterError


@dataclass(frozen=True)
class AdapterKind:
    """One adapter technique.

    weight(w, **inputs) -> w'        the meaning on the weight (shape kept), a module-level function
    bias(b, **inputs) -> b'          optional, the meaning on the bias (called only if the site has one)
    activation(emit, x, y, inputs)   optional, emits graph nodes computing the adapted output from
                                     the site input `x` and current output `y`; returns the new output
    activation_input(emit, x, inputs) optional, for kinds acting on the input side (W' = W·diag(s)):
                                     returns a new input that the call and all inner adapters read
    activation_blocker(site, config) optional, returns why a site cannot take the activation form
    restore(site, weight, config, tensors[, base]) optional, what re-creating a saved adapter needs beyond its
                                     saved tensors: {"buffers": derived tensors (not saved), "modules":
                                     submodules, "base_weight": a replacement base weight}; all optional.
                                     `weight` is the weight as it reaches the adapter (the adapters loaded before
                                     it applied); a restore declaring `base` also gets the base weight itself
    activation_reads_weight          True if the activation form reads the site's own weight/bias (e.g. a
                                     norm of W): it is then used only while the adapter acts first on its
                                     site, and the weight form otherwise
    weight_blocker(config)           optional, returns why an adapter cannot be computed in the weight form
                                     (e.g. dropout on activations); forcing it there is then an error
    changes_bias(**settings)         optional, whether `bias` changes anything under these settings (IA³ on
                                     the input side leaves it alone); no bias node is emitted or folded if not
    check(config, tensors)           optional, where a slot's settings contradict its tensors or each other (a
                                     rank that is not the factors' rank...), as messages; adapter files refuse those
    companion                        True for kinds that may join a named adapter of any kind (whole-layer
                                     copies trained with it); a named adapter is otherwise of one kind
    peft                             optional, how this kind reads and writes PEFT's adapter directories: an
                                     instance of a `fxtune.PeftFormat` subclass (io/peft_format.py) naming its
                                     peft_type, tensors and settings
    channel_axes                     optional, how the adapter's tensors follow the weight's channels, so that
                                     structured pruning can slice them: {tensor name: {"out": axis, "in": axis,
                                     "in_group": axis}}, or a function (site, config) -> that. "out" indexes the
                                     output channels (rows of the canonical (out, in/groups, *kernel) weight),
                                     "in" the input channels/features over all groups, "in_group" the weight's
                                     dim 1 (in/groups; the same as "in" unless the conv is grouped). An axis may be
                                     (axis, block), each entry covering `block` channels, or None: the tensor
                                     depends on those channels but cannot be sliced. Unnamed tensors do not follow
                                     channels. A kind without it is refused by pruning (fuse first)
    `inputs` holds the adapter's tensors (parameters and persistent buffers) and its settings.
    """

    name: str
    weight: Callable[..., Tensor]
    bias: Callable[..., Tensor] | None = None
    activation: Callable[..., Any] | None = None
    activation_input: Callable[..., Any] | None = None
    activation_blocker: Callable[..., str | None] | None = None
    restore: Callable[..., dict] | None = None
    activation_reads_weight: bool = False
    weight_blocker: Callable[..., str | None] | None = None
    changes_bias: Callable[..., bool] | None = None
    check: Callable[..., list[str]] | None = None
    companion: bool = False
    peft: Any = None
    channel_axes: Mapping[str, Mapping[str, Any]] | Callable[..., Mapping[str, Mapping[str, Any]]] | None = field(
        default=None, compare=False)
    _accepts: dict = field(default_factory=dict, compare=False, repr=False)

    def acts_on_bias(self, settings: dict[str, Any]) -> bool:
        """Whether this kind's `bias` transform changes the bias of an adapter with these settings."""
        if self.bias is None:
            return False
        return self.changes_bias is None or bool(self.changes_bias(**self.accepted(self.changes_bias, settings)))

    def accepted(self, fn: Callable, inputs: dict[str, Any]) -> dict[str, Any]:
        """The subset of `inputs` that `fn` declares (all of them if it takes **kwargs)."""
        if fn not in self._accepts:
            params = inspect.signature(fn).parameters.values()
            if any(p.kind is p.VAR_KEYWORD for p in params):
                self._accepts[fn] = None
            else:
                self._accepts[fn] = {p.name for p in params}
        names = self._accepts[fn]
        return dict(inputs) if names is None else {k: v for k, v in inputs.items() if k in names}


_REGISTRY: dict[str, AdapterKind] = {}


def _origin(kind: AdapterKind) -> str:
    return f"{kind.weight.__module__}.{kind.weight.__qualname__}"


def register_kind(kind: AdapterKind, *, replace: bool = False) -> AdapterKind:
    """Makes a kind known to fusion, summary and emission. A name taken by a kind defined elsewhere
    is an AdapterError unless replace=True (re-running the defining module re-registers freely)."""
    old = _REGISTRY.get(kind.name)
    if old is not None and not replace and _origin(old) != _origin(kind):
        raise AdapterError(
            f"adapter kind '{kind.name}' is already registered (weight transform {_origin(old)}); "
            "choose another name, or pass replace=True to replace it"
        )
    for fn in (kind.weight, kind.bias):
        if fn is not None and "<locals>" in getattr(fn, "__qualname__", ""):
            raise AdapterError(
                f"adapter kind '{kind.name}': {fn.__qualname__} is a local function; graph code can "
                "only call module-level functions, so define it at the top level of a module"
            )
    _REGISTRY[kind.name] = kind
    return kind


def registered_kinds() -> dict[str, AdapterKind]:
    """Every registered kind by name (a copy)."""
    return dict(_REGISTRY)


def get_kind(name: str) -> AdapterKind:
    """The registered kind called `name`."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise AdapterError(
            f"adapter kind '{name}' is not registered; import the module that defines it "
            f"(known kinds: {sorted(_REGISTRY)})"
        ) from None
