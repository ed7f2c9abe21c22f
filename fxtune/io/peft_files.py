"""PEFT adapter directories in and out of fxtune, for every kind that declares a `PeftFormat`.

Loading finds the kind by the file's peft_type, resolves target_modules / exclude_modules with
PEFT's own rules against the GraphModule's module paths, and re-creates each adapted layer as a
slot of that kind; saving writes a kind's slots so `peft.PeftModel.from_pretrained` loads them.
Only JSON and safetensors are read: nothing is unpickled or executed. Each site's graph form is
noted in the safetensors metadata (which PEFT ignores), so a reload rebuilds the same graph.
"""

from __future__ import annotations

import json
import os
import re

import torch
from torch import fx

from ..adapter.base_weights import replaced_by
from ..adapter.kinds import AdapterKind, registered_kinds
from ..adapter.slots import all_slots, require_adapters
from ..errors import AdapterError
from ..graph.discovery import site_table
from ..graph.ownership import NAMESPACE
from ..graph.sites import Site, SiteTable
from ..graph.weights import Weights
from ..kit.rewrite import Rewrite
from .files import cast_like, json_metadata, json_writer, prepare_directory, read_json, read_safetensors, safetensors_writer, write_files
from .peft_format import (
    CONFIG_NAME, FORMS_KEY, GENERIC_FEATURES, GENERIC_KEYS, INERT_KEYS, PICKLE_NAME, PREFIX, WEIGHTS_NAME, PeftFormat,
    PeftModule, is_linear_module, peft_selects, target_modules,
)

PEFT_FILES = (CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME)


def peft_kind(peft_type: object, where: str) -> AdapterKind:
    """The registered kind whose PEFT mapping reads `peft_type` files."""
    claim = [k for k in registered_kinds().values() if isinstance(k.peft, PeftFormat) and k.peft.peft_type == peft_type]
    if len(claim) > 1:
        raise AdapterError(f"{where} holds a PEFT {peft_type!r} adapter, and several registered kinds read that peft_type "
                           f"({', '.join(k.name for k in claim)}); keep one of their mappings")
    if claim:
        return claim[0]
    known = sorted(f"{k.name} ({k.peft.peft_type})" for k in registered_kinds().values() if isinstance(k.peft, PeftFormat))
    raise AdapterError(
        f"{where} holds a PEFT {peft_type!r} adapter, and no registered adapter kind reads that peft_type "
        f"(kinds with a PEFT mapping: {', '.join(known) or 'none'}); import the module that defines the kind "
        "(the built-in ones: `import fxtune.passes`) and retry"
    )


def module_names(gm: fx.GraphModule) -> list[str]:
    """The model's module paths as PEFT sees them (fxtune's own adapter modules left out)."""
    return [n for n, _ in gm.named_modules() if n and n != NAMESPACE and not n.startswith(NAMESPACE + ".")]


def site_problem(table: SiteTable, fmt: PeftFormat, weight_name: str) -> tuple[Site | None, str | None]:
    """The weight's first site, and why PEFT's layer on its module cannot hold the weight's adapter
    (the kind's own reasons first): PEFT adapts a module where it is called, fxtune a weight
    wherever the graph uses it."""
    uses = table.by_weight.get(weight_name)
    if not uses:
        return None, "no site of the graph uses this weight any more"
    reason = fmt.site_problem(uses[0])
    for site in uses:
        ref = site.weight_ref
        if reason:
            break
        if site.call == "opaque":
            reason = f"a {site.type_name} weight whose module is called as a whole; PEFT's format holds layers called as the plain op"
        elif site.call == "mha" or ref.rows is not None:
            reason = f"a {site.type_name} projection; PEFT's format holds whole layers called as modules"
        elif site.call == "value":
            reason = f"'{site.name}' passes the weight as a value into other code, where PEFT's layer would not act"
        elif ref.param != "weight":
            reason = f"'{ref.path}' is a parameter of its own, not a layer's weight; PEFT's format holds layers called as modules"
        elif site.use_ref.owner != ref.owner:
            reason = (f"'{site.name}' uses this weight too ({site.use_ref.path} is tied to {ref.path}): fxtune adapts it "
                      "at every use, PEFT only where its own module is called")
    return uses[0], reason and (reason if "format='fxtune'" in reason else f"{reason} (save with format='fxtune')")


# ----------------------------------------------------------------------------- loading


