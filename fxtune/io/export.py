"""Deployment exports of a GraphModule: a torch.export program and an ONNX file, each checked.

Both run the result on the example inputs and compare it with the GraphModule's own output
before returning, so a wrong export raises here instead of in production. With
`dynamic_batch=True` the first dimension of every input tensor is one symbolic batch size.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import pathlib
from typing import Any

import torch
from torch import fx
from torch.export import Dim, ExportedProgram
from torch.utils import _pytree as pytree

from ..errors import ExportError, warn
from ..frontends.torch_export import example_args

ONNX_INSTALL = 'pip install "fxtune[onnx]"'


def export_program(
    gm: fx.GraphModule,
    example_inputs: Any,
    *,
    example_kwargs: dict[str, Any] | None = None,
    dynamic_batch: bool = True,
    dynamic_shapes: Any = None,
    tolerance: float = 1e-5,
) -> ExportedProgram:
    """`torch.export` of gm (traced, adapted or fused), checked against gm on the example inputs.

    dynamic_batch=True makes dim 0 of every input tensor one symbolic size (`dynamic_shapes`, in
    torch.export's format, overrides it). Raises ExportError when export fails or when any output
    differs by more than `tolerance` × max(1, |output|) from gm's. gm keeps its state (buffers included).
    """
    args, kwargs = example_args(example_inputs, example_kwargs, error=ExportError, of="gm's")
    return _checked_program(gm, args, kwargs, dynamic_batch, dynamic_shapes, tolerance)[0]


def _checked_program(gm: fx.GraphModule, args: tuple, kwargs: dict, dynamic_batch: bool, dynamic_shapes: Any,
                     tolerance: float) -> tuple[ExportedProgram, Any]:
    """export_program's work: the program, and gm's outputs on the examples (which it was checked against)."""
    if dynamic_shapes is None and dynamic_batch:
        dynamic_shapes = _batch_shapes(gm, args, kwargs)
    try:
        program = torch.export.export(gm, args, kwargs, dynamic_shapes=dynamic_shapes)
    except Exception as exc:  # export raises many types; all mean "cannot export this"
        raise ExportError(_explain(gm, exc, dynamic_batch and dynamic_shapes is not None)) from exc
    expected = _run_kept(gm, gm, args, kwargs)
    got = _run_kept(gm, program.module(), args, kwargs)
    _compare(expected, got, tolerance, "the exported program", training=any(m.training for m in gm.modules()))
    return program, expected


def export_onnx(
    gm: fx.GraphModule,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    example_kwargs: dict[str, Any] | None = None,
    dynamic_batch: bool = True,
    dynamic_shapes: Any = None,
    tolerance: float = 1e-4,
) -> pathlib.Path:
    """Writes gm as an ONNX file at `path` (via `export_program`, so also checked there) and, when
    onnxruntime is installed, checks the file's outputs against gm's on the example inputs."""
    for package in ("onnx", "onnxscript"):
        if importlib.util.find_spec(package) is None:
            raise ExportError(f"export_onnx needs the optional package '{package}': {ONNX_INSTALL}")
    args, kwargs = example_args(example_inputs, example_kwargs, error=ExportError, of="gm's")
    program, expected = _checked_program(gm, args, kwargs, dynamic_batch, dynamic_shapes, tolerance)
    path = pathlib.Path(path)
    try:
        onnx_program = torch.onnx.export(program, args, kwargs=kwargs, dynamo=True, verbose=False)
        if dynamic_batch and dynamic_shapes is None:
            onnx_program.rename_axes({symbol: "batch" for symbol in _batch_symbols(program)})
        onnx_program.save(path)
    except Exception as exc:  # the ONNX exporter raises many types; all mean "cannot convert this"
        said = next((s.strip() for s in str(exc).splitlines() if s.strip()), type(exc).__name__)
        raise ExportError(
            f"torch.onnx could not convert the exported program of {type(gm).__name__} to ONNX: {said[:400]}\n"
            "export_program(gm, ...) works for it; an unsupported op in ONNX usually needs a newer opset or onnxscript"
        ) from exc
    if importlib.util.find_spec("onnxruntime") is None:
        warn(f"{path} was written but not run: install onnxruntime ({ONNX_INSTALL}) to check it against the GraphModule")
        return path
    _compare(expected, _run_onnx(path, program, args, _in_signature_order(gm, kwargs)), tolerance, f"the ONNX file {path} (onnxruntime)")
    return path


def _batch_shapes(gm: fx.GraphModule, args: tuple, kwargs: dict) -> dict:
    """torch.export's dynamic_shapes: dim 0 of every input tensor is one `Dim("batch")`."""
    try:
        bound = inspect.signature(gm.forward).bind(*args, **kwargs).arguments
    except TypeError as exc:
        raise ExportError(f"the example inputs do not fit {type(gm).__name__}.forward: {exc}") from exc
    batch = Dim("batch")
    small = [
        (name, t.shape[0]) for name, value in bound.items() for t in pytree.tree_leaves(value)
        if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] < 2
    ]
    if small:
        raise ExportError(
            f"dynamic_batch=True needs example inputs with a batch of at least 2 (torch.export fixes a size of 0 or 1); "
            f"input {small[0][0]!r} has {small[0][1]}. "
            "Give a larger example batch, or dynamic_batch=False for a program of that batch size only"
        )

    def spec(value: Any) -> Any:
        return {0: batch} if isinstance(value, torch.Tensor) and value.dim() else None

    return {name: pytree.tree_map(spec, value) for name, value in bound.items()}


