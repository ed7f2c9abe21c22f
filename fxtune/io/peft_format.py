"""PEFT's LoRA adapter directories (adapter_config.json + adapter_model.safetensors), both ways.

Loading resolves target_modules, exclude_modules, rank_pattern and alpha_pattern with PEFT's
own matching rules against the GraphModule's module paths and re-creates every adapted layer as
an fxtune "lora" slot; saving writes fxtune LoRA adapters so `peft.PeftModel.from_pretrained`
loads them. Only JSON and safetensors are read: nothing is unpickled or executed.
Tensor keys are PEFT's: `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`;
fxtune also notes each site's graph form in the safetensors metadata, which PEFT ignores.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import fx, nn

from ..adapter.base_weights import replaced_by
from ..adapter.kinds import registered_kinds
from ..adapter.slots import AdapterSlot, all_slots, require_adapters
from ..errors import AdapterError
from ..graph.discovery import site_table
from ..graph.ownership import NAMESPACE
from ..graph.weights import Weights
from ..kit.rewrite import Rewrite

CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
PREFIX = "base_model.model."
FORMS_KEY = "fxtune.forms"  # safetensors metadata PEFT ignores: each site's graph form, so a reload rebuilds the same graph

# Config keys that do not change what a plain LoRA computes: bookkeeping, and initialisation
# settings whose whole effect is already in the saved tensors (fan_in_fan_out only concerns
# transformers' Conv1D, which is no fxtune site; PEFT resets it for nn.Linear).
IGNORED = {
    "auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version",
    "fan_in_fan_out", "megatron_core", "qalora_group_size", "ensure_weight_tying", "runtime_config",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config",
}
READ = {"peft_type", "r", "lora_alpha", "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern",
        "use_rslora", "lora_dropout", "bias", "init_lora_weights"}
FEATURES = {  # readable names of PEFT options fxtune's PEFT format does not carry (any other set key is refused too)
    "use_dora": "DoRA (use_dora)", "lora_bias": "a bias on lora_B (lora_bias)",
    "modules_to_save": "modules_to_save (full trainable copies of layers)",
    "layers_to_transform": "layers_to_transform", "layers_pattern": "layers_pattern",
    "target_parameters": "LoRA on bare parameters (target_parameters)", "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)", "alora_invocation_tokens": "aLoRA",
    "use_qalora": "QALoRA", "megatron_config": "Megatron parallel layers", "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing", "kasa_config": "KaSA", "monteclora_config": "MonteCLoRA", "velora_config": "VeLoRA",
}
# init_lora_weights values under which PEFT changes the base weights, so A and B only make sense on top of them
BASE_CHANGING = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")


def _need_lora_kind() -> None:
    if "lora" not in registered_kinds():
        raise AdapterError("the 'lora' adapter kind is not registered; `import fxtune.passes` first, then retry")


def _module_names(gm: fx.GraphModule) -> list[str]:
    """The model's module paths as PEFT sees them (fxtune's own adapter modules left out)."""
    return [n for n, _ in gm.named_modules() if n and n != NAMESPACE and not n.startswith(NAMESPACE + ".")]


def _peft_selects(config: dict, name: str) -> bool:
    """Whether PEFT would put LoRA on the module at `name`: its check_target_module_exists rules
    (exclude first; a string is a regex full match, a list matches exactly or as a '.'-suffix)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, name):
                return False
        elif name in exclude or any(name.endswith(f".{e}") for e in exclude):
            return False
    targets = config["target_modules"]
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith(f".{t}") for t in targets)


def _pattern_hits(key: str, name: str) -> bool:
    """PEFT's get_pattern_key test: `(.*\\.)?(key)$` matched at the start of the module path."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def _pattern_value(patterns: dict, name: str, default: Any) -> Any:
    """The value of the first rank_pattern / alpha_pattern key that hits `name` (PEFT's order), else default."""
    for key, value in (patterns or {}).items():
        if _pattern_hits(key, name):
            return value
    return default


def _geometry_problem(module: nn.Module) -> str | None:
    """Why PEFT's LoRA on this layer is not W + s·B@A (so fxtune cannot express it), if it is not."""
    if isinstance(module, nn.Linear):
        return None
    if module.groups != 1:
        return (f"a grouped conv (groups={module.groups}): PEFT's LoRA there is a full conv in→r and a "
                "grouped 1×1 conv, not a delta on this weight")
    if any(d != 1 for d in module.dilation):
        return f"dilation={tuple(module.dilation)}: PEFT's lora_A ignores the layer's dilation"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}: PEFT's lora_A pads with zeros"
    return None


