"""An fx.Graph as data: nodes (name, op, target, args, kwargs, annotation, fxtune's node.meta) and its codegen.

Decoding builds the Graph node by node with `create_node` and checks everything that reaches
generated code: node names are identifiers, module and attribute paths are dotted names, method
names are public identifiers, and functions come only from the codec's `callable_back` (an
allow-list for files, the pickled objects for pickles). Nothing is evaluated; the code a loaded
GraphModule runs is what torch.fx generates from these nodes.
"""

from __future__ import annotations

import builtins
import keyword
import re
from typing import Any, Callable

from torch import fx
from torch.fx.graph import CodeGen, _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

from ...graph.traced_calls import BASE_META, OUTPUT, TAG as META
from ...errors import warn
from ...frontends.torch_export import _PlainInputsCodeGen
from .targets import check_method
from .values import GraphFileError, ValueCodec, check_fields, expect
from ...kit.restructure import STRUCTURE_META

KEPT_META = (META, BASE_META, OUTPUT, STRUCTURE_META)  # what fxtune reads from node.meta
_PLAIN_META = {"stack_trace": str, "is_wrapped": bool}  # fx's own: where a node came from, and fx.wrap'ed calls (in the code)
OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
_CODEGENS = {"pytree": _PyTreeCodeGen, "plain_inputs": _PlainInputsCodeGen}


def encode_graph(graph: fx.Graph, codec: ValueCodec, annotation: Callable[[Any, str], Any], where: str) -> dict:
    """`graph` as JSON-able data; `annotation` names type annotations (one that cannot be named is dropped, with a warning)."""
    nodes = []
    for node in graph.nodes:
        at = f"{where} node '{node.name}'"
        target = codec.encode(node.target, f"{at} target")["callable"] if node.op == "call_function" else node.target
        record = {
            "name": node.name,
            "op": node.op,
            "target": target,
            "args": [codec.encode(a, f"{at} args[{i}]") for i, a in enumerate(node.args)],
            "kwargs": {k: codec.encode(v, f"{at} kwargs[{k!r}]") for k, v in node.kwargs.items()},
        }
        if node.type is not None:
            try:
                record["type"] = annotation(node.type, f"{at} annotation")
            except GraphFileError as exc:
                warn(f"{exc}; the annotation is left out, so the loaded code does not show it")
        meta = {key: codec.encode(node.meta[key], f"{at} meta[{key!r}]") for key in KEPT_META if key in node.meta}
        for key, kind in _PLAIN_META.items():
            if isinstance(node.meta.get(key), kind):
                meta[key] = node.meta[key]
        if meta:
            record["meta"] = meta
        nodes.append(record)
    data = {"nodes": nodes}
    codegen = encode_codegen(graph._codegen, codec, where)
    if codegen is not None:
        data["codegen"] = codegen
    return data


def encode_codegen(codegen: CodeGen, codec: ValueCodec, where: str) -> dict | None:
    """None for fx's plain code generator; a pytree signature (torch.export front end) as data."""
    kind = next((k for k, cls in _CODEGENS.items() if type(codegen) is cls), None)
    if type(codegen) is CodeGen and codegen._body_transformer is None and codegen._func_name == "forward":
        return None
    if kind is None or codegen._body_transformer is not None or codegen._func_name != "forward":
        raise GraphFileError(f"{where}: the graph's code generator {type(codegen).__qualname__} cannot be stored as data")
    info = codegen.pytree_info
    return {
        "kind": kind,
        "orig_args": list(info.orig_args),
        "in_spec": encode_spec(info.in_spec, codec, f"{where} in_spec"),
        "out_spec": encode_spec(info.out_spec, codec, f"{where} out_spec"),
    }


