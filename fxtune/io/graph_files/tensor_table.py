"""The tensors of a graph file: each tensor object once, each block of values once, identity restored on load.

A tied weight (one Parameter under several names, a prototype shared by several adapter slots,
a kept base weight that is also the current one) is one object record; objects that view the
same values (same storage, offset, shape, strides) share one safetensors entry. On load every
entry is copied into fresh storage, and each object record becomes one tensor again, so
`gm.a.weight is gm.b.weight` holds after loading exactly when it held before saving.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .values import _DTYPES, GraphFileError, check_fields, expect


def dense_strides(shape: list[int], stride: list[int]) -> bool:
    """Whether `stride` lays a tensor of `shape` out densely (a permutation of row-major: no gaps, no overlap)."""
    if len(shape) != len(stride) or any(s < 0 for s in stride):
        return False
    expected = 1
    for size, step in sorted(((d, s) for d, s in zip(shape, stride) if d != 1), key=lambda p: p[1]):
        if step != expected:
            return False
        expected *= size
    return True


def _layout(t: torch.Tensor) -> list[int] | None:
    """The strides to restore on load, when not row-major (channels-last, a transposed factor); else None.
    Strides of size-1 dimensions count too: kernels may pick their layout from them."""
    row_major = torch.empty(t.shape, device="meta").stride()
    if t.stride() == row_major or not dense_strides(list(t.shape), list(t.stride())):
        return None
    return list(t.stride())


class TensorWriter:
    """Collects tensors while a GraphModule is written: `add` gives each tensor object its index."""

    def __init__(self):
        self.objects: list[dict] = []
        self.data: dict[str, torch.Tensor] = {}
        self.entries: dict[str, dict] = {}
        self._index: dict[int, int] = {}
        self._views: dict[tuple, str] = {}
        self._storages: set[int] = set()
        self._alive: list[torch.Tensor] = []  # keeps ids unique while writing

    def add(self, t: torch.Tensor, name: str) -> int:
        """The index of tensor object `t` (added once; `name` names its values in the safetensors file)."""
        if id(t) in self._index:
            return self._index[id(t)]
        if type(t) not in (torch.Tensor, nn.Parameter):
            raise GraphFileError(f"{name}: a {type(t).__qualname__} (tensor subclass) cannot be stored in a graph file")
        if t.layout is not torch.strided or t.is_quantized:
            raise GraphFileError(f"{name}: a {t.layout} tensor cannot be stored in a graph file (dense tensors only)")
        if t.is_meta:
            raise GraphFileError(f"{name}: the tensor is on the meta device (it has no values); load the weights first")
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
        key = self._views.get(view)
        if key is None:
            key = self._unique(name)
            values = t.detach().to("cpu").contiguous()
            if values.untyped_storage().data_ptr() in self._storages:
                values = values.clone()  # safetensors refuses two entries on one storage
            self._storages.add(values.untyped_storage().data_ptr())
            self.data[key] = values
            self.entries[key] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "stride": _layout(t)}
            self._views[view] = key
        self.objects.append({"data": key, "parameter": isinstance(t, nn.Parameter), "requires_grad": bool(t.requires_grad)})
        self._index[id(t)] = len(self.objects) - 1
        self._alive.append(t)
        return self._index[id(t)]

    def _unique(self, name: str) -> str:
        key, n = name, 1
        while key in self.entries:
            n += 1
            key = f"{name}#{n}"
        return key


class TensorReader:
    """Tensor objects by index from a file's records and the safetensors entries (each copied into fresh storage)."""

    def __init__(self, objects: Any, entries: Any, data: dict[str, torch.Tensor], where: str):
        self.where = where
        expect(objects, list, f"{where}.objects")
        expect(entries, dict, f"{where}.data")
        missing, extra = sorted(set(entries) - set(data)), sorted(set(data) - set(entries))
        if missing or extra:
            raise GraphFileError(f"{where}: the tensor file does not match the graph file: missing {missing[:5]}, unexpected {extra[:5]}")
        self.values: dict[str, torch.Tensor] = {}
        for key, entry in entries.items():
            at = f"{where}.data[{key!r}]"
            check_fields(entry, at, {"dtype": str, "shape": list, "stride": (list, type(None))})
            tensor = data[key]
            if entry["dtype"] not in _DTYPES or tensor.dtype is not _DTYPES[entry["dtype"]] or list(tensor.shape) != entry["shape"]:
                raise GraphFileError(
                    f"{at}: the tensor file holds {tensor.dtype} {list(tensor.shape)}, the graph file says {entry['dtype']} {entry['shape']}"
                )
            stride = entry["stride"]
            if stride is None:
                self.values[key] = tensor.clone(memory_format=torch.contiguous_format)
                continue
            if not all(type(s) is int for s in stride) or not dense_strides(entry["shape"], stride):
                raise GraphFileError(f"{at}.stride: {stride!r:.80} is not a dense layout of shape {entry['shape']}")
            self.values[key] = torch.empty_strided(tensor.shape, stride, dtype=tensor.dtype).copy_(tensor)
        self.records = [check_fields(r, f"{where}.objects[{i}]", {"data": str, "parameter": bool, "requires_grad": bool}) for i, r in enumerate(objects)]
        for i, record in enumerate(self.records):
            if record["data"] not in self.values:
                raise GraphFileError(f"{where}.objects[{i}].data: no tensor entry {record['data']!r}")
        self._made: dict[int, torch.Tensor] = {}

    def get(self, index: Any, where: str) -> torch.Tensor:
        """Tensor object `index`, the same object every time it is asked for."""
        if type(index) is not int or not 0 <= index < len(self.records):
            raise GraphFileError(f"{where}: {index!r} is not a tensor index (0..{len(self.records) - 1})")
        if index not in self._made:
            record = self.records[index]
            values = self.values[record["data"]]
            if record["parameter"]:
                made = nn.Parameter(values, requires_grad=record["requires_grad"])
            else:
                made = values.detach().requires_grad_(record["requires_grad"])
            self._made[index] = made
        return self._made[index]
