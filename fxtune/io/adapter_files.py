"""Adapter files: `adapters.safetensors` + `adapters.json`, re-created on a freshly traced model.

Nothing is unpickled or executed: the JSON names kinds (which must be registered) and
settings; the safetensors file holds the tensors and a copy of each slot's settings, so a
hand-edited JSON is caught. Masked parameter entries are not stored. Tensor keys are
`<target>.<name>`, e.g. `layer4.0.conv1.<tensor name>`. Files are strict: the JSON follows a schema
(adapter_schema.py), shapes, dtypes and the settings the tensors imply are checked, and adapters
take the dtype of the weights they adapt.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import fx, nn

from ..adapter.kinds import registered_kinds
from ..adapter.slots import AdapterSlot, all_slots
from ..errors import AdapterError
from ..graph.discovery import site_table
from ..graph.parts import graphs_of, is_parted, parts_of, with_parts
from ..kit.rewrite import Rewrite
from ..version import __version__
from .adapter_schema import FORMAT, FORMAT_VERSION, schema_problems
from .files import cast_like, json_metadata, json_writer, prepare_directory, read_json, read_safetensors, safetensors_writer, write_files
from .peft_files import PEFT_FILES, load_peft, save_peft
from .peft_format import CONFIG_NAME as PEFT_CONFIG_NAME

JSON_NAME, TENSORS_NAME = "adapters.json", "adapters.safetensors"
FXTUNE_FILES = (JSON_NAME, TENSORS_NAME)
SETTINGS_KEY = "fxtune.settings"  # safetensors metadata: each slot's config as saved, to catch a hand-edited JSON


def _mask_for(slot: AdapterSlot, name: str) -> torch.Tensor | None:
    mask = slot._buffers.get(f"{name}_mask")
    return None if mask is None else torch.broadcast_to(mask.bool(), slot._parameters[name].shape)


def _trainable(slot: AdapterSlot, name: str, value: torch.Tensor) -> bool:
    """Whether a parameter trains: a merged adapter's are frozen while merged, saved as they were before."""
    if slot.merged:
        return bool(slot.trainable_before_merge.get(name, True))
    return bool(value.requires_grad)


def _slot_record(slot: AdapterSlot, tensors: dict[str, torch.Tensor], weight_shape: tuple, seen: dict) -> dict:
    entries = {}
    saved = {k: v for k, v in slot._buffers.items() if v is not None and k not in slot._non_persistent_buffers_set}
    for name, value in [*((k, v) for k, v in slot._parameters.items() if v is not None), *saved.items()]:
        is_param = name in slot._parameters
        mask = _mask_for(slot, name) if is_param else None
        data = value.detach()[mask] if mask is not None else value.detach()
        key = f"{slot.weight_name}.{name}"
        tensors[key] = data.clone().contiguous()
        entries[name] = {
            "same_as": seen.setdefault(id(value), key) if is_param else None,
            "shape": list(value.shape),
            "dtype": str(value.dtype).removeprefix("torch."),
            "role": "parameter" if is_param else "buffer",
            "trainable": _trainable(slot, name, value) if is_param else False,
            "masked_by": f"{name}_mask" if mask is not None else None,
        }
    return {
        "target": slot.weight_name,
        "kind": slot.kind,
        "config": slot.config,
        "form": slot.form,
        "form_reason": slot.form_reason,
        "weight_shape": list(weight_shape),
        "tensors": entries,
    }


def adapter_state(gm: fx.GraphModule, adapter: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """One adapter of gm (or of every part of a model traced in parts) as data: a JSON-able description
    and its tensors (masked entries left out). Targets are the weights' names in the whole model."""
    graphs = graphs_of(gm)
    if not any(s.adapter == adapter for g in graphs for s in all_slots(g)):
        names = sorted({s.adapter for g in graphs for s in all_slots(g)})
        raise AdapterError(f"no adapter named '{adapter}'; this model has {names or 'none'}")
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    records = []
    for g in graphs:
        table = site_table(g)
        records += [_slot_record(s, tensors, table.first(s.weight_name, error=AdapterError).shape, seen)
                    for s in all_slots(g) if s.adapter == adapter]
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "fxtune_version": __version__, "adapter": adapter, "slots": records}
    return meta, tensors