def encode_spec(spec: pytree.TreeSpec | None, codec: ValueCodec, where: str) -> Any:
    """A pytree structure as data: registered types by their serialized name, contexts as plain values."""
    if spec is None:
        return None
    if spec.is_leaf():
        return {"leaf": True}
    node_def = pytree.SUPPORTED_SERIALIZED_TYPES.get(spec.type)
    if node_def is None or node_def.serialized_type_name is None:
        raise GraphFileError(f"{where}: pytree type {spec.type!r} has no serialized name (register it with serialized_type_name=)")
    return {
        "type": node_def.serialized_type_name,
        "context": codec.encode(spec.context, f"{where} context"),
        "children": [encode_spec(c, codec, f"{where}[{i}]") for i, c in enumerate(spec.children())],
    }


def decode_spec(data: Any, codec: ValueCodec, where: str) -> pytree.TreeSpec | None:
    """The pytree structure; only types already registered in this process (nothing is imported)."""
    if data is None:
        return None
    if isinstance(data, dict) and "leaf" in data:
        check_fields(data, where, {"leaf": bool})
        return pytree.tree_structure(0)
    check_fields(data, where, {"type": str, "context": Any, "children": list})
    typ = pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE.get(data["type"])
    if typ is None:
        raise GraphFileError(
            f"{where}: the output type '{data['type']}' is not a registered pytree type in this process; import the "
            "module that defines it (e.g. transformers) before loading"
        )
    children = [decode_spec(c, codec, f"{where}.children[{i}]") for i, c in enumerate(data["children"])]
    context = codec.decode(data["context"], f"{where}.context")
    if typ in (tuple, list) and context is not None or typ is dict and not isinstance(context, list):
        raise GraphFileError(f"{where}.context: {context!r:.80} is not the context of a {typ.__name__}")
    return pytree.TreeSpec(typ, context, children)


def decode_codegen(data: Any, codec: ValueCodec, where: str) -> CodeGen:
    check_fields(data, where, {"kind": str, "orig_args": list, "in_spec": Any, "out_spec": Any})
    cls = _CODEGENS.get(data["kind"])
    if cls is None:
        raise GraphFileError(f"{where}.kind: unknown code generator '{data['kind']}'; known: {sorted(_CODEGENS)}")
    names = [_identifier(n, f"{where}.orig_args[{i}]") for i, n in enumerate(data["orig_args"])]
    in_spec = decode_spec(data["in_spec"], codec, f"{where}.in_spec")
    if in_spec is None:
        raise GraphFileError(f"{where}.in_spec: a pytree signature needs the structure of its inputs")
    return cls(_PyTreeInfo(names, in_spec, decode_spec(data["out_spec"], codec, f"{where}.out_spec")))


