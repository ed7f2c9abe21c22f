"""Reading and writing adapter directories safely: every failure is an AdapterError naming the file.

Shared by fxtune's and PEFT's formats: JSON and safetensors only (nothing unpickled), writes
that never leave a directory holding two formats, and adapter tensors brought to the dtype and
device of the weight they adapt.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import AdapterError


def read_json(file: str) -> Any:
    """The JSON in `file`; a missing, unreadable or malformed file is an AdapterError naming it."""
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise AdapterError(f"{file!r} does not exist; save the adapter again, or point to its directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"cannot read {file!r} as JSON ({exc}); the file is damaged: save the adapter again") from None


def read_safetensors(file: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors in a safetensors `file` and its metadata; a missing or damaged file is an AdapterError naming it."""
    if not os.path.isfile(file):
        raise AdapterError(f"{file!r} does not exist; the adapter's tensors are missing: save the adapter again")
    try:
        with safe_open(file, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(
            f"cannot read {file!r} as safetensors ({exc}); the file is damaged or truncated: save the adapter again"
        ) from None
    return tensors, metadata


def json_metadata(metadata: dict[str, str], key: str) -> Any:
    """A JSON value fxtune stored in safetensors metadata under `key`, or None if absent or not JSON."""
    text = metadata.get(key)
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None


def prepare_directory(path: str, other_format: dict[str, str], *, overwrite: bool) -> None:
    """Makes `path` a directory to write one format into. Files of another format there
    (`other_format`: file name -> format name) are refused, or removed with overwrite=True."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise AdapterError(f"{path!r} is a file; adapters are saved into a directory: give a directory path")
    found = [name for name in other_format if os.path.isfile(os.path.join(path, name))]
    if found and not overwrite:
        formats = sorted({other_format[name] for name in found})
        raise AdapterError(
            f"{path!r} already holds {', '.join(found)} ({' and '.join(formats)} format); writing another format "
            "there would leave a directory that load_adapters refuses. Choose an empty directory, or pass "
            "overwrite=True to replace those files"
        )
    os.makedirs(path, exist_ok=True)
    for name in found:
        os.remove(os.path.join(path, name))


def write_files(path: str, writers: dict[str, Callable[[str], None]]) -> None:
    """Writes each file through a temporary name, then renames them all: a failed save leaves no half-written file."""
    temporary = {name: os.path.join(path, f".{name}.partial") for name in writers}
    try:
        for name, write in writers.items():
            write(temporary[name])
    except BaseException:
        for file in temporary.values():
            if os.path.exists(file):
                os.remove(file)
        raise
    for name, file in temporary.items():
        os.replace(file, os.path.join(path, name))


def json_writer(data: Any) -> Callable[[str], None]:
    def write(file: str) -> None:
        with open(file, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)

    return write


def safetensors_writer(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Callable[[str], None]:
    return lambda file: save_file(tensors, file, metadata=metadata)


def cast_like(tensors: dict[str, torch.Tensor], weight: torch.Tensor, where: str) -> dict[str, torch.Tensor]:
    """Adapter tensors as the weight they adapt holds them: floating ones in its dtype, all on its device.

    A weight on the meta device (no values) is refused: the adapter's values would be lost there.
    A floating value that the weight's dtype cannot hold (it becomes inf) is refused by name.
    """
    if weight.is_meta:
        raise AdapterError(
            f"{where}: the model's weight is on the meta device (it has no values), so the adapter's values would be "
            "lost; load the model's weights first (e.g. model.load_state_dict(state, assign=True)), then trace it"
        )
    out = {}
    for name, value in tensors.items():
        if value.is_floating_point() and weight.is_floating_point() and value.dtype != weight.dtype:
            cast = value.to(weight.dtype)
            if _finite(value) and not _finite(cast):
                raise AdapterError(
                    f"{where}: tensor '{name}' ({str(value.dtype).removeprefix('torch.')}) has values that "
                    f"{str(weight.dtype).removeprefix('torch.')}, the weight's dtype, cannot hold (they become inf); "
                    "load it onto a model in a wider dtype"
                )
            value = cast
        out[name] = value.to(weight.device)
    return out


def _finite(t: torch.Tensor) -> bool:
    return t.numel() == 0 or math.isfinite(float(t.double().abs().max()))
