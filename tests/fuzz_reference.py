"""The fuzz tests' float64 reference: what a GraphModule's adapters mean, computed without fxtune's graph code.

It reads the adapter slots (`gm.fxtune.<adapter>.<target>`: kind, target, config, tensors, active,
order), applies each kind's own weight transform `fxtune.get_kind(kind).weight/.bias` in float64
to the base weight's canonical (out, in/groups, *kernel) view, located here from the module types
(an embedding's table and a Conv1D weight transposed, q/k/v as rows of an attention's
in_proj_weight), and runs the base module on those weights with `torch.func.functional_call`.
PiSSA's base change (W - s·B0@A0 while the adapter is active) and an embedding's never-adapted
padding row are written out here too.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

import fxtune


@dataclass(frozen=True)
class Located:
    """Where the canonical view of a target's weight (and bias) lives in a module tree."""

    weight: str
    rows: tuple[int, int] | None = None
    transposed: bool = False
    bias: str | None = None
    bias_rows: tuple[int, int] | None = None
    padding_idx: int | None = None


def locate(base: nn.Module, target: str) -> Located:
    """The parameter paths of `target` (a module path, or `<attention>.q/.k/.v`) in `base`."""
    parent, _, leaf = target.rpartition(".")
    if leaf in ("q", "k", "v"):
        mha = base.get_submodule(parent)
        if isinstance(mha, nn.MultiheadAttention):
            i, e = "qkv".index(leaf), mha.embed_dim
            rows = (i * e, (i + 1) * e)
            weight = (f"{parent}.in_proj_weight", rows) if mha.in_proj_weight is not None else (f"{parent}.{leaf}_proj_weight", None)
            bias = f"{parent}.in_proj_bias" if mha.in_proj_bias is not None else None
            return Located(weight[0], weight[1], bias=bias, bias_rows=rows if bias else None)
    module = base.get_submodule(target)
    embedding = isinstance(module, nn.Embedding)
    return Located(
        f"{target}.weight",
        transposed=embedding or type(module).__name__ == "Conv1D",
        bias=f"{target}.bias" if getattr(module, "bias", None) is not None else None,
        padding_idx=module.padding_idx if embedding else None,
    )


def adapter_slots(gm: nn.Module) -> list[fxtune.AdapterSlot]:
    """Every adapter slot of gm, in the order the adapters were added."""
    namespace = gm._modules.get("fxtune")
    if namespace is None:
        return []
    return sorted((m for m in namespace.modules() if isinstance(m, fxtune.AdapterSlot)), key=lambda s: s.order)


def _accepted(fn, inputs: dict) -> dict:
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return inputs
    names = {p.name for p in params}
    return {k: v for k, v in inputs.items() if k in names}


def slot_inputs64(slot: fxtune.AdapterSlot) -> dict:
    """The slot's transform inputs with every floating tensor in float64 (detached copies)."""
    return {k: v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in slot.inputs().items()}


def _pissa_part(slot: fxtune.AdapterSlot, shape: torch.Size) -> torch.Tensor:
    """s·B0@A0: what a PiSSA-initialised LoRA moved out of the base weight (while it is active)."""
    b0, a0 = slot.pissa_b0.detach().double(), slot.pissa_a0.detach().double()
    return slot.config["scale"] * (b0.flatten(1) @ a0.flatten(1)).view(shape)


def adapted_weights(base: nn.Module, gm: nn.Module, chosen: set[str] | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """base's floating parameters and buffers in float64, with gm's active adapters (or those named in
    `chosen`) applied."""
    values = {k: v.detach().double() for k, v in [*base.named_parameters(), *base.named_buffers()] if v.is_floating_point()}
    amplification = 1.0
    by_target: dict[str, list[fxtune.AdapterSlot]] = {}
    for slot in adapter_slots(gm):
        if (slot.active if chosen is None else slot.adapter in chosen):
            by_target.setdefault(slot.target, []).append(slot)
    for target, slots in by_target.items():
        loc = locate(base, target)
        raw = values[loc.weight]
        w0 = raw[loc.rows[0]:loc.rows[1]] if loc.rows else raw
        w0 = w0.t() if loc.transposed else w0
        for slot in slots:
            if slot.kind == "lora" and slot.config.get("init") == "pissa":
                w0 = w0 - _pissa_part(slot, w0.shape)
        b = None
        if loc.bias is not None:
            b = values[loc.bias]
            b = b[loc.bias_rows[0]:loc.bias_rows[1]] if loc.bias_rows else b
        w = w0
        for slot in slots:
            kind, inputs = fxtune.get_kind(slot.kind), slot_inputs64(slot)
            if slot.kind == "dora":
                amplification = max(amplification, _dora_amplification(w, inputs))
            w = kind.weight(w, **_accepted(kind.weight, inputs))
            if loc.padding_idx is not None:  # the embedding's padding row (a column of the transposed view) is never
                w = w.clone()                # adapted: every adapter sees it as it was
                w[:, loc.padding_idx] = w0[:, loc.padding_idx]
            if b is not None and kind.bias is not None:
                b = kind.bias(b, **_accepted(kind.bias, inputs))
        w = w.t() if loc.transposed else w
        values[loc.weight] = torch.cat([raw[:loc.rows[0]], w, raw[loc.rows[1]:]]) if loc.rows else w
        if b is not None:
            full = values[loc.bias]
            values[loc.bias] = torch.cat([full[:loc.bias_rows[0]], b, full[loc.bias_rows[1]:]]) if loc.bias_rows else b
    return values, amplification


def _dora_amplification(w: torch.Tensor, inputs: dict) -> float:
    """How much DoRA's row normalisation m/‖V‖, V = W + s·B@A, magnifies float32 rounding where the
    update all but cancels a row of W (its activation form adds W·x and s·B·A·x before normalising)."""
    delta = inputs["scale"] * (inputs["lora_b"].flatten(1) @ inputs["lora_a"].flatten(1))
    v = w.flatten(1) + delta
    return float(((w.flatten(1).norm(dim=1) + delta.norm(dim=1)) / v.norm(dim=1).clamp_min(1e-30)).max())


def reference_output(
    base: nn.Module, gm: nn.Module, x: torch.Tensor, chosen: set[str] | None = None
) -> tuple[torch.Tensor, float]:
    """What gm should output on x: base run in float64 on the weights gm's active (or chosen) adapters
    make; and by how much the adapters' own conditioning may magnify float32 rounding (>= 1)."""
    values, amplification = adapted_weights(base, gm, chosen)
    x64 = x.double() if x.is_floating_point() else x
    with torch.no_grad():
        return functional_call(base, values, (x64,)), amplification


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| over max |ref| (at least 1e-3, so an all-but-zero output compares absolutely)."""
    y, ref = y.detach().double(), ref.detach().double()
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-3))