def _identifier(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise GraphFileError(f"{where}: {name!r:.120} is not a Python identifier")
    return name


_PART = re.compile(r"[A-Za-z0-9_\-]+")  # torch.fx writes other parts as getattr(obj, "part"): no quotes may get in


def check_part(part: Any, where: str) -> str:
    """A module, parameter or buffer name: letters, digits, `_` and `-` (e.g. regnet's 'block1-0'), no dunder."""
    if not isinstance(part, str) or not _PART.fullmatch(part) or part.startswith("__") or keyword.iskeyword(part):
        raise GraphFileError(f"{where}: {part!r:.120} is not a module or attribute name")
    return part


def check_path(path: Any, where: str) -> str:
    """A module or attribute path (`layer1.0.conv1.weight`) of such names."""
    for part in expect(path, str, where).split("."):
        check_part(part, f"{where} {path!r:.120}")
    return path


def _placeholder_target(target: Any, where: str) -> str:
    name = expect(target, str, where)
    bare = name[2:] if name.startswith("**") else name[1:] if name.startswith("*") else name
    _identifier(bare, where)
    return name


def called_paths(data: Any) -> set[str]:
    """Module paths a graph record calls or reads (call_module, get_attr, and calls fxtune may restore)."""
    found = set()
    for record in data.get("nodes", []) if isinstance(data, dict) else []:
        if not isinstance(record, dict):
            continue
        if record.get("op") in ("call_module", "get_attr") and isinstance(record.get("target"), str):
            found.add(record["target"])
        base = (record.get("meta") or {}).get(BASE_META) if isinstance(record.get("meta"), dict) else None
        fields = base.get("dict") if isinstance(base, dict) else None
        if isinstance(fields, dict):
            if fields.get("op") == "call_module" and isinstance(fields.get("target"), str):
                found.add(fields["target"])
    return found


def decode_graph(
    data: Any, codec: ValueCodec, annotation: Callable[[Any, str], Any], where: str, *, strict: bool = True
) -> fx.Graph:
    """The Graph `data` describes, checked node by node; `strict` also applies the attribute-name policy (files)."""
    check_fields(data, where, {"nodes": list}, {"codegen": dict})
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    records = data["nodes"]
    for i, record in enumerate(records):
        at = f"{where}.nodes[{i}]"
        check_fields(record, at, {"name": str, "op": str, "target": Any, "args": list, "kwargs": dict}, {"type": Any, "meta": dict})
        name, op = _identifier(record["name"], f"{at}.name"), record["op"]
        if name in nodes or hasattr(builtins, name):
            raise GraphFileError(f"{at}.name: node name '{name}' is {'used twice' if name in nodes else 'a Python builtin'}")
        if op not in OPS:
            raise GraphFileError(f"{at}.op: unknown op {op!r}; ops are {list(OPS)}")
        if (op == "output") != (i == len(records) - 1):
            raise GraphFileError(f"{at}.op: the graph must end with exactly one 'output' node")
        target = _target(op, record["target"], codec, f"{at}.target", strict)
        args = tuple(codec.decode(a, f"{at}.args[{j}]", nodes) for j, a in enumerate(record["args"]))
        kwargs = {_identifier(k, f"{at}.kwargs"): codec.decode(v, f"{at}.kwargs.{k}", nodes) for k, v in record["kwargs"].items()}
        if strict and op == "call_function" and target is builtins.getattr:
            if len(args) < 2:
                raise GraphFileError(f"{at}: getattr needs an object and an attribute name")
            check_method(args[1], f"{at}.args[1]")
        type_expr = annotation(record["type"], f"{at}.type") if "type" in record else None
        node = graph.create_node(op, target, args, kwargs, name=name, type_expr=type_expr)
        if node.name != name:
            raise GraphFileError(f"{at}.name: node '{name}' would be renamed '{node.name}' (a name clash)")
        for key, value in (record.get("meta") or {}).items():
            if key in _PLAIN_META:
                node.meta[key] = expect(value, _PLAIN_META[key], f"{at}.meta.{key}")
            elif key in KEPT_META:
                node.meta[key] = codec.decode(value, f"{at}.meta.{key}")
            else:
                raise GraphFileError(f"{at}.meta: unknown key '{key}'; graph files keep {list(KEPT_META) + list(_PLAIN_META)}")
        nodes[name] = node
    if not records:
        raise GraphFileError(f"{where}.nodes: a graph needs at least its output node")
    if "codegen" in data:
        graph._codegen = decode_codegen(data["codegen"], codec, f"{where}.codegen")
    try:
        graph.lint()
    except Exception as exc:  # lint raises RuntimeError and others; all mean "not a valid graph"
        raise GraphFileError(f"{where}: not a valid graph: {exc}") from None
    return graph


def _target(op: str, target: Any, codec: ValueCodec, where: str, strict: bool) -> Any:
    if op == "call_function":
        return codec.decode({"callable": target}, where)
    if op == "placeholder":
        return _placeholder_target(target, where)
    if op == "output":
        if target != "output":
            raise GraphFileError(f"{where}: an output node's target is 'output'")
        return target
    if op == "call_method":
        return check_method(target, where) if strict else _identifier(target, where)
    return check_path(target, where)

