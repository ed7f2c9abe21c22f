"""LoRA: a trainable low-rank delta, W' = W + s·B@A, with B@A reshaped to the weight's shape.

A is (r, in/groups, *kernel) and B is (out, r, 1, ...), PEFT's layout, so on a conv the
activation form is a conv in→r with the site's geometry then a 1×1 conv r→out; grouped
convs repeat A per group. The weight form adds s·B@A to W before the call. An embedding's
weight is seen transposed, (dim, num_embeddings): A is (r, num), B is (dim, r) and the table
gets (B@A)ᵀ, PEFT's lora_embedding_A/B; the activation form looks x up in Aᵀ, then applies B.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import fx, nn

import fxtune
from fxtune import AdapterError, AdapterKind


def lora_weight(w: torch.Tensor, *, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """The meaning: W + scale · (B @ A) viewed as W's shape (out, in/groups, *kernel)."""
    return w + scale * (lora_b.flatten(1) @ lora_a.flatten(1)).view(w.shape)


def _activation(em: fxtune.Emitter, x: fx.Node, y: fx.Node, inputs: dict) -> fx.Node:
    """y + s · B(A(dropout(x))): A with the site's geometry, B as a 1×1 channel mix fused with the add."""
    h = em.module("dropout", x, role="lora_dropout") if inputs["dropout"] > 0 else x
    a, groups = inputs["lora_a"], em.site.groups
    if groups > 1:
        a = em.method("repeat", a, groups, *([1] * (len(em.site.weight_shape) - 1)), role="lora_a_grouped")
    down = em.site_call(h, a, groups=groups, role="lora_down")
    return em.pointwise_add(y, down, inputs["lora_b"], scale=inputs["scale"], groups=groups, role="lora")


def _restore(site: fxtune.Site, weight: torch.Tensor, config: dict, tensors: dict) -> dict:
    """A reloaded adapter's dropout module and, for PiSSA, its residual base weight."""
    return {
        "modules": {"dropout": nn.Dropout(config["dropout"])} if config["dropout"] > 0 else None,
        "base_weight": pissa_residual(weight, tensors["pissa_a0"], tensors["pissa_b0"], config["scale"])
        if config["init"] == "pissa" else None,
    }


def _needs_activations(config: dict) -> str | None:
    """Why this adapter cannot be computed in the weight form (dropout acts on activations)."""
    return f"its dropout={config['dropout']} acts on the input activations" if config["dropout"] > 0 else None


KIND = fxtune.register_kind(
    AdapterKind("lora", weight=lora_weight, activation=_activation, restore=_restore, weight_blocker=_needs_activations,
                channel_axes={"lora_a": {"in_group": 1}, "lora_b": {"out": 0}, "pissa_a0": {"in_group": 1}, "pissa_b0": {"out": 0}})
)