def _peft_layout_problem(site: Any) -> str | None:
    """Why PEFT's LoRA keys (`<module>.lora_A/B.weight` on a Linear/Conv) cannot express this site, if so."""
    if site.call == "opaque":
        return f"a {site.type_name} weight whose module is called as a whole; PEFT's format here holds LoRA on plain Linear/Conv modules (save with format='fxtune')"
    if site.call == "mha" or site.weight_ref.rows is not None:
        return f"a {site.type_name} projection; PEFT's format here holds LoRA on Linear/Conv modules only (save with format='fxtune')"
    if not isinstance(site.module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or site.weight_ref.param != "weight" or site.weight_ref.transposed:
        return (f"a {type(site.module).__name__} weight ({site.layer}); PEFT's format here holds LoRA on Linear/Conv "
                "modules only (save with format='fxtune')")
    return None


def _lora_shapes(weight_shape: tuple, r: int) -> tuple[tuple, tuple]:
    """A and B shapes in PEFT's (and fxtune's) layout for a weight of `weight_shape` (groups = 1)."""
    kernel = tuple(weight_shape[2:])
    return (r, weight_shape[1], *kernel), (weight_shape[0], r, *([1] * len(kernel)))


# ----------------------------------------------------------------------------- loading


def read_config(path: str) -> dict:
    """adapter_config.json of a PEFT directory, with every feature fxtune cannot carry refused."""
    with open(os.path.join(path, CONFIG_NAME)) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path!r} holds a PEFT {config.get('peft_type')!r} adapter; fxtune reads PEFT LoRA only")
    refused = [FEATURES.get(k, k) for k, v in config.items()
               if k not in READ | IGNORED and v not in (None, False, [], {}, "")]
    if config.get("bias", "none") != "none":
        refused.append(f"bias={config['bias']!r} (trainable base biases)")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(BASE_CHANGING):
        refused.append(f"init_lora_weights={init!r} (its factors belong on a changed base weight; "
                       "convert it to plain LoRA in PEFT first)")
    if refused:
        raise AdapterError(f"the PEFT adapter in {path!r} uses what fxtune cannot load: {', '.join(refused)}")
    if config.get("target_modules") is None:
        raise AdapterError(f"the PEFT adapter in {path!r} has target_modules=null (a transformers default); "
                           "list the modules in it")
    return config


def read_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """adapter_model.safetensors and the graph forms fxtune recorded in it (if it wrote the file).

    A pickle-only directory (adapter_model.bin) is refused, never opened.
    """
    file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(file):
        pickled = os.path.isfile(os.path.join(path, PICKLE_NAME))
        found = "only adapter_model.bin (a pickle, which fxtune never loads)" if pickled else f"no {WEIGHTS_NAME}"
        raise AdapterError(f"{path!r} holds {found}; save it with PEFT's save_pretrained(..., safe_serialization=True)")
    with safe_open(file, framework="pt") as f:
        recorded = (f.metadata() or {}).get(FORMS_KEY)
    try:
        forms = json.loads(recorded) if recorded else {}
    except json.JSONDecodeError:
        forms = {}
    forms = {k: v for k, v in forms.items() if v in ("weight", "activation")} if isinstance(forms, dict) else {}
    return load_file(file), forms


def _split_factors(tensors: dict[str, torch.Tensor], problems: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {"lora_A": A, "lora_B": B}} from PEFT's keys; any other key is a problem."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        path, _, factor = key.removeprefix(PREFIX).rpartition(".lora_")
        if not key.startswith(PREFIX) or factor not in ("A.weight", "B.weight"):
            problems.append(f"tensor {key!r} is not a LoRA factor (expected '{PREFIX}<module>.lora_A.weight' / '.lora_B.weight')")
        else:
            factors.setdefault(path, {})[f"lora_{factor[0]}"] = value
    return factors


def _selected(gm: fx.GraphModule, config: dict) -> list[str]:
    """The module paths PEFT would adapt; "all-linear" is every nn.Linear (PEFT's rule outside transformers)."""
    names = _module_names(gm)
    if isinstance(config["target_modules"], str) and config["target_modules"].lower() == "all-linear":
        config = {**config, "target_modules": [n for n in names if isinstance(gm.get_submodule(n), nn.Linear)]}
    return [n for n in names if _peft_selects(config, n)]