def save_fxtune(gm: fx.GraphModule, path: str, adapter: str, *, overwrite: bool = False) -> None:
    """Writes one adapter of gm into the directory `path` in fxtune's own format."""
    meta, tensors = adapter_state(gm, adapter)
    settings = json.dumps({rec["target"]: rec["config"] for rec in meta["slots"]})
    prepare_directory(path, {name: "PEFT" for name in PEFT_FILES}, overwrite=overwrite)
    write_files(path, {
        TENSORS_NAME: safetensors_writer(tensors, {"format": FORMAT, SETTINGS_KEY: settings}),
        JSON_NAME: json_writer(meta),
    })


def _settings_edits(meta: dict, saved: Any) -> list[str]:
    """Settings in the JSON that differ from the copy saved with the tensors, key by key."""
    if not isinstance(saved, dict):
        return []
    problems = []
    for rec in meta["slots"]:
        before = saved.get(rec["target"])
        if not isinstance(before, dict):
            problems.append(f"'{rec['target']}': {TENSORS_NAME} was saved without this slot")
            continue
        for key in dict.fromkeys([*before, *rec["config"]]):
            if key not in rec["config"]:
                problems.append(f"'{rec['target']}': setting '{key}' is missing from {JSON_NAME} (saved: {before[key]!r})")
            elif key not in before:
                problems.append(f"'{rec['target']}': setting '{key}' in {JSON_NAME} was not saved with the tensors")
            elif before[key] != rec["config"][key]:
                problems.append(f"'{rec['target']}': setting '{key}' is {rec['config'][key]!r} in {JSON_NAME}, "
                                f"but {before[key]!r} was saved with the tensors")
    if problems:
        problems.append(f"{JSON_NAME} was edited after saving; restore it, or re-create the adapter in fxtune and save it again")
    return problems