def activation_is_cheaper(site: fxtune.Site, r: int) -> bool:
    """The `form="auto"` rule, per output position in training: the branch's extra multiply-adds,
    r·(in·k + out), against the weight gradient the weight form pays, out·(in/groups)·k."""
    k = site.kernel_volume
    return r * (site.in_features * k + site.out_features) < site.out_features * (site.in_features // site.groups) * k


def _factors(site: fxtune.Site, weight: torch.Tensor, r: int, init: str, scale: float):
    """A, B in PEFT's layout, and the new base weight for PiSSA (else None)."""
    shape_a = (r, weight.shape[1], *site.kernel_size)
    shape_b = (site.out_features, r, *([1] * len(site.kernel_size)))
    if site.kind == "embedding" and init != "pissa":  # PEFT's (and loralib's) embedding init: A zero, B ~ N(0, 1)
        return weight.new_zeros(shape_a), torch.randn(shape_b, dtype=weight.dtype, device=weight.device), None
    if init == "default":
        a = nn.init.kaiming_uniform_(torch.empty(shape_a, dtype=weight.dtype, device=weight.device), a=math.sqrt(5))
        return a, weight.new_zeros(shape_b), None
    if init == "gaussian":
        a = torch.randn(shape_a, dtype=weight.dtype, device=weight.device) / r
        return a, weight.new_zeros(shape_b), None
    matrix = weight.flatten(1).double()
    if site.kept is not None:  # entries never adapted (an embedding's padding row) stay out of A, B and the residual
        matrix.index_fill_(site.kept[0], torch.tensor(site.kept[1]), 0.0)
    if r > min(matrix.shape):
        raise AdapterError(f"init='pissa' needs r <= {min(matrix.shape)} on '{site.target}' (its weight is {tuple(matrix.shape)} as a matrix); got r={r}")
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = torch.sqrt(s[:r] / scale)
    a = (root[:, None] * vh[:r]).reshape(shape_a).to(weight.dtype)
    b = (u[:, :r] * root[None, :]).reshape(shape_b).to(weight.dtype)
    if site.kept is not None:
        (b if site.kept[0] == 0 else a).index_fill_(site.kept[0], torch.tensor(site.kept[1]), 0.0)
    return a, b, pissa_residual(weight, a, b, scale)


def pissa_residual(weight: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor, scale: float) -> torch.Tensor:
    """W - s·B0@A0 in float64: the base PiSSA leaves; recomputable exactly from the saved A0, B0."""
    delta = b0.double().flatten(1) @ a0.double().flatten(1)
    return (weight.double() - scale * delta.view(weight.shape)).to(weight.dtype)


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _settings(site: fxtune.Site, form: str, *, r, alpha, dropout, rslora, init) -> tuple:
    """This site's (r, alpha, dropout, rslora, init), each resolved with `fxtune.per_site`, validated."""
    r = fxtune.per_site(r, site, 8)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterError(f"r must be a positive int, got {r!r} for '{site.name}'")
    alpha = fxtune.per_site(alpha, site, None)
    alpha = r if alpha is None else alpha
    if not _finite_number(alpha):
        raise AdapterError(f"alpha must be a finite number, got {alpha!r} for '{site.name}'")
    dropout = fxtune.per_site(dropout, site, 0.0)
    if not _finite_number(dropout) or not 0.0 <= dropout < 1.0:
        raise AdapterError(f"dropout must be in [0, 1), got {dropout!r} for '{site.name}'")
    if dropout > 0 and site.input_is_indices:
        raise AdapterError(
            f"dropout={dropout} on '{site.name}' would act on an embedding's input, which is indices; give embeddings "
            "dropout 0, e.g. dropout={'<embedding name>': 0.0, '*': " + f"{dropout}" + "}"
        )
    if dropout > 0 and form == "weight":
        raise AdapterError(
            f"dropout={dropout} on '{site.name}' acts on the adapter's input activations, which the weight "
            "form never sees; use form='activation' or 'auto'"
        )
    init = fxtune.per_site(init, site, "default")
    if init not in ("default", "gaussian", "pissa"):
        raise AdapterError(f"init must be 'default', 'gaussian' or 'pissa', got {init!r} for '{site.name}'")
    return r, alpha, dropout, bool(fxtune.per_site(rslora, site, False)), init


def lora(
    gm: fx.GraphModule,
    targets: fxtune.selection.Selector = None,
    *,
    r: int | dict | Callable = 8,
    alpha: float | dict | Callable | None = None,
    dropout: float | dict | Callable = 0.0,
    rslora: bool | dict | Callable = False,
    init: str | dict | Callable = "default",
    form: str = "auto",
    adapter: str = "default",
    exclude: fxtune.selection.Selector = None,
) -> fx.GraphModule:
    """Adds a LoRA adapter to every selected site; returns a new GraphModule (input untouched).

    scale = alpha/r (alpha/sqrt(r) with rslora; alpha defaults to r). init: "default" (A
    kaiming-uniform, B zero; embeddings: A zero, B ~ N(0, 1), as PEFT), "gaussian" (A ~ N(0, 1/r²),
    B zero; embeddings as default) or "pissa" (principal
    singular directions of W moved into A, B). form: "activation", "weight" or "auto".
    r, alpha, dropout, rslora and init may also be per site: {glob: value} (first match wins,
    other sites take the default) or a callable Site -> value.
    """
    if form not in ("auto", "weight", "activation"):
        raise AdapterError(f"form must be 'auto', 'weight' or 'activation', got {form!r}")
    options = dict(r=r, alpha=alpha, dropout=dropout, rslora=rslora, init=init)
    rw = fxtune.Rewrite(gm, kind="lora", adapter=adapter)
    for target, found in rw.select(targets, exclude=exclude).items():
        site = found[0]
        r, alpha, dropout, rslora, init = _settings(site, form, **options)
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        weight = rw.weight(target)
        a, b, residual = _factors(site, weight, r, init, scale)
        if a.numel() + b.numel() > site.weight_numel:
            fxtune.warn(
                f"LoRA r={r} on '{target}' has {a.numel() + b.numel():,} parameters, more than the "
                f"{site.weight_numel:,} of the weight it adapts; lower r or exclude this site"
            )
        if residual is not None:
            rw.replace_base_weight(target, residual)
        chosen = form
        if form == "auto":
            chosen = "activation" if dropout > 0 or activation_is_cheaper(site, r) else "weight"
        rw.attach(
            target,
            params={"lora_a": a, "lora_b": b},
            buffers={"pissa_a0": a, "pissa_b0": b} if init == "pissa" else None,
            modules={"dropout": nn.Dropout(dropout)} if dropout > 0 else None,
            config={"r": r, "alpha": alpha, "scale": scale, "rslora": rslora, "init": init, "dropout": dropout},
            form=chosen,
            reason="auto: the weight form is cheaper here" if form == "auto" and chosen == "weight" else "",
        )
    return rw.finish()
