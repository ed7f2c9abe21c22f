"""LoRA: a trainable low-rank delta, W' = W + s·B@A, with B@A reshaped to the weight's shape.

A is (r, in/groups, *kernel) and B is (out, r, 1, ...), PEFT's layout, so on a conv the
activation form is a conv in→r with the site's geometry then a 1×1 conv r→out; grouped
convs repeat A per group. The weight form adds s·B@A to W before the call. An embedding's
weight is seen transposed, (dim, num_embeddings): A is (r, num), B is (dim, r) and the table
gets (B@A)ᵀ, PEFT's lora_embedding_A/B; the activation form looks x up in Aᵀ, then applies B.
"""

from __future__ import annotations

import math
import re
from typing import Callable

import torch
from torch import fx, nn

import fxtune
from fxtune import AdapterError, AdapterKind
from fxtune.kit import (
    branch_is_cheaper, checked_fraction, factored_down, plus_factored, rank_and_scale, rank_and_scale_problems, scale_of,
)


def lora_weight(w: torch.Tensor, *, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """The meaning: W + scale · (B @ A) viewed as W's shape (out, in/groups, *kernel)."""
    return plus_factored(w, lora_a, lora_b, scale)


def _activation(em: fxtune.Emitter, x: fx.Node, y: fx.Node, inputs: dict) -> fx.Node:
    """y + s · B(A(dropout(x))): A with the site's geometry, B as a 1×1 channel mix fused with the add."""
    h = em.module("dropout", x, role="lora_dropout") if inputs["dropout"] > 0 else x
    down, groups = factored_down(em, h, inputs["lora_a"], role="lora")
    return em.pointwise_add(y, down, inputs["lora_b"], scale=inputs["scale"], groups=groups, role="lora")


def _restore(site: fxtune.Site, weight: torch.Tensor, config: dict, tensors: dict, *, base: torch.Tensor) -> dict:
    """A reloaded adapter's dropout module and, for PiSSA, its residual base weight (from the base, as made)."""
    return {
        "modules": {"dropout": nn.Dropout(config["dropout"])} if config["dropout"] > 0 else None,
        "base_weight": pissa_residual(base, tensors["pissa_a0"], tensors["pissa_b0"], config["scale"])
        if config["init"] == "pissa" else None,
    }


def _needs_activations(config: dict) -> str | None:
    """Why this adapter cannot be computed in the weight form (dropout acts on activations)."""
    return f"its dropout={config['dropout']} acts on the input activations" if config["dropout"] > 0 else None


SETTINGS = ("r", "alpha", "scale", "rslora", "init", "dropout")


def check_settings(config: dict, tensors: dict) -> list[str]:
    """r must be the factors' rank and scale what alpha, r and rslora give, else a re-export to PEFT
    (which reads r and alpha) would compute something other than fxtune (which uses scale)."""
    problems = [f"setting '{k}' is missing" for k in SETTINGS if k not in config]
    problems += [f"unknown setting '{k}' (LoRA's settings: {', '.join(SETTINGS)})" for k in config if k not in SETTINGS]
    if problems:
        return problems
    problems = rank_and_scale_problems(config, {"lora_a": tensors.get("lora_a"), "lora_b": tensors.get("lora_b")}, stabilized="rslora")
    if (config["init"] == "pissa") != ("pissa_a0" in tensors):
        problems.append(f"init={config['init']!r} does not fit its tensors ({sorted(tensors)})")
    return problems


class LoraPeft(fxtune.PeftFormat):
    """LoRA in PEFT's format: per module `lora_A.weight` / `lora_B.weight` (fxtune's A, B as they are;
    on a transformers Conv1D too, PEFT's fan_in_fan_out), r and lora_alpha per module via patterns."""

    peft_type = "LORA"
    tensor_names = ("lora_A.weight", "lora_B.weight")
    config_keys = frozenset({"r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "lora_dropout", "bias", "init_lora_weights"})
    # no effect on what plain LoRA computes: PEFT sets fan_in_fan_out per layer type itself; the
    # init configs' whole effect is already in the saved tensors
    inert_keys = frozenset({"fan_in_fan_out", "megatron_core", "qalora_group_size", "ensure_weight_tying", "runtime_config",
                            "loftq_config", "eva_config", "corda_config", "lora_ga_config"})
    feature_names = {
        "use_dora": "DoRA (use_dora)", "lora_bias": "a bias on lora_B (lora_bias)",
        "target_parameters": "LoRA on bare parameters (target_parameters)", "layer_replication": "layer_replication",
        "trainable_token_indices": "trainable tokens (trainable_token_indices)", "alora_invocation_tokens": "aLoRA",
        "use_qalora": "QALoRA", "megatron_config": "Megatron parallel layers", "use_bdlora": "BD-LoRA",
        "arrow_config": "Arrow routing", "kasa_config": "KaSA", "monteclora_config": "MonteCLoRA", "velora_config": "VeLoRA",
    }
    BASE_CHANGING = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")  # inits whose A, B belong on a changed base

    def site_problem(self, site: fxtune.Site) -> str | None:
        """Where PEFT's LoRA layer is not W + s·B@A on this weight: other layer types, and conv geometry
        PEFT's lora_A does not copy."""
        module, geometry = site.module, site.geometry
        if type(module).__name__ != "Conv1D" and not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return (f"a {type(module).__name__} weight ({site.layer}); PEFT's format here holds LoRA on Linear/Conv layers "
                    "and transformers' Conv1D only (save with format='fxtune')")
        if geometry.groups != 1:
            return (f"a grouped conv (groups={geometry.groups}): PEFT's LoRA there is a full conv in→r and a "
                    "grouped 1×1 conv, not a delta on this weight")
        if any(d != 1 for d in _as_tuple(geometry.dilation)):
            return f"dilation={tuple(_as_tuple(geometry.dilation))}: PEFT's lora_A ignores the layer's dilation"
        if geometry.padding_mode != "zeros":
            return f"padding_mode={geometry.padding_mode!r}: PEFT's lora_A pads with zeros"
        return None

    def config_problems(self, config: dict) -> list[str]:
        refused = []
        if config.get("bias", "none") != "none":
            refused.append(f"bias={config['bias']!r} (trainable base biases)")
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.startswith(self.BASE_CHANGING):
            refused.append(f"init_lora_weights={init!r} (its factors belong on a changed base weight; "
                           "convert it to plain LoRA in PEFT first)")
        return refused

    def to_peft(self, slot: fxtune.AdapterSlot, site: fxtune.Site) -> fxtune.PeftModule:
        """A and B as PEFT applies them to the original weight. A PiSSA slot acts on a residual base;
        its delta to the original, s·(B@A − B0@A0), is written as PEFT converts PiSSA: the rank-2r
        LoRA [A; A0], [B, −B0], with alpha keeping s unchanged."""
        a, b = slot.lora_a.detach(), slot.lora_b.detach()
        r, alpha, rslora = slot.config["r"], slot.config["alpha"], slot.config["rslora"]
        if slot.config.get("init") == "pissa":
            a = torch.cat([a, slot.pissa_a0.detach()], 0)
            b = torch.cat([b, -slot.pissa_b0.detach()], 1)
            r, alpha = 2 * r, alpha * math.sqrt(2) if rslora else 2 * alpha
        settings = {"r": r, "lora_alpha": alpha, "lora_dropout": slot.config["dropout"], "use_rslora": bool(rslora),
                    "fan_in_fan_out": type(site.module).__name__ == "Conv1D"}
        return fxtune.PeftModule({"lora_A.weight": a, "lora_B.weight": b}, settings)

    def keeps_replaced_base(self, slot: fxtune.AdapterSlot) -> bool:
        return slot.config.get("init") == "pissa"

    def adapter_config(self, modules: dict, module_names: list[str]) -> dict:
        r, rank_pattern = self.per_module({m: pm.settings["r"] for m, pm in modules.items()}, module_names)
        alpha, alpha_pattern = self.per_module({m: pm.settings["lora_alpha"] for m, pm in modules.items()}, module_names)
        return {
            "r": r, "lora_alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
            "lora_dropout": self.one_value(modules, "lora_dropout"), "use_rslora": self.one_value(modules, "use_rslora"),
            "fan_in_fan_out": any(pm.settings["fan_in_fan_out"] for pm in modules.values()),
            "bias": "none", "init_lora_weights": True, "use_dora": False, "lora_bias": False,
            "layers_to_transform": None, "layers_pattern": None,
        }

    def from_peft(self, module: str, site: fxtune.Site, tensors: dict, config: dict) -> dict | str:
        try:
            r = self.pattern_value(config.get("rank_pattern"), module, config.get("r", 8))
            alpha = self.pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
        except (re.error, TypeError) as e:
            return f"rank_pattern / alpha_pattern is not a valid regular expression: {e}"
        if not isinstance(r, int) or isinstance(r, bool) or r < 1 or not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            return f"r={r!r}, lora_alpha={alpha!r}; r must be a positive int and alpha a number"
        a, b = tensors["lora_A.weight"], tensors["lora_B.weight"]
        want = _factor_shapes(site, r)
        if (tuple(a.shape), tuple(b.shape)) != want:
            return (f"lora_A {list(a.shape)}, lora_B {list(b.shape)} in the file; its weight {list(site.shape)} "
                    f"(out, in, *kernel) with r={r} needs {list(want[0])} and {list(want[1])}")
        dropout, rslora = config.get("lora_dropout", 0.0), config.get("use_rslora", False)
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1 or not isinstance(rslora, bool):
            return f"lora_dropout={dropout!r}, use_rslora={rslora!r}; dropout must be in [0, 1) and use_rslora a bool"
        init = "gaussian" if config.get("init_lora_weights", True) == "gaussian" else "default"
        settings = {"r": r, "alpha": alpha, "scale": scale_of(r, alpha, rslora),
                    "rslora": rslora, "init": init, "dropout": float(dropout)}
        return {"params": {"lora_a": a, "lora_b": b}, "config": settings}


def _as_tuple(value) -> tuple:
    """A conv setting as a tuple (an int stands for every spatial dimension)."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _factor_shapes(site: fxtune.Site, r: int) -> tuple[tuple, tuple]:
    """A and B shapes in PEFT's (and fxtune's) layout for this site's canonical weight (groups = 1)."""
    kernel = tuple(site.kernel_size)
    return (r, site.shape[1], *kernel), (site.shape[0], r, *([1] * len(kernel)))


KIND = fxtune.register_kind(
    AdapterKind(
        "lora", weight=lora_weight, activation=_activation, restore=_restore, weight_blocker=_needs_activations,
        check=check_settings, peft=LoraPeft(),
        channel_axes={"lora_a": {"in_group": 1}, "lora_b": {"out": 0}, "pissa_a0": {"in_group": 1}, "pissa_b0": {"out": 0}},
    )
)


activation_is_cheaper = branch_is_cheaper  # the `form="auto"` rule (the kit's, shared with DoRA)


def _factors(site: fxtune.Site, weight: torch.Tensor, r: int, init: str, scale: float):
    """A, B in PEFT's layout, and the new base weight for PiSSA (else None)."""
    shape_a = (r, weight.shape[1], *site.kernel_size)
    shape_b = (site.out_features, r, *([1] * len(site.kernel_size)))
    if site.layer == "embedding" and init != "pissa":  # PEFT's (and loralib's) embedding init: A zero, B ~ N(0, 1)
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
        raise AdapterError(f"init='pissa' needs r <= {min(matrix.shape)} on '{site.weight_name}' (its weight is {tuple(matrix.shape)} as a matrix); got r={r}")
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


def _settings(site: fxtune.Site, form: str, *, r, alpha, dropout, rslora, init) -> tuple:
    """This site's (r, alpha, dropout, rslora, init, scale), each resolved with `fxtune.per_site`, validated."""
    r, alpha, rslora, scale = rank_and_scale(site, r=r, alpha=alpha, stabilized=rslora)
    dropout = checked_fraction(dropout, "dropout", site)
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
    return r, alpha, dropout, rslora, init, scale


@fxtune.register_pass
def lora(
    gm: fx.GraphModule,
    targets: fxtune.Selector = None,
    *,
    r: int | dict | Callable = 8,
    alpha: float | dict | Callable | None = None,
    dropout: float | dict | Callable = 0.0,
    rslora: bool | dict | Callable = False,
    init: str | dict | Callable = "default",
    form: str = "auto",
    adapter: str = "default",
    exclude: fxtune.Selector = None,
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
        r, alpha, dropout, rslora, init, scale = _settings(site, form, **options)
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
