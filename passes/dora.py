"""DoRA (Liu et al. 2024): weight-decomposed LoRA, W' = m · V / ‖V‖ with V = W + s·B@A.

‖V‖ is the L2 norm of each output channel's row of V viewed as (out, in/groups·k), as in
PEFT, and it is detached: its value follows V, but no gradient flows through it (paper §4.3).
m (out,) starts at ‖W‖, so W' = W at init. A, B are LoRA's (PEFT layout, B zero).

After `dora(gm, targets="fc", r=2, alpha=4)` (activation form) a Linear site reads:

    fc = self.fc(mean)
    fc_dora_base_weight = self.fc.weight
    fc_dora_factor = fxtune_passes_dora_dora_factor(fc_dora_base_weight, lora_a = fc_lora_a, ...)
    fc_lora_down = torch._C._nn.linear(mean, fc_lora_a, None)
    fc_lora_up = torch._C._nn.linear(fc_lora_down, fc_lora_b)
    fc_lora_scaled = fc_lora_up * 2.0
    fc_dora_base_bias = self.fc.bias
    fc_dora_unbiased = fc - fc_dora_base_bias
    fc_dora_inner = fc_dora_unbiased + fc_lora_scaled
    fc_dora_scaled = fc_dora_inner * fc_dora_factor
    fc_dora = fc_dora_scaled + fc_dora_base_bias

i.e. y' = (m/‖V‖)·(W x + s·B(A x)) + b: the bias is not rescaled. form="weight" calls
`dora_weight` on the weight before the op instead.
"""

from __future__ import annotations

import math
import operator
from typing import Callable

import torch
from torch import fx, nn

import fxtune
from fxtune import AdapterError, AdapterKind
from fxtune.kit import branch_is_cheaper, factored_down, plus_factored, rank_and_scale, rank_and_scale_problems


def _row_norm(v: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each output channel's row of the (out, in/groups·k) view (PEFT's axis)."""
    return torch.linalg.vector_norm(v.flatten(1), dim=1)


def dora_weight(
    w: torch.Tensor, *, lora_a: torch.Tensor, lora_b: torch.Tensor, magnitude: torch.Tensor, scale: float
) -> torch.Tensor:
    """The meaning: V = W + s·B@A rescaled so row o has norm m[o]; the norm is detached."""
    v = plus_factored(w, lora_a, lora_b, scale)
    factor = magnitude / _row_norm(v).detach()
    return v * factor.view(-1, *([1] * (w.dim() - 1)))


def dora_factor(
    w: torch.Tensor, *, lora_a: torch.Tensor, lora_b: torch.Tensor, magnitude: torch.Tensor, scale: float
) -> torch.Tensor:
    """m / ‖W + s·B@A‖ per output channel, the norm computed without autograd (it is detached)."""
    with torch.no_grad():
        norm = _row_norm(plus_factored(w.detach(), lora_a.detach(), lora_b.detach(), scale))
    return magnitude / norm


def _activation(em: fxtune.Emitter, x: fx.Node, y: fx.Node, inputs: dict) -> fx.Node:
    """(m/‖V‖)·(y − b + s·B(A x)) + b, with ‖V‖ from the site's own weight (DoRA acts first here)."""
    site = em.site
    w = em.base_weight(role="dora_base_weight")
    tensors = {k: inputs[k] for k in ("lora_a", "lora_b", "magnitude")}
    factor = em.call(dora_factor, w, **tensors, scale=inputs["scale"], role="dora_factor")
    down, groups = factored_down(em, x, inputs["lora_a"], role="lora")
    bias = None
    if site.has_bias:
        bias = em.channel_view(em.base_bias(role="dora_base_bias"), role="dora_bias_view")
        y = em.call(operator.sub, y, bias, role="dora_unbiased")
    inner = em.pointwise_add(y, down, inputs["lora_b"], scale=inputs["scale"], groups=groups, role="dora_inner")
    out = em.mul(inner, em.channel_view(factor, role="dora_factor_view"), role="dora_scaled")
    return out if bias is None else em.add(out, bias, role="dora")


def check_settings(config: dict, tensors: dict) -> list[str]:
    """r is the factors' rank and scale what alpha, r and rslora give (a saved file cannot say otherwise)."""
    return rank_and_scale_problems(config, {"lora_a": tensors.get("lora_a")}, stabilized="rslora")


KIND = fxtune.register_kind(
    AdapterKind("dora", weight=dora_weight, activation=_activation, activation_reads_weight=True, check=check_settings,
                channel_axes={"lora_a": {"in_group": None}, "lora_b": {"out": 0}, "magnitude": {"out": 0}})
)


def _settings(site: fxtune.Site, *, r, alpha, rslora) -> dict:
    """This site's r, alpha, rslora and scale (the kit's rank_and_scale), as the slot's config."""
    r, alpha, rslora, scale = rank_and_scale(site, r=r, alpha=alpha, stabilized=rslora)
    return {"r": r, "alpha": alpha, "scale": scale, "rslora": rslora}


@fxtune.register_pass
def dora(
    gm: fx.GraphModule,
    targets: fxtune.Selector = None,
    *,
    r: int | dict | Callable = 8,
    alpha: float | dict | Callable | None = None,
    rslora: bool | dict | Callable = False,
    form: str = "auto",
    adapter: str = "default",
    exclude: fxtune.Selector = None,
) -> fx.GraphModule:
    """Adds a DoRA adapter (A kaiming-uniform, B zero, m = ‖W‖ per row) to every selected site.

    scale = alpha/r (alpha/sqrt(r) with rslora; alpha defaults to r); r, alpha and rslora may be
    per site ({glob: value} or Site -> value). form: "activation", "weight" or "auto" (LoRA's rule).
    """
    if form not in ("auto", "weight", "activation"):
        raise AdapterError(f"form must be 'auto', 'weight' or 'activation', got {form!r}")
    rw = fxtune.Rewrite(gm, kind="dora", adapter=adapter)
    for target, found in rw.select(targets, exclude=exclude).items():
        site = found[0]
        config = _settings(site, r=r, alpha=alpha, rslora=rslora)
        weight = rw.entering_weight(target)  # what DoRA rescales: the weight under the adapters already on it
        magnitude = _row_norm(weight.double()).to(weight.dtype)
        if not bool((magnitude > 0).all()):
            rows = torch.nonzero(magnitude == 0).flatten().tolist()
            raise AdapterError(
                f"'{site.name}' has all-zero weight rows {rows[:8]} (with the adapters already on it): DoRA's "
                "direction W/‖W‖ is undefined there; exclude this site (exclude=...) or remove those channels first"
            )
        rank = config["r"]
        a = nn.init.kaiming_uniform_(weight.new_empty((rank, weight.shape[1], *site.kernel_size)), a=math.sqrt(5))
        b = weight.new_zeros((site.out_features, rank, *([1] * len(site.kernel_size))))
        chosen = form
        if form == "auto":
            chosen = "activation" if branch_is_cheaper(site, rank) else "weight"
        rw.attach(
            target,
            params={"lora_a": a, "lora_b": b, "magnitude": magnitude},
            config=config,
            form=chosen,
            reason="auto: the weight form is cheaper here" if form == "auto" and chosen == "weight" else "",
        )
    return rw.finish()
