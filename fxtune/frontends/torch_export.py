"""The torch.export front end: models symbolic tracing cannot follow (Hugging Face ones) as GraphModules.

torch.export runs a module tree fxtune owns (see ownership.py) on example inputs; the graph of
`ep.module()` is then re-hosted on that tree, so the module hierarchy, parameter FQNs and
state_dict keys are the model's, and linear/conv/embedding weights are `get_attr`s of them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch.fx.graph import CodeGen, _PyTreeCodeGen

from ..errors import TraceError
from ..graph.discovery import is_conv1d
from ..graph.ownership import build_graph_module, own_module_tree
from .dynamic_shapes import Dynamic, dynamic_shapes
from .explain import user_frames

GUARDS = "_guards_fn"  # torch.export's input check: shapes the graph was specialised to
_DROPPED_META = ("from_node",)  # provenance pointing into torch.export's own graphs


def export_trace(
    model: nn.Module, example_inputs: Any, example_kwargs: dict | None, *, dynamic: Dynamic = None
) -> fx.GraphModule:
    """`model` traced by torch.export on the example inputs, as a GraphModule fxtune owns.

    Shapes are those of the examples unless `dynamic=` frees some (see dynamic_shapes.py).
    """
    args, kwargs = _examples(example_inputs, example_kwargs)
    owned = own_module_tree(model, freeze=True)
    shapes = dynamic_shapes(owned, args, kwargs, dynamic)
    try:
        program = torch.export.export(owned, args, kwargs, dynamic_shapes=shapes)
    except Exception as exc:  # export raises many types; all mean "cannot export here"
        raise TraceError(_explain(model, owned, exc)) from exc
    exported = program.module()
    graph = exported.graph
    _adopt_attributes(owned, exported, graph)
    _read_ties_by_user(graph, owned)
    _reroll_conv1d(graph, owned)
    _tidy(graph)
    _plain_signature(graph)
    name = type(model).__name__
    return build_graph_module(owned, graph, class_name=name if name.isidentifier() else "GraphModule")


def _examples(example_inputs: Any, example_kwargs: dict | None) -> tuple[tuple, dict]:
    """The positional and keyword example inputs, checked; a lone tensor counts as one input."""
    if example_inputs is None and not example_kwargs:
        raise TraceError(
            "frontend='export' runs the model once, so it needs example inputs: "
            "fxtune.trace(model, frontend='export', example_inputs=(input_ids,), "
            "example_kwargs={'attention_mask': mask}) with tensors shaped like real ones"
        )
    return example_args(example_inputs, example_kwargs)


def example_args(example_inputs: Any, example_kwargs: dict | None, *, error: type[Exception] = TraceError,
                 of: str = "the model's") -> tuple[tuple, dict]:
    """(args, kwargs) from example inputs as users give them: a lone tensor is one input, None none;
    anything else raises `error`."""
    if example_inputs is None:
        example_inputs = ()
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise error(f"example_inputs must be a tuple of {of} positional inputs, got {type(example_inputs).__name__}")
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise error(f"example_kwargs must be a dict of keyword inputs, got {type(example_kwargs).__name__}")
    return tuple(example_inputs), dict(example_kwargs or {})


def _adopt_attributes(owned: nn.Module, exported: fx.GraphModule, graph: fx.Graph) -> None:
    """Gives `owned` whatever the graph reads that is not already its parameter or buffer.

    That is export's input check, the subgraphs of higher-order ops (an autocast or no_grad region
    in forward: `wrap_with_autocast(..., submod_1, x, weight, bias)`) and tensor constants:
    constants made in forward (only export has them) and plain tensor attributes. Subgraphs become
    child modules; constants non-persistent buffers (copies), so the state_dict keeps exactly the
    model's keys. A region receives the weights it uses as inputs, so they are sites (read as values).
    """
    for node in graph.nodes:
        if node.op == "call_module" and node.target == GUARDS:
            owned._modules[GUARDS] = getattr(exported, GUARDS)
        if node.op != "get_attr":
            continue
        path, _, field = node.target.rpartition(".")
        holder = owned.get_submodule(path)
        if field in holder._parameters or field in holder._buffers:
            continue
        value = getattr(holder, field, None)
        if not isinstance(value, (torch.Tensor, nn.Module)):
            value = getattr(exported.get_submodule(path), field)
        if isinstance(value, nn.Module):
            _adopt_region(holder, field, value)
            continue
        holder.__dict__.pop(field, None)
        holder.register_buffer(field, value.detach().clone(), persistent=False)


def _adopt_region(holder: nn.Module, field: str, region: nn.Module) -> None:
    """A higher-order op's subgraph becomes a child module (export lifts every weight out of it,
    so its weights arrive as inputs: value sites, adapted in weight form)."""
    if field not in holder._modules:
        holder._modules[field] = region


def _tidy(graph: fx.Graph) -> None:
    """Readable code: each weight read just before its first use, ops named by their module.

    An op that uses the weight of the module it runs in is named like the fx front end names
    that module's call (`layer1_0_conv1`); weights the graph never uses are not read.
    """
    for node in graph.nodes:
        for key in _DROPPED_META:
            node.meta.pop(key, None)
        if node.op == "call_module" and node.target == GUARDS and node.meta.get("nn_module_stack"):
            node.meta["nn_module_stack"] = dict(list(node.meta["nn_module_stack"].items())[:1])
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in [n for n in graph.nodes if n.op == "get_attr"]:
        if node.users:
            min(node.users, key=order.__getitem__).prepend(node)
        else:
            graph.erase_node(node)
    for node in graph.nodes:
        owner = _owner_path(node)
        if owner is not None:
            node._rename(owner.replace(".", "_"))


class _PlainInputsCodeGen(_PyTreeCodeGen):
    """`def forward(self, input_ids, attention_mask)` straight over the placeholders, so passes may
    add inputs; the return still builds the model's own output (e.g. a ModelOutput)."""

    def gen_fn_def(self, free_vars: list[str], maybe_return_annotation: str, *, expanded_def: bool = False) -> str:
        return CodeGen.gen_fn_def(self, free_vars, maybe_return_annotation, expanded_def=expanded_def)

    def process_inputs(self, *inputs: Any) -> Any:
        return inputs


