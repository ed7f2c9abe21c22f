"""The schema of `adapters.json`: every key it must have, nothing else, and values of the right type.

A hand-edited or damaged file is refused with the key and slot named, before anything is built.
"""

from __future__ import annotations

from typing import Any

import torch

FORMAT = "fxtune.adapter"
FORMAT_VERSION = 1

TOP = {"format": str, "format_version": int, "fxtune_version": str, "adapter": str, "slots": list}
SLOT = {"target": str, "kind": str, "config": dict, "form": str, "form_reason": str, "weight_shape": list, "tensors": dict}
TENSOR = {"same_as": (str, type(None)), "shape": list, "dtype": str, "role": str, "trainable": bool, "masked_by": (str, type(None))}
FORMS, ROLES = ("weight", "activation"), ("parameter", "buffer")


def _keys(found: Any, schema: dict, where: str) -> list[str]:
    """Missing and unknown keys of one JSON object, and values of the wrong type."""
    if not isinstance(found, dict):
        return [f"{where} is a JSON {type(found).__name__}, not an object"]
    problems = [f"{where}: missing key '{k}'" for k in schema if k not in found]
    problems += [f"{where}: unknown key '{k}' (expected only {', '.join(schema)})" for k in found if k not in schema]
    for key, types in schema.items():
        value = found.get(key)
        if key in found and (not isinstance(value, types) or (types is int and isinstance(value, bool))):
            problems.append(f"{where}: '{key}' is {value!r}, which is not a {_type_name(types)}")
    return problems


def _type_name(types: Any) -> str:
    names = [t.__name__ for t in (types if isinstance(types, tuple) else (types,))]
    return " or ".join("null" if n == "NoneType" else n for n in names)


def _shape_problem(value: list) -> bool:
    return not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)


def is_dtype_name(name: str) -> bool:
    return isinstance(getattr(torch, name, None), torch.dtype)


def schema_problems(meta: Any) -> list[str]:
    """Every way `meta` (adapters.json, parsed) departs from the schema, as readable lines."""
    problems = _keys(meta, TOP, "adapters.json")
    if problems:
        return problems
    if meta["format"] != FORMAT or meta["format_version"] != FORMAT_VERSION:
        return [f"not an fxtune adapter file (format {meta['format']!r} v{meta['format_version']!r}; "
                f"this fxtune reads {FORMAT!r} v{FORMAT_VERSION})"]
    targets: set[str] = set()
    for index, rec in enumerate(meta["slots"]):
        where = f"slot {index}" + (f" ('{rec['target']}')" if isinstance(rec, dict) and isinstance(rec.get("target"), str) else "")
        found = _keys(rec, SLOT, where)
        if found:
            problems += found
            continue
        if rec["target"] in targets:
            problems.append(f"{where}: a second slot on the same weight")
        targets.add(rec["target"])
        if rec["form"] not in FORMS:
            problems.append(f"{where}: form {rec['form']!r} is not one of {FORMS}")
        if _shape_problem(rec["weight_shape"]):
            problems.append(f"{where}: weight_shape {rec['weight_shape']!r} is not a list of sizes")
        for name, entry in rec["tensors"].items():
            problems += _tensor_problems(entry, rec["tensors"], f"{where}, tensor '{name}'")
    return problems


def _tensor_problems(entry: Any, entries: dict, where: str) -> list[str]:
    problems = _keys(entry, TENSOR, where)
    if problems:
        return problems
    if entry["role"] not in ROLES:
        problems.append(f"{where}: role {entry['role']!r} is not one of {ROLES}")
    if not is_dtype_name(entry["dtype"]):
        problems.append(f"{where}: dtype {entry['dtype']!r} is no torch dtype")
    if _shape_problem(entry["shape"]):
        problems.append(f"{where}: shape {entry['shape']!r} is not a list of sizes")
    mask = entry["masked_by"]
    if mask is not None and (not isinstance(entries.get(mask), dict) or entries[mask].get("masked_by") is not None):
        problems.append(f"{where}: masked_by names {mask!r}, which is not an unmasked tensor of this slot")
    if entry["role"] == "buffer" and (mask is not None or entry["same_as"] is not None or entry["trainable"]):
        problems.append(f"{where}: a buffer is never masked, shared or trainable")
    return problems