def _settle(path: str, module: nn.Module, found: dict, config: dict) -> tuple | str:
    """(A, B, r, alpha) for one selected site, or why it cannot be loaded."""
    geometry = _geometry_problem(module)
    if geometry:
        return geometry
    missing = [f for f in ("lora_A", "lora_B") if f not in found]
    if missing:
        return f"target_modules selects it, but {WEIGHTS_NAME} has no {' or '.join(missing)} for it"
    try:
        r = _pattern_value(config.get("rank_pattern"), path, config.get("r", 8))
        alpha = _pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha", 8))
    except re.error as e:
        return f"rank_pattern / alpha_pattern is not a valid regular expression: {e}"
    if not isinstance(r, int) or isinstance(r, bool) or r < 1 or not isinstance(alpha, (int, float)):
        return f"r={r!r}, lora_alpha={alpha!r}; r must be a positive int and alpha a number"
    want = _lora_shapes(tuple(module.weight.shape), r)
    got = tuple(found["lora_A"].shape), tuple(found["lora_B"].shape)
    if got != want:
        return (f"lora_A {list(got[0])}, lora_B {list(got[1])} in the file; its weight {list(module.weight.shape)} "
                f"with r={r} needs {list(want[0])} and {list(want[1])}")
    return found["lora_A"], found["lora_B"], r, alpha