def _plain_signature(graph: fx.Graph) -> None:
    """When every input is one tensor or constant named as forward names it, forward takes them
    directly (export's own code flattens them through `self._in_spec` first)."""
    info = getattr(graph._codegen, "pytree_info", None)
    spec = None if info is None else info.in_spec
    if spec is None or spec.type is not tuple or spec.num_children != 2:
        return
    args, kwargs = spec.child(0), spec.child(1)
    names = [n.target for n in graph.nodes if n.op == "placeholder"]
    leaves = [args.child(i) for i in range(args.num_children)] + [kwargs.child(i) for i in range(kwargs.num_children)]
    if not all(leaf.is_leaf() for leaf in leaves) or names[args.num_children:] != list(kwargs.context or []):
        return
    graph._codegen = _PlainInputsCodeGen(info)


def _read_ties_by_user(graph: fx.Graph, owned: nn.Module) -> None:
    """A tied weight is read under the name of the module that uses it, as the model's code does.

    Export reads every name of one tensor by a single name (GPT-2's embedding as `lm_head.weight`);
    sites are named by the reading module, so `transformer.wte` must read `transformer.wte.weight`.
    """
    modules = dict(owned.named_modules())
    for node in [n for n in graph.nodes if n.op == "get_attr"]:
        owner, _, field = node.target.rpartition(".")
        tensor = getattr(modules.get(owner), field, None)
        for user in list(node.users):
            stack = user.meta.get("nn_module_stack") or {}
            path = list(stack.values())[-1][0] if stack and user.op == "call_function" else None
            holder = modules.get(path) if path and path != owner else None
            if holder is None or tensor is None or getattr(holder, field, None) is not tensor:
                continue
            with graph.inserting_before(user):
                read = graph.get_attr(f"{path}.{field}")
            read.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")})
            user.replace_input_with(node, read)
        if not node.users:
            graph.erase_node(node)