def _explain(gm: fx.GraphModule, exc: Exception, dynamic: bool) -> str:
    """What torch.export said, and what to try."""
    said = next((s.strip() for s in str(exc).splitlines() if s.strip()), type(exc).__name__)
    said = said if len(said) <= 400 else said[:400] + " ..."
    text = str(exc)
    hint = "Check that the example inputs are what gm takes, and that gm runs on them."
    if "data-dependent" in text or "DataDependent" in type(exc).__name__:
        hint = (
            "A node branches on tensor values or needs them on the host (e.g. fxtune.batched's plan), which "
            "export cannot follow; export the GraphModule before batched(), or set_active one adapter."
        )
    elif dynamic and ("Constraint" in type(exc).__name__ or "specialized" in text or "Dim('batch')" in text or "batch" in said):
        hint = (
            "The graph fixes the batch size somewhere (e.g. a reshape to a constant batch): export with "
            "dynamic_batch=False for this batch size, or give dynamic_shapes= yourself."
        )
    return f"torch.export could not export {type(gm).__name__}\n  {type(exc).__name__}: {said}\n{hint}"


def _run_kept(gm: fx.GraphModule, fn: Any, args: tuple, kwargs: dict) -> Any:
    """fn(*args, **kwargs) without gradients and on one fixed random seed (dropout draws alike in
    every run), with gm's buffers (e.g. BatchNorm statistics) and the global random state put back after."""
    kept = {name: b.detach().clone() for name, b in gm.named_buffers()}
    devices = sorted({t.device.index or 0 for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_cuda})
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.default_generator.manual_seed(0)
            for index in devices:
                torch.cuda.default_generators[index].manual_seed(0)
            return fn(*args, **kwargs)
    finally:
        with torch.no_grad():
            for name, b in gm.named_buffers():
                b.copy_(kept[name])


def _tensors(output: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


def _compare(expected: Any, got: Any, tolerance: float, what: str, *, training: bool = False) -> None:
    """Raises ExportError unless `got` has `expected`'s tensors within tolerance × max(1, |expected|)."""
    want, have = _tensors(expected), _tensors(got)
    if len(want) != len(have):
        raise ExportError(f"{what} returns {len(have)} tensors, the GraphModule {len(want)}")
    for i, (a, b) in enumerate(zip(want, have)):
        b = torch.as_tensor(b)
        if a.shape != b.shape:
            raise ExportError(f"{what}: output {i} has shape {tuple(b.shape)}, the GraphModule's {tuple(a.shape)}")
        if a.numel() == 0:
            continue
        a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
        diff = float((a64 - b64).abs().max())
        bound = tolerance * max(1.0, float(a64.abs().max()))
        if not diff <= bound:  # also catches NaN
            hint = (
                "An op of gm's graph computes something else under export (e.g. it branches on "
                "torch.compiler.is_exporting() or on tensor values); please report it with gm.code."
            )
            if training:
                hint = "Modules of gm are in training mode: call gm.eval() before exporting for inference. " + hint
            raise ExportError(
                f"{what} does not compute what the GraphModule computes: output {i} differs by up to {diff:.3g} "
                f"(allowed {bound:.3g}). {hint}"
            )


def _batch_symbols(program: ExportedProgram) -> set[str]:
    """The names torch.export gave the symbolic size of dim 0 of the inputs (e.g. 's31')."""
    inputs = set(program.graph_signature.user_inputs)
    values = [n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder" and n.name in inputs]
    return {str(v.shape[0]) for v in values if isinstance(v, torch.Tensor) and v.dim() and isinstance(v.shape[0], torch.SymInt)}


def _in_signature_order(gm: fx.GraphModule, kwargs: dict) -> dict:
    """Keyword inputs in the order forward declares them, the order torch.export flattens them in."""
    order = list(inspect.signature(gm.forward).parameters)
    return dict(sorted(kwargs.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))


def _run_onnx(path: pathlib.Path, program: ExportedProgram, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The ONNX file's outputs on the example inputs, through onnxruntime on CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = program.graph_signature.user_inputs
    values = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    feed_by_name = dict(zip(names, values))
    feed = {i.name: feed_by_name[i.name].detach().cpu().numpy() for i in session.get_inputs()}
    return [torch.from_numpy(a) for a in session.run(None, feed)]
