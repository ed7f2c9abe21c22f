"""Adapter files: `adapters.safetensors` + `adapters.json`, re-created on a freshly traced model.

Nothing is unpickled or executed: the JSON names kinds (which must be registered) and
settings; the safetensors file holds the tensors. Masked parameter entries are not stored.
Tensor keys are `<target>.<name>`, e.g. `layer4.0.conv1.lora_a`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import fx

from ..adapter.kinds import get_kind, registered_kinds
from ..adapter.slots import AdapterSlot, all_slots, require_adapters
from ..errors import AdapterError
from ..graph.discovery import site_table
from ..kit.rewrite import Rewrite
from ..version import __version__
from .peft_format import CONFIG_NAME as PEFT_CONFIG_NAME
from .peft_format import load_peft, save_peft

FORMAT = "fxtune.adapter"
FORMAT_VERSION = 1
JSON_NAME, TENSORS_NAME = "adapters.json", "adapters.safetensors"


def _mask_for(slot: AdapterSlot, name: str) -> torch.Tensor | None:
    mask = slot._buffers.get(f"{name}_mask")
    return None if mask is None else torch.broadcast_to(mask.bool(), slot._parameters[name].shape)


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
            "trainable": bool(value.requires_grad) if is_param else False,
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
    """One adapter of gm as data: a JSON-able description and its tensors (masked entries left out)."""
    require_adapters(gm, adapter)
    slots = [s for s in all_slots(gm) if s.adapter == adapter]
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    table = site_table(gm)
    records = [_slot_record(s, tensors, table.first(s.weight_name, error=AdapterError).shape, seen) for s in slots]
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "fxtune_version": __version__, "adapter": adapter, "slots": records}
    return meta, tensors


def save_fxtune(gm: fx.GraphModule, path: str, adapter: str) -> None:
    """Writes one adapter of gm into the directory `path` in fxtune's own format."""
    meta, tensors = adapter_state(gm, adapter)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, TENSORS_NAME), metadata={"format": FORMAT})
    with open(os.path.join(path, JSON_NAME), "w") as f:
        json.dump(meta, f, indent=2)


def _check(gm: fx.GraphModule, meta: dict, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Every mismatch between the file and gm, as readable lines (empty when it fits)."""
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        return [f"not an fxtune adapter file (format {meta.get('format')!r} v{meta.get('format_version')!r})"]
    problems = []
    table = site_table(gm)
    weights = {name: tuple(group[0].weight_shape) for name, group in table.by_weight.items()}
    kinds = registered_kinds()
    for rec in meta["slots"]:
        target = rec["target"]
        if rec["kind"] not in kinds:
            problems.append(f"'{target}': unknown adapter kind '{rec['kind']}' (import the module that defines it)")
        if target not in weights:
            problems.append(f"'{target}': the adapter has it, the model has no such site")
        elif weights[target] != tuple(rec["weight_shape"]):
            problems.append(f"'{target}': weight shape {list(weights[target])} in the model, {rec['weight_shape']} in the adapter")
        for name, entry in rec["tensors"].items():
            key = f"{target}.{name}"
            if key not in tensors:
                problems.append(f"'{target}': tensor '{name}' missing from {TENSORS_NAME}")
            elif entry["masked_by"] is None and list(tensors[key].shape) != entry["shape"]:
                problems.append(f"'{target}': tensor '{name}' has shape {list(tensors[key].shape)}, expected {entry['shape']}")
    return problems


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
    with open(os.path.join(path, JSON_NAME)) as f:
        meta = json.load(f)
    return apply_adapter_state(gm, meta, load_file(os.path.join(path, TENSORS_NAME)), adapter, source=f"the adapter in {path!r}")


def apply_adapter_state(
    gm: fx.GraphModule, meta: dict, tensors: dict[str, torch.Tensor], adapter: str | None = None, *, source: str = "the adapter"
) -> fx.GraphModule:
    """A new GraphModule with the described adapter re-created on gm; a mismatch raises and changes nothing."""
    problems = _check(gm, meta, tensors)
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
            _recreate(rw, rw.site(rec["target"]), rec, _unpack(rec, tensors), created)
        gm = rw.finish()
    return gm


def _recreate(rw: Rewrite, site: Any, rec: dict, tensors: dict[str, torch.Tensor], created: dict) -> None:
    """One slot from its record; parameters saved as one shared tensor become one Parameter again."""
    kind = get_kind(rec["kind"])
    weight = rw.weight(rec["target"])
    extra = kind.restore(site, weight, rec["config"], tensors) if kind.restore else {}
    if extra.get("base_weight") is not None:
        rw.replace_base_weight(rec["target"], extra["base_weight"])
    params = {k: v.to(weight.device) for k, v in tensors.items() if rec["tensors"][k]["role"] == "parameter"}
    buffers = {k: v.to(weight.device) for k, v in tensors.items() if rec["tensors"][k]["role"] == "buffer"}
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


def save_adapters(gm: fx.GraphModule, path: str, adapter: str = "default", *, format: str = "fxtune") -> None:
    """Writes one adapter into the directory `path`: adapters.safetensors + adapters.json, or with
    format="peft" a LoRA adapter as PEFT's adapter_model.safetensors + adapter_config.json."""
    if format == "peft":
        return save_peft(gm, path, adapter)
    if format != "fxtune":
        raise AdapterError(f"unknown adapter file format {format!r}; use 'fxtune' or 'peft'")
    save_fxtune(gm, path, adapter)


def load_adapters(gm: fx.GraphModule, path: str, *, adapter: str | None = None) -> fx.GraphModule:
    """A new GraphModule with the adapter saved in `path` re-created on gm (optionally renamed).

    The directory's contents say its format: adapters.json is fxtune's, adapter_config.json PEFT's.
    """
    is_fxtune, is_peft = (os.path.isfile(os.path.join(path, name)) for name in (JSON_NAME, PEFT_CONFIG_NAME))
    if is_fxtune and is_peft:
        raise AdapterError(f"{path!r} holds both {JSON_NAME} (fxtune) and {PEFT_CONFIG_NAME} (PEFT); keep each format in its own directory")
    if is_peft:
        return load_peft(gm, path, adapter)
    if not is_fxtune:
        raise AdapterError(f"{path!r} holds neither {JSON_NAME} nor {PEFT_CONFIG_NAME}; it is not an fxtune adapter directory (nor a PEFT one)")
    return load_fxtune(gm, path, adapter)
