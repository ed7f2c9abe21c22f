"""Plain values (call arguments, settings, node.meta) as JSON data, and back, checked strictly.

JSON keeps numbers, strings, booleans, None and lists; every other value becomes an object with
exactly one tag key, e.g. `{"tuple": [1, 2]}`, `{"dtype": "float32"}`, `{"node": "conv1"}`.
Tensors and callables are handed to the caller's hooks (a tensor table, a target namer), so
this module never decides what may be called. Decoding refuses unknown tags and wrong types
with a GraphFileError naming the place in the file.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import fx

from ...graph.traced_calls import _Ref
from ...errors import FxtuneError

_DTYPES = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)}
_MEMORY_FORMATS = {
    name: getattr(torch, name) for name in ("contiguous_format", "channels_last", "channels_last_3d", "preserve_format")
}
_LAYOUTS = {name: getattr(torch, name) for name in ("strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "_mkldnn") if hasattr(torch, name)}
_DEVICE_TYPES = ("cpu", "cuda", "meta", "mps", "xpu", "hpu", "mtia", "privateuseone")
_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class GraphFileError(FxtuneError):
    """A GraphModule cannot be written as data, or a graph file (or pickle) cannot be read back as one."""


def check_fields(record: Any, where: str, required: Mapping[str, Any], optional: Mapping[str, Any] = {}) -> dict:
    """`record` as a dict with exactly these keys (`optional` ones may be missing), each of its type."""
    if not isinstance(record, dict):
        raise GraphFileError(f"{where}: expected an object, found {_kind(record)}")
    unknown = sorted(set(record) - set(required) - set(optional))
    if unknown:
        raise GraphFileError(f"{where}: unknown field(s) {unknown}; this fxtune knows {sorted({**required, **optional})}")
    missing = sorted(set(required) - set(record))
    if missing:
        raise GraphFileError(f"{where}: missing field(s) {missing}")
    for key, value in record.items():
        expect(value, {**required, **optional}[key], f"{where}.{key}")
    return record


def expect(value: Any, types: Any, where: str) -> Any:
    """`value` if it has one of `types` (a bool is no int here); a GraphFileError naming `where` if not."""
    if types is Any:
        return value
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types:
        ok = False
    else:
        ok = isinstance(value, types) or (float in types and type(value) is int)
    if not ok:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise GraphFileError(f"{where}: expected {names}, found {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), f"a {type(value).__name__}"
    )


class ValueCodec:
    """Encodes and decodes values; tensors and callables go through the given hooks.

    `tensor(t, where) -> JSON` / `tensor_back(JSON, where) -> t`, and likewise `callable`, are
    what a file or a pickle does with them; a codec without a hook refuses that kind of value.
    """

    def __init__(
        self,
        *,
        callable: Callable[[Any, str], Any] | None = None,
        callable_back: Callable[[Any, str], Any] | None = None,
        tensor: Callable[[torch.Tensor, str], Any] | None = None,
        tensor_back: Callable[[Any, str], torch.Tensor] | None = None,
    ):
        self._callable, self._callable_back = callable, callable_back
        self._tensor, self._tensor_back = tensor, tensor_back

    def encode(self, value: Any, where: str) -> Any:
        """`value` as JSON data; a GraphFileError names what cannot be written."""
        if value is None or type(value) in (bool, int, str):
            return value
        if type(value) is float:
            return value if math.isfinite(value) else {"float": repr(value)}
        if isinstance(value, _Ref):
            return {"ref": str(value)}
        if isinstance(value, fx.Node):
            return {"node": value.name}
        if isinstance(value, torch.Tensor):
            if self._tensor is None:
                raise GraphFileError(f"{where}: a tensor cannot be stored here")
            return {"tensor": self._tensor(value, where)}
        if isinstance(value, torch.Size):
            return {"size": [int(d) for d in value]}
        if type(value) is tuple:
            return {"tuple": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, list) and type(value) in (list, fx.immutable_collections.immutable_list):
            return [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if type(value) in (dict, fx.immutable_collections.immutable_dict):
            if all(type(k) is str for k in value):
                return {"dict": {k: self.encode(v, f"{where}[{k!r}]") for k, v in value.items()}}
            return {"dict": [[self.encode(k, f"{where} key"), self.encode(v, f"{where}[{k!r}]")] for k, v in value.items()]}
        if isinstance(value, slice):
            return {"slice": [self.encode(v, f"{where}.slice") for v in (value.start, value.stop, value.step)]}
        if value is Ellipsis:
            return {"ellipsis": True}
        if isinstance(value, torch.dtype):
            return {"dtype": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"device": str(value)}
        if isinstance(value, torch.memory_format):
            return {"memory_format": str(value).removeprefix("torch.")}
        if isinstance(value, torch.layout):
            return {"layout": str(value).removeprefix("torch.")}
        if callable(value) and self._callable is not None:
            return {"callable": self._callable(value, where)}
        raise GraphFileError(
            f"{where}: a {type(value).__module__}.{type(value).__qualname__} ({value!r:.80}) cannot be stored as data; "
            "graph files hold numbers, strings, tuples, lists, dicts, dtypes, devices, slices, tensors and named functions"
        )

    def decode(self, data: Any, where: str, nodes: Mapping[str, fx.Node] | None = None) -> Any:
        """The value `data` stands for; node references are looked up in `nodes` (None: not allowed here)."""
        if data is None or type(data) in (bool, int, float, str):
            return data
        if type(data) is list:
            return [self.decode(v, f"{where}[{i}]", nodes) for i, v in enumerate(data)]
        if type(data) is not dict or len(data) != 1:
            raise GraphFileError(f"{where}: expected a value, found {_kind(data)} with fields {sorted(data) if isinstance(data, dict) else ''}")
        (tag, body), = data.items()
        decoder = _TAGS.get(tag)
        if decoder is None:
            raise GraphFileError(f"{where}: unknown value tag '{tag}'; known tags: {sorted(_TAGS)}")
        return decoder(self, body, f"{where}.{tag}", nodes)

    def _node(self, body: Any, where: str, nodes: Mapping[str, fx.Node] | None) -> fx.Node:
        expect(body, str, where)
        if nodes is None:
            raise GraphFileError(f"{where}: a graph node reference is not allowed here")
        if body not in nodes:
            raise GraphFileError(f"{where}: refers to node '{body}', which is not defined before it")
        return nodes[body]

    def _tensor_of(self, body: Any, where: str, nodes: Any) -> torch.Tensor:
        if self._tensor_back is None:
            raise GraphFileError(f"{where}: a tensor is not allowed here")
        return self._tensor_back(body, where)

    def _callable_of(self, body: Any, where: str, nodes: Any) -> Any:
        if self._callable_back is None:
            raise GraphFileError(f"{where}: a function is not allowed here")
        return self._callable_back(body, where)


def _items(codec: ValueCodec, body: Any, where: str, nodes: Any) -> list:
    return [codec.decode(v, f"{where}[{i}]", nodes) for i, v in enumerate(expect(body, list, where))]


def _dict(codec: ValueCodec, body: Any, where: str, nodes: Any) -> dict:
    """A dict: an object when every key is a string, else a list of [key, value] pairs."""
    if isinstance(body, dict):
        return {k: codec.decode(v, f"{where}[{k!r}]", nodes) for k, v in body.items()}
    out = {}
    for i, pair in enumerate(expect(body, (list, dict), where)):
        if not isinstance(pair, list) or len(pair) != 2:
            raise GraphFileError(f"{where}[{i}]: expected a [key, value] pair")
        key = codec.decode(pair[0], f"{where}[{i}] key", None)
        try:
            hash(key)
        except TypeError:
            raise GraphFileError(f"{where}[{i}]: a dict key must be a number, string or tuple") from None
        out[key] = codec.decode(pair[1], f"{where}[{key!r}]", nodes)
    return out


def _slice(codec: ValueCodec, body: Any, where: str, nodes: Any) -> slice:
    parts = _items(codec, body, where, nodes)
    if len(parts) != 3:
        raise GraphFileError(f"{where}: expected [start, stop, step]")
    return slice(*parts)


def _from_table(table: dict, kind: str) -> Callable:
    def decode(codec: ValueCodec, body: Any, where: str, nodes: Any) -> Any:
        if expect(body, str, where) not in table:
            raise GraphFileError(f"{where}: unknown {kind} '{body}'; known: {sorted(table)}")
        return table[body]

    return decode


def _device(codec: ValueCodec, body: Any, where: str, nodes: Any) -> torch.device:
    kind, _, index = expect(body, str, where).partition(":")
    if kind not in _DEVICE_TYPES or (index and not index.isdigit()):
        raise GraphFileError(f"{where}: '{body}' is not a device (e.g. 'cpu', 'cuda:0')")
    return torch.device(body)


def _float(codec: ValueCodec, body: Any, where: str, nodes: Any) -> float:
    if expect(body, str, where) not in _FLOATS:
        raise GraphFileError(f"{where}: expected 'nan', 'inf' or '-inf', found {body!r}")
    return _FLOATS[body]


def _size(codec: ValueCodec, body: Any, where: str, nodes: Any) -> torch.Size:
    dims = expect(body, list, where)
    for i, d in enumerate(dims):
        expect(d, int, f"{where}[{i}]")
    return torch.Size(dims)


def _ref(codec: ValueCodec, body: Any, where: str, nodes: Any) -> _Ref:
    if not expect(body, str, where).isidentifier():
        raise GraphFileError(f"{where}: '{body}' is not a node name")
    return _Ref(body)


def _ellipsis(codec: ValueCodec, body: Any, where: str, nodes: Any) -> Any:
    if body is not True:
        raise GraphFileError(f"{where}: expected true")
    return Ellipsis


_TAGS: dict[str, Callable] = {
    "tuple": lambda c, b, w, n: tuple(_items(c, b, w, n)),
    "dict": _dict,
    "slice": _slice,
    "ellipsis": _ellipsis,
    "float": _float,
    "size": _size,
    "dtype": _from_table(_DTYPES, "dtype"),
    "device": _device,
    "memory_format": _from_table(_MEMORY_FORMATS, "memory format"),
    "layout": _from_table(_LAYOUTS, "layout"),
    "node": lambda c, b, w, n: c._node(b, w, n),
    "ref": _ref,
    "tensor": lambda c, b, w, n: c._tensor_of(b, w, n),
    "callable": lambda c, b, w, n: c._callable_of(b, w, n),
}