def read_config(path: str) -> tuple[dict, AdapterKind]:
    """adapter_config.json of a PEFT directory and the kind that reads it; what fxtune cannot carry is refused."""
    file = os.path.join(path, CONFIG_NAME)
    config = read_json(file)
    if not isinstance(config, dict):
        raise AdapterError(f"{file!r} holds a JSON {type(config).__name__}, not PEFT's config object")
    kind = peft_kind(config.get("peft_type"), repr(path))
    fmt: PeftFormat = kind.peft
    known = GENERIC_KEYS | INERT_KEYS | fmt.config_keys | fmt.inert_keys
    features = {**GENERIC_FEATURES, **fmt.feature_names}
    refused = [features.get(k, k) for k, v in config.items() if k not in known and v not in (None, False, [], {}, "")]
    refused += fmt.config_problems(config)
    if refused:
        raise AdapterError(f"the PEFT adapter in {path!r} uses what fxtune cannot load: {', '.join(refused)}")
    if config.get("target_modules") is None:
        raise AdapterError(f"the PEFT adapter in {path!r} has target_modules=null (a transformers default); list the modules in it")
    return config, kind


def read_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """adapter_model.safetensors and the graph forms fxtune recorded in it (if it wrote the file).

    A pickle-only directory (adapter_model.bin) is refused, never opened.
    """
    file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(file) and os.path.isfile(os.path.join(path, PICKLE_NAME)):
        raise AdapterError(f"{path!r} holds only {PICKLE_NAME} (a pickle, which fxtune never loads); "
                           "save it with PEFT's save_pretrained(..., safe_serialization=True)")
    tensors, metadata = read_safetensors(file)
    forms = json_metadata(metadata, FORMS_KEY)
    forms = {k: v for k, v in forms.items() if v in ("weight", "activation")} if isinstance(forms, dict) else {}
    return tensors, forms


def _split(tensors: dict[str, torch.Tensor], fmt: PeftFormat, problems: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {tensor name: tensor}} from PEFT's keys; a key of no module's tensor is a problem."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name = next((n for n in sorted(fmt.tensor_names, key=len, reverse=True) if key.endswith(f".{n}")), None)
        if not key.startswith(PREFIX) or name is None:
            expected = " / ".join(f"'{PREFIX}<module>.{n}'" for n in fmt.tensor_names)
            problems.append(f"tensor {key!r} is not one of {fmt.peft_type}'s tensors (expected {expected})")
        else:
            found.setdefault(key[len(PREFIX):-len(name) - 1], {})[name] = value
    return found


def _selected(gm: fx.GraphModule, config: dict, present: set[str]) -> list[str]:
    """The module paths PEFT would adapt. "all-linear" is every Linear and Conv1D except, as PEFT
    does for transformers models, the output layer: the last of them, if the file has nothing for it."""
    names = module_names(gm)
    if isinstance(config["target_modules"], str) and config["target_modules"].lower() == "all-linear":
        linear = [n for n in names if is_linear_module(gm.get_submodule(n))]
        if linear and linear[-1] not in present:
            linear.pop()
        config = {**config, "target_modules": linear}
    return [n for n in names if peft_selects(config, n)]


