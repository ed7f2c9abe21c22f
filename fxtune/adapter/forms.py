"""Which form each adapter on a site takes: the one it asked for, unless the site or its neighbours forbid it.

Activation forms need the site's input and output as tensors of its own call; weight forms need
only the weight. Composition is in slot order, so an adapter may act on activations only if no
weight-form adapter comes after it on the same site.
"""

from __future__ import annotations

import torch
from torch import fx

from ..errors import AdapterError
from ..graph.sites import Site
from .emitter import Emitter
from .kinds import AdapterKind, get_kind
from .slots import AdapterSlot


def opaque_reason(site: Site) -> str:
    """Why an opaque site's adapters act through the parameters its module is called with."""
    if site.caller is site.module:
        return f"{type(site.module).__name__} has its own forward"
    return f"inside {type(site.caller).__name__} '{site.caller_path}', called as a whole"


def site_blocker(site: Site) -> str | None:
    """Why no adapter can take the activation form on this site, if so."""
    if site.call == "value":
        return "its weight flows on as a value"
    if site.call == "mha":
        return "inside nn.MultiheadAttention"
    if site.call == "opaque":
        return opaque_reason(site)
    if not site.canonical:
        return f"uses the tied weight of '{site.weight_name}' in another layout"
    return None


def _acts_on_input(site: Site, slot: AdapterSlot, kind: AdapterKind) -> bool:
    """Whether the kind's input-side activation form would change this site's input (tried on a scratch graph)."""
    if kind.activation_input is None:
        return False
    graph = fx.Graph()
    x = graph.placeholder("x")
    em = Emitter(None, site, adapter=slot.adapter, kind=kind.name, graph=graph)
    inputs = {k: graph.placeholder(k) if isinstance(v, torch.Tensor) else v for k, v in slot.inputs().items()}
    return kind.activation_input(em, x, inputs) is not x


def effective_forms(site: Site, slots: list[AdapterSlot]) -> list[tuple[str, str]]:
    """(form, reason) of each slot as emitted: requested, unless something forces the weight form."""
    forms = []
    blocked = site_blocker(site)
    for i, slot in enumerate(slots):
        kind = get_kind(slot.kind)
        reason = slot.form_reason
        if slot.form == "activation":
            blocker = kind.activation_blocker(site, slot.config) if kind.activation_blocker else None
            if blocked:
                reason = blocked
            elif kind.activation is None and kind.activation_input is None:
                reason = f"{kind.name} has no activation form"
            elif blocker:
                reason = blocker
            elif kind.activation_reads_weight and i > 0:
                reason = f"{kind.name}'s activation form reads the base weight, and '{slots[0].adapter}' acts before it"
            elif site.input_is_indices and _acts_on_input(site, slot, kind):
                reason = f"{kind.name} acts on the input, which is indices here"
        forms.append(("weight" if slot.form == "weight" or reason else "activation", reason))
    last_weight = max((i for i, (form, _) in enumerate(forms) if form == "weight"), default=-1)
    for i in range(last_weight):
        if forms[i][0] == "activation":
            forms[i] = ("weight", "a weight-form adapter follows it on this site")
    for slot, (form, reason) in zip(slots, forms):
        blocker = get_kind(slot.kind).weight_blocker
        why = blocker(slot.config) if form == "weight" and blocker else None
        if why:
            raise AdapterError(
                f"adapter '{slot.adapter}' ({slot.kind}) on '{site.name}' needs the activation form ({why}), "
                f"but it would be computed in the weight form: {reason or 'requested'}. Use another site, "
                "or an activation-form adapter after it"
            )
    return forms