def _tensor_problems(rec: dict, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Each entry of a slot against the stored tensor: present, same dtype, same shape (or mask count)."""
    problems = []
    target = rec["target"]
    for name, entry in rec["tensors"].items():
        key = f"{target}.{name}"
        value = tensors.get(key)
        if value is None:
            problems.append(f"'{target}': tensor '{name}' missing from {TENSORS_NAME}")
            continue
        if str(value.dtype).removeprefix("torch.") != entry["dtype"]:
            problems.append(f"'{target}': tensor '{name}' is {str(value.dtype).removeprefix('torch.')} in {TENSORS_NAME}, "
                            f"{entry['dtype']} in {JSON_NAME}")
        mask = entry["masked_by"] and tensors.get(f"{target}.{entry['masked_by']}")
        if entry["masked_by"] is None and list(value.shape) != entry["shape"]:
            problems.append(f"'{target}': tensor '{name}' has shape {list(value.shape)}, expected {entry['shape']}")
        elif mask is not None and entry["masked_by"] is not None:
            try:
                kept = int(torch.broadcast_to(mask.bool(), entry["shape"]).sum())
            except RuntimeError:
                kept = None
            if kept is None or value.dim() != 1 or value.numel() != kept:
                problems.append(f"'{target}': tensor '{name}' holds {list(value.shape)} entries; its mask "
                                f"'{entry['masked_by']}' keeps {kept} of {entry['shape']}")
    return problems


def _check(gm: fx.GraphModule, meta: Any, tensors: dict[str, torch.Tensor], saved_settings: Any) -> list[str]:
    """Every mismatch between the file and gm, and within the file, as readable lines (empty when it fits)."""
    problems = schema_problems(meta)
    if problems:
        return problems
    table = site_table(gm)
    weights = {name: tuple(group[0].weight_shape) for name, group in table.by_weight.items()}
    kinds = registered_kinds()
    named = set()
    for rec in meta["slots"]:
        target = rec["target"]
        named.update(f"{target}.{name}" for name in rec["tensors"])
        if rec["kind"] not in kinds:
            problems.append(f"'{target}': unknown adapter kind '{rec['kind']}' (import the module that defines it)")
        if target not in weights:
            problems.append(f"'{target}': the adapter has it, the model has no such site")
        elif weights[target] != tuple(rec["weight_shape"]):
            problems.append(f"'{target}': weight shape {list(weights[target])} in the model, {rec['weight_shape']} in the adapter")
        found = _tensor_problems(rec, tensors)
        problems += found
        check = getattr(kinds.get(rec["kind"]), "check", None)
        if not found and check is not None:
            problems += [f"'{target}': {p}" for p in check(rec["config"], _unpack(rec, tensors))]
    problems += [f"tensor '{key}' in {TENSORS_NAME} belongs to no slot of {JSON_NAME}" for key in sorted(set(tensors) - named)]
    return problems + _settings_edits(meta, saved_settings)


def _unpack(rec: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The slot's full tensors: masked parameters are scattered back into zeros at their mask."""
    out = {}
    for name, entry in rec["tensors"].items():
        if entry["masked_by"] is None:
            out[name] = tensors[f"{rec['target']}.{name}"]
    for name, entry in rec["tensors"].items():
        if entry["masked_by"] is not None:
            mask = torch.broadcast_to(out[entry["masked_by"]].bool(), entry["shape"])
            full = torch.zeros(entry["shape"], dtype=getattr(torch, entry["dtype"]))
            full[mask] = tensors[f"{rec['target']}.{name}"]
            out[name] = full
    return {name: out[name] for name in rec["tensors"]}


def load_fxtune(gm: fx.GraphModule, path: str, adapter: str | None = None) -> fx.GraphModule:
    """Re-creates the adapter saved in directory `path` on gm (a new GraphModule)."""
    meta = read_json(os.path.join(path, JSON_NAME))
    tensors, metadata = read_safetensors(os.path.join(path, TENSORS_NAME))
    return apply_adapter_state(gm, meta, tensors, adapter, source=f"the adapter in {path!r}",
                               saved_settings=json_metadata(metadata, SETTINGS_KEY))


def apply_adapter_state(
    gm: fx.GraphModule, meta: dict, tensors: dict[str, torch.Tensor], adapter: str | None = None, *,
    source: str = "the adapter", saved_settings: Any = None,
) -> fx.GraphModule:
    """A new GraphModule with the described adapter re-created on gm; a mismatch raises and changes nothing.

    `saved_settings` ({target: config} as saved with the tensors), if given, must equal the JSON's settings.
    On a model traced in parts, each part gets the records of its own sites.
    """
    if is_parted(gm):
        problems = schema_problems(meta)  # the whole file first: per part, only records of its sites are checked
        if problems:
            raise AdapterError(f"cannot re-create {source} on this model:\n  " + "\n  ".join(problems))
        return _apply_to_parts(gm, meta, tensors, adapter, source, saved_settings)
    problems = _check(gm, meta, tensors, saved_settings)
    if problems:
        raise AdapterError(f"cannot re-create {source} on this model:\n  " + "\n  ".join(problems))
    name = adapter or meta["adapter"]
    by_kind: dict[str, list[dict]] = {}
    for rec in meta["slots"]:
        by_kind.setdefault(rec["kind"], []).append(rec)
    for kind, records in by_kind.items():
        rw = Rewrite(gm, kind=kind, adapter=name)
        created: dict[str, torch.nn.Parameter] = {}
        for rec in records:
            _recreate(rw, rec, _unpack(rec, tensors), created, source)
        gm = rw.finish()
    return gm


def _apply_to_parts(gm: nn.Module, meta: dict, tensors: dict, adapter: str | None, source: str, saved_settings: Any) -> nn.Module:
    """apply_adapter_state on every part holding some of the records' weights; a weight no part has is refused."""
    owners = {s.weight_name: path for path, part in parts_of(gm) for s in site_table(part)}
    records = meta["slots"]
    strays = sorted({str(r.get("target")) for r in records if r.get("target") not in owners})
    if strays:
        raise AdapterError(f"cannot re-create {source} on this model: no part has the weights {strays}")
    claimed = {r.get("target") for r in records}
    unclaimed = sorted(k for k in tensors if k.rpartition(".")[0] not in claimed)
    if unclaimed:
        raise AdapterError(f"cannot re-create {source} on this model: tensors {unclaimed[:8]} in {TENSORS_NAME} belong to no slot of {JSON_NAME}")
    done = {}
    for path, part in parts_of(gm):
        mine = [r for r in records if owners[r["target"]] == path]
        if mine:
            targets = {r["target"] for r in mine}
            part_tensors = {k: v for k, v in tensors.items() if k.rpartition(".")[0] in targets}  # keys: <target>.<tensor name>
            settings = {k: v for k, v in saved_settings.items() if k in targets} if isinstance(saved_settings, dict) else saved_settings
            done[path] = apply_adapter_state(part, {**meta, "slots": mine}, part_tensors, adapter, source=source, saved_settings=settings)
    return with_parts(gm, done)


def _recreate(rw: Rewrite, rec: dict, tensors: dict[str, torch.Tensor], created: dict, source: str) -> None:
    """One slot from its record, its tensors in the weight's dtype; parameters saved as one shared
    tensor become one Parameter again."""
    tensors = cast_like(tensors, rw.weight(rec["target"]), f"'{rec['target']}' of {source}")
    extra = rw.restored(rec["target"], rec["config"], tensors)
    if extra.get("base_weight") is not None:
        rw.replace_base_weight(rec["target"], extra["base_weight"])
    params = {k: v for k, v in tensors.items() if rec["tensors"][k]["role"] == "parameter"}
    buffers = {k: v for k, v in tensors.items() if rec["tensors"][k]["role"] == "buffer"}
    slot = rw.attach(
        rec["target"], params=params, buffers=buffers, modules=extra.get("modules"),
        config=rec["config"], form=rec["form"], reason=rec.get("form_reason", ""),
    )
    for key, value in (extra.get("buffers") or {}).items():
        slot.register_buffer(key, value, persistent=False)
    for key, p in list(slot.named_parameters(recurse=False)):
        entry = rec["tensors"][key]
        p.requires_grad_(entry["trainable"])
        same_as = entry.get("same_as") or f"{rec['target']}.{key}"
        slot._parameters[key] = created.setdefault(same_as, p)


def save_adapters(gm: fx.GraphModule, path: str, adapter: str = "default", *, format: str = "fxtune", overwrite: bool = False) -> None:
    """Writes one adapter into the directory `path`: adapters.safetensors + adapters.json, or with
    format="peft" PEFT's adapter_model.safetensors + adapter_config.json (for kinds with a PEFT mapping).

    A directory holding the other format's files is refused; overwrite=True removes them first.
    """
    path = os.fspath(path)
    if format == "peft":
        return save_peft(gm, path, adapter, other_files={name: "fxtune" for name in FXTUNE_FILES}, overwrite=overwrite)
    if format != "fxtune":
        raise AdapterError(f"unknown adapter file format {format!r}; use 'fxtune' or 'peft'")
    save_fxtune(gm, path, adapter, overwrite=overwrite)


def load_adapters(gm: fx.GraphModule, path: str, *, adapter: str | None = None) -> fx.GraphModule:
    """A new GraphModule with the adapter saved in `path` re-created on gm (optionally renamed).

    The directory's contents say its format: adapters.json is fxtune's, adapter_config.json PEFT's.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise AdapterError(f"{path!r} is not a directory, so not an fxtune adapter directory (nor a PEFT one); "
                           "give the directory that save_adapters (or PEFT's save_pretrained) wrote")
    is_fxtune, is_peft = (os.path.isfile(os.path.join(path, name)) for name in (JSON_NAME, PEFT_CONFIG_NAME))
    if is_fxtune and is_peft:
        raise AdapterError(f"{path!r} holds both {JSON_NAME} (fxtune) and {PEFT_CONFIG_NAME} (PEFT); keep each format in its own directory")
    if is_peft:
        return load_peft(gm, path, adapter)
    if not is_fxtune:
        raise AdapterError(f"{path!r} holds neither {JSON_NAME} nor {PEFT_CONFIG_NAME}; it is not an fxtune adapter directory (nor a PEFT one)")
    return load_fxtune(gm, path, adapter)