def _plan(gm: fx.GraphModule, config: dict, kind: AdapterKind, tensors: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """{module path: attach arguments} for every layer the adapter adapts, and every mismatch as a line."""
    fmt: PeftFormat = kind.peft
    problems: list[str] = []
    found = _split(tensors, fmt, problems)
    try:
        selected = _selected(gm, config, set(found))
    except (re.error, TypeError, AttributeError) as exc:  # a bad regex, or a non-string in the module lists
        return {}, [*problems, f"target_modules / exclude_modules cannot be matched ({exc}); they must be a regular expression or a list of names"]
    if not selected:
        problems.append(f"target_modules={config['target_modules']!r} selects no module of this model")
    for path in sorted(set(found) - set(selected)):
        problems.append(f"'{path}': the file has {fmt.peft_type} tensors for it, but target_modules does not select it")
    table = site_table(gm)
    plan = {}
    for path in selected:
        module = gm.get_submodule(path)
        if path not in table.by_weight:
            problems.append(f"'{path}' ({type(module).__name__}): PEFT targets it, but it is not an fxtune call site "
                            "of a weight of its own (see fxtune.sites(gm))")
            continue
        site, reason = site_problem(table, fmt, path)
        missing = [n for n in fmt.tensor_names if n not in found.get(path, {})]
        if not reason and missing:
            reason = f"target_modules selects it, but {WEIGHTS_NAME} has no {' or '.join(missing)} for it"
        arguments = reason or fmt.from_peft(path, site, found[path], config)
        if isinstance(arguments, str):
            problems.append(f"'{path}': {arguments}")
        else:
            plan[path] = arguments
    return plan, problems


def load_peft(gm: fx.GraphModule, path: str, adapter: str | None = None, *, form: str | None = None) -> fx.GraphModule:
    """A new GraphModule with the PEFT adapter in directory `path` as slots of the kind that reads its peft_type.

    Every mismatch (targets that are no fxtune sites, shapes, ranks, stray tensors) is listed in one
    AdapterError and gm is left as it was. form: None = as fxtune recorded it on saving, else
    "activation" (PEFT's own computation); or "weight" / "activation" for every site.
    """
    if form not in (None, "weight", "activation"):
        raise AdapterError(f"form must be None, 'weight' or 'activation', got {form!r}")
    config, kind = read_config(path)
    tensors, recorded = read_tensors(path)
    plan, problems = _plan(gm, config, kind, tensors)
    for target, arguments in plan.items():
        why = kind.weight_blocker(arguments.get("config", {})) if kind.weight_blocker else None
        if why and form == "weight":
            problems.append(f"'{target}': {why}, which the weight form never sees; use form='activation'")
    if problems:
        raise AdapterError(f"cannot load the PEFT adapter in {path!r} onto this model:\n  " + "\n  ".join(problems))
    rw = Rewrite(gm, kind=kind.name, adapter=adapter or "default")
    for target, arguments in plan.items():
        weight = rw.weight(target)
        where = f"'{target}' in {path!r}"
        params = cast_like(arguments.get("params") or {}, weight, where)
        buffers = cast_like(arguments.get("buffers") or {}, weight, where)
        settings = arguments.get("config") or {}
        extra = rw.restored(target, settings, {**params, **buffers})
        if extra.get("base_weight") is not None:
            rw.replace_base_weight(target, extra["base_weight"])
        blocked = kind.weight_blocker(settings) if kind.weight_blocker else None
        chosen = form or ("activation" if blocked else recorded.get(target, "activation"))
        slot = rw.attach(target, params=params, buffers=buffers, modules=extra.get("modules"), config=settings, form=chosen)
        for key, value in (extra.get("buffers") or {}).items():
            slot.register_buffer(key, value, persistent=False)
    return rw.finish()


# ----------------------------------------------------------------------------- saving


def save_peft(
    gm: fx.GraphModule, path: str, adapter: str = "default", *, other_files: dict[str, str] | None = None, overwrite: bool = False
) -> None:
    """Writes adapter `adapter` of gm into directory `path` in PEFT's format (PeftModel.from_pretrained loads it).

    Refused with an AdapterError naming the sites: kinds without a PEFT mapping, layers where
    PEFT's layer means something else, and settings one PEFT config cannot hold. Files of another
    format in `path` (`other_files`: name -> format) are refused unless overwrite=True removes them.
    """
    require_adapters(gm, adapter)
    slots = [s for s in all_slots(gm) if s.adapter == adapter]
    kinds = {s.kind: registered_kinds().get(s.kind) for s in slots}
    problems = [f"'{s.target}': a {s.kind} adapter, and the {s.kind} kind declares no PEFT mapping (save it with format='fxtune')"
                for s in slots if not isinstance(getattr(kinds[s.kind], "peft", None), PeftFormat)]
    if problems:
        raise AdapterError(f"cannot save adapter '{adapter}' in PEFT's format:\n  " + "\n  ".join(problems))
    fmt: PeftFormat = kinds[slots[0].kind].peft
    store, table = Weights(gm), site_table(gm)
    modules: dict[str, PeftModule] = {}
    for s in slots:
        site, reason = site_problem(table, fmt, s.target)
        if not reason and replaced_by(store, site.weight_ref) == adapter and not fmt.keeps_replaced_base(s):
            reason = f"adapter '{adapter}' replaced its base weight, which PEFT would not do"
        if reason:
            problems.append(f"'{s.target}': {reason}")
        else:
            modules[site.weight_ref.owner] = fmt.to_peft(s, site)
    names = module_names(gm)
    try:
        own = fmt.adapter_config(modules, names) if not problems else {}
    except AdapterError as exc:
        problems.append(str(exc))
    if problems:
        raise AdapterError(f"cannot save adapter '{adapter}' in PEFT's format:\n  " + "\n  ".join(problems))
    config = {
        "peft_type": fmt.peft_type, "task_type": None, "base_model_name_or_path": None, "revision": None,
        "inference_mode": True, "target_modules": target_modules(list(modules), names), "exclude_modules": None,
        "modules_to_save": None, **own,
    }
    tensors = {f"{PREFIX}{m}.{name}": t.detach().clone().contiguous() for m, pm in modules.items() for name, t in pm.tensors.items()}
    forms = json.dumps({s.target: s.form for s in slots})
    prepare_directory(path, other_files or {}, overwrite=overwrite)
    write_files(path, {
        WEIGHTS_NAME: safetensors_writer(tensors, {"format": "pt", FORMS_KEY: forms}),
        CONFIG_NAME: json_writer(config),
    })