def _plan(gm: fx.GraphModule, config: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """{target: (A, B, r, alpha)} for every layer the adapter adapts, and every mismatch as a line."""
    problems: list[str] = []
    factors = _split_factors(tensors, problems)
    try:
        selected = _selected(gm, config)
    except re.error as e:
        return {}, [*problems, f"target_modules / exclude_modules is not a valid regular expression: {e}"]
    if not selected:
        problems.append(f"target_modules={config['target_modules']!r} selects no module of this model")
    for path in sorted(set(factors) - set(selected)):
        problems.append(f"'{path}': the file has LoRA factors for it, but target_modules does not select it")
    sites = {t for t, group in site_table(gm).by_weight.items() if _peft_layout_problem(group[0]) is None}
    plan = {}
    for path in selected:
        module = gm.get_submodule(path)
        if path not in sites:
            problems.append(f"'{path}' ({type(module).__name__}): PEFT targets it, but it is not an fxtune call site "
                            "of a Linear/Conv weight")
            continue
        settled = _settle(path, module, factors.get(path, {}), config)
        if isinstance(settled, str):
            problems.append(f"'{path}': {settled}")
        else:
            plan[path] = settled
    return plan, problems


def load_peft(gm: fx.GraphModule, path: str, adapter: str | None = None, *, form: str | None = None) -> fx.GraphModule:
    """A new GraphModule with the PEFT LoRA adapter in directory `path` as fxtune "lora" slots.

    Every mismatch (targets that are no fxtune sites, shapes, ranks, stray tensors) is listed in one
    AdapterError and gm is left as it was. form: None = as fxtune recorded it on saving, else
    "activation" (PEFT's own computation); or "weight" / "activation" for every site.
    """
    _need_lora_kind()
    if form not in (None, "weight", "activation"):
        raise AdapterError(f"form must be None, 'weight' or 'activation', got {form!r}")
    config = read_config(path)
    tensors, recorded = read_tensors(path)
    plan, problems = _plan(gm, config, tensors)
    dropout = float(config.get("lora_dropout", 0.0))
    if dropout > 0 and form == "weight":
        problems.append(f"lora_dropout={dropout} acts on input activations, which the weight form never sees; "
                        "use form='activation'")
    if problems:
        raise AdapterError(f"cannot load the PEFT adapter in {path!r} onto this model:\n  " + "\n  ".join(problems))
    rslora = bool(config.get("use_rslora", False))
    init = "gaussian" if config.get("init_lora_weights", True) == "gaussian" else "default"
    rw = Rewrite(gm, kind="lora", adapter=adapter or "default")
    for target, (a, b, r, alpha) in plan.items():
        weight = rw.weight(target)
        rw.attach(
            target,
            params={"lora_a": a.to(weight), "lora_b": b.to(weight)},
            modules={"dropout": nn.Dropout(dropout)} if dropout > 0 else None,
            config={"r": r, "alpha": alpha, "scale": alpha / math.sqrt(r) if rslora else alpha / r,
                    "rslora": rslora, "init": init, "dropout": dropout},
            form=form or ("activation" if dropout > 0 else recorded.get(target, "activation")),
        )
    return rw.finish()


# ----------------------------------------------------------------------------- saving


def _export_factors(slot: AdapterSlot) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """(A, B, r, alpha) as PEFT should apply them to the original weight.

    A PiSSA slot acts on a residual base; its delta to the original is s·(B@A − B0@A0), written,
    as PEFT converts PiSSA, as the rank-2r LoRA [A; A0], [B, −B0] with alpha keeping s unchanged.
    """
    a, b = slot.lora_a.detach(), slot.lora_b.detach()
    r, alpha, rslora = slot.config["r"], slot.config["alpha"], slot.config["rslora"]
    if slot.config.get("init") == "pissa":
        a = torch.cat([a, slot.pissa_a0.detach()], 0)
        b = torch.cat([b, -slot.pissa_b0.detach()], 1)
        return a, b, 2 * r, alpha * math.sqrt(2) if rslora else 2 * alpha
    return a, b, r, alpha


def _unique_key(name: str, names: list[str]) -> str:
    """`name` itself as a rank/alpha pattern key if it hits only that module; else an anchored regex."""
    if not any(_pattern_hits(name, other) for other in names if other != name):
        return name
    return "^" + re.escape(name)


def _target_modules(targets: list[str], names: list[str]) -> list[str] | str:
    """The exact module paths as a list, or as one full-match regex if a path is also another module's suffix."""
    chosen = set(targets)
    if not any(other.endswith(f".{t}") for t in targets for other in names if other not in chosen):
        return list(targets)
    return "(?:" + "|".join(re.escape(t) for t in targets) + ")"


def save_peft(gm: fx.GraphModule, path: str, adapter: str = "default") -> None:
    """Writes LoRA adapter `adapter` of gm into directory `path` in PEFT's format (PeftModel.from_pretrained loads it).

    Refused with an AdapterError naming the sites: other kinds, layers where PEFT's LoRA means
    something else (grouped, dilated, non-zero-padded convs), and per-site dropout or rslora.
    """
    require_adapters(gm, adapter)
    slots = [s for s in all_slots(gm) if s.adapter == adapter]
    problems = [f"'{s.target}': a {s.kind} adapter (the PEFT format carries LoRA only; save it with format='fxtune')"
                for s in slots if s.kind != "lora"]
    store, table = Weights(gm), site_table(gm)
    for s in slots:
        site = table.by_weight.get(s.target, [None])[0]
        layout = _peft_layout_problem(site) if site is not None else "no site of the graph uses this weight any more"
        geometry = layout or _geometry_problem(site.module)
        if geometry:
            problems.append(f"'{s.target}': {geometry}")
        elif s.kind == "lora" and s.config.get("init") != "pissa" and replaced_by(store, site.weight_ref) == adapter:
            problems.append(f"'{s.target}': adapter '{adapter}' replaced its base weight, which PEFT would not do")
    for key in ("dropout", "rslora"):
        values = {s.config.get(key) for s in slots if s.kind == "lora"}
        if len(values) > 1:
            problems.append(f"{key} differs between sites ({sorted(values)}); PEFT has one {key} per adapter")
    if problems:
        raise AdapterError(f"cannot save adapter '{adapter}' in PEFT's format:\n  " + "\n  ".join(problems))

    tensors, ranks, alphas = {}, {}, {}
    for s in slots:
        a, b, ranks[s.target], alphas[s.target] = _export_factors(s)
        tensors[f"{PREFIX}{s.target}.lora_A.weight"] = a.clone().contiguous()
        tensors[f"{PREFIX}{s.target}.lora_B.weight"] = b.clone().contiguous()
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    names = _module_names(gm)
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "revision": None,
        "inference_mode": True, "r": r, "lora_alpha": alpha, "target_modules": _target_modules(list(ranks), names),
        "exclude_modules": None, "lora_dropout": slots[0].config["dropout"], "fan_in_fan_out": False,
        "bias": "none", "use_rslora": bool(slots[0].config["rslora"]), "modules_to_save": None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {_unique_key(t, names): v for t, v in ranks.items() if v != r},
        "alpha_pattern": {_unique_key(t, names): v for t, v in alphas.items() if v != alpha},
        "use_dora": False, "lora_bias": False,
    }
    os.makedirs(path, exist_ok=True)
    forms = json.dumps({s.target: s.form for s in slots})
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt", FORMS_KEY: forms})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