def _reroll_conv1d(graph: fx.Graph, owned: nn.Module) -> None:
    """Each call of a transformers Conv1D (`view`, `addmm`, `view` in export's graph) becomes one
    call of the module again, as in the fx front end: a module site, so LoRA's activation form
    (and its dropout) applies to GPT-2 as to any linear."""
    modules = dict(owned.named_modules())
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        if node.op == "call_function" and stack and not _is_size(node):
            key, (path, _) = list(stack.items())[-1]
            if is_conv1d(modules.get(path)):
                calls.setdefault(key, []).append(node)
    for key, nodes in calls.items():
        path = list(nodes[0].meta["nn_module_stack"].values())[-1][0]
        members = set(nodes)
        inputs = {a for n in nodes for a in n.all_input_nodes if a not in members and not _reads(a, path) and not _is_size(a)}
        outputs = [n for n in nodes if any(u not in members for u in n.users)]
        if len(inputs) != 1 or len(outputs) != 1:
            continue  # not the plain view-addmm-view shape: leave export's ops (a weight "value" site)
        with graph.inserting_before(outputs[0]):
            call = graph.call_module(path, (inputs.pop(),))
        kept = ("val", "tensor_meta", "nn_module_stack", "stack_trace")
        call.meta.update({k: v for k, v in outputs[0].meta.items() if k in kept})
        outputs[0].replace_all_uses_with(call)
        used = {a for n in nodes for a in n.all_input_nodes if a not in members}
        for n in reversed(nodes):
            graph.erase_node(n)
        for n in used:
            if not n.users and (_reads(n, path) or _is_size(n)):
                graph.erase_node(n)


def _reads(node: fx.Node, path: str) -> bool:
    """Whether `node` reads a parameter or buffer of the module at `path`."""
    return node.op == "get_attr" and node.target.rpartition(".")[0] == path


def _is_size(node: fx.Node) -> bool:
    """A symbolic size (export's `sym_size` nodes), which the module computes itself when called."""
    return isinstance(node.meta.get("val"), torch.SymInt)


def _owner_path(node: fx.Node) -> str | None:
    """The module path of an op that reads the weight of the module it runs in, else None."""
    if node.op == "call_module" and node.target != GUARDS:
        return node.target
    if node.op != "call_function":
        return None
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    weights = [a.target for a in node.all_input_nodes if a.op == "get_attr"]
    return path if path and f"{path}.weight" in weights else None


def _explain(model: nn.Module, owned: nn.Module, exc: Exception) -> str:
    """Names the module and source line where export failed, what it said, and what to try."""
    names = {id(m): name for name, m in owned.named_modules()}
    where, line = None, None
    for frame in user_frames(exc.__traceback__):
        line = f"{frame.filename}:{frame.lineno}"
        module = frame.frame.f_locals.get("self")
        if isinstance(module, nn.Module) and id(module) in names:
            where = names[id(module)]
    place = ""
    if where is not None:
        place = f" in module '{where or '<top level>'}' ({type(model.get_submodule(where)).__name__})"
    place += f" at {line}" if line else ""
    said = next((s.strip() for s in str(exc).splitlines() if s.strip()), "")
    said = said if len(said) <= 400 else said[:400] + " ..."
    hint = ""
    if "data-dependent" in str(exc) or "DataDependent" in type(exc).__name__:
        hint = (
            "That line branches on tensor values, which export cannot follow: rewrite it with "
            "torch.where or torch.cond, or use frontend='fx' with leaf_modules=[...] around it, or trace the "
            "parts that are tensor code only (a detector's model.backbone, say) and adapt those.\n"
        )
    return (
        f"torch.export could not trace {type(model).__name__}{place}\n"
        f"  {type(exc).__name__}: {said}\n{hint}"
        "Caches and other model-specific outputs are yours to switch off before tracing (for Hugging Face "
        "models: model.config.use_cache = False, or use_cache=False in example_kwargs); "
        "example inputs must be what forward accepts."
    )
