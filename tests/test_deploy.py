"""export_program and export_onnx: traced, adapted (LoRA activation and weight form, attention),
fused and export-front-end GraphModules, compared here with the GraphModule's own output — on
the example and on another batch size (dynamic batch) — the ONNX file through onnxruntime.
"""

from __future__ import annotations

import re

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn

import fxtune
from core_helpers import MLP, assert_unchanged, snapshot
from hf_models import bert
from fxtune import ExportError, export_onnx, export_program
from fxtune.passes import fuse, lora

pytestmark = pytest.mark.filterwarnings("ignore::fxtune.FxtuneWarning")


class CNN(nn.Module):
    """Plain, grouped and strided convs, a BatchNorm and a linear head. Input (B, 3, 8, 8)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.down = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = torch.relu(self.grouped(h))
        return self.fc(torch.relu(self.down(h)).mean((2, 3)))


class Attention(nn.Module):
    """nn.MultiheadAttention between two linears. Input (B, 5, 8)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.attn(h, h, h, need_weights=False)[0])


def _random_adapters(gm, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fxtune.trainable_parameters(gm):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return gm


def _inputs(shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _model(cls, seed=0):
    torch.manual_seed(seed)
    model = cls().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _case(name):
    """(user model, GraphModule, input shape without the batch) of one deployment case."""
    if name == "cnn_traced":
        model = _model(CNN)
        return model, fxtune.trace(model), (3, 8, 8)
    if name == "cnn_lora_activation":
        model = _model(CNN)
        return model, _random_adapters(lora(fxtune.trace(model), r=2, form="activation")), (3, 8, 8)
    if name == "mlp_lora_weight":
        model = _model(MLP)
        return model, _random_adapters(lora(fxtune.trace(model), r=4, form="weight")), (16,)
    if name == "attention_lora":
        model = _model(Attention)
        return model, _random_adapters(lora(fxtune.trace(model), r=2)), (5, 8)
    if name == "cnn_fused":
        model = _model(CNN)
        return model, fuse(_random_adapters(lora(fxtune.trace(model), r=2, form="activation"))), (3, 8, 8)
    raise KeyError(name)


CASES = ["cnn_traced", "cnn_lora_activation", "mlp_lora_weight", "attention_lora", "cnn_fused"]


def _assert_close(got, want, tol):
    got, want = torch.as_tensor(got).double(), want.detach().double()
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= tol * max(1.0, float(want.abs().max()))


@pytest.mark.parametrize("name", CASES)
def test_export_program_computes_what_the_graphmodule_computes_at_any_batch(name):
    model, gm, shape = _case(name)
    model_snap, gm_snap = snapshot(model), snapshot(gm)
    program = export_program(gm, (_inputs((2, *shape)),))
    assert isinstance(program, torch.export.ExportedProgram)
    for batch in (2, 5):
        x = _inputs((batch, *shape), seed=batch)
        with torch.no_grad():
            _assert_close(program.module()(x), gm(x), 1e-5)
    assert_unchanged(model, model_snap)
    assert_unchanged(gm, gm_snap)


@pytest.mark.parametrize("name", [pytest.param(c, marks=pytest.mark.slow) if c == "cnn_traced" else c for c in CASES])
def test_export_onnx_runs_in_onnxruntime_like_the_graphmodule(name, tmp_path):
    _, gm, shape = _case(name)
    path = export_onnx(gm, (_inputs((2, *shape)),), tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (entry,) = session.get_inputs()
    assert entry.shape[0] == "batch"
    for batch in (2, 7):
        x = _inputs((batch, *shape), seed=batch)
        (y,) = session.run(None, {entry.name: x.numpy()})
        with torch.no_grad():
            _assert_close(torch.from_numpy(np.asarray(y)), gm(x), 1e-4)


def _tokens(batch, length=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 99, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length - 2:] = 0  # padding: the mask takes part
    return ids, mask


def _bert_gm():
    """A tiny BERT through the export front end (its graph calls torch.export's `_guards_fn`), with LoRA."""
    ids, mask = _tokens(2)
    gm = fxtune.trace(bert()[0], frontend="export", example_inputs=(ids,), example_kwargs={"attention_mask": mask}, dynamic="batch")
    return _random_adapters(lora(gm, targets=re.compile(r".*\.(query|value)"), r=4)), ids, mask


def test_export_front_end_bert_exports_with_its_guards_and_a_dynamic_batch():
    gm, ids, mask = _bert_gm()
    assert "_guards_fn" in gm.code
    program = export_program(gm, (ids,), example_kwargs={"attention_mask": mask})
    for batch in (2, 4):
        ids_b, mask_b = _tokens(batch, seed=batch)
        with torch.no_grad():
            got, want = program.module()(ids_b, attention_mask=mask_b), gm(ids_b, attention_mask=mask_b)
        _assert_close(got.last_hidden_state, want.last_hidden_state, 1e-5)
        _assert_close(got.pooler_output, want.pooler_output, 1e-5)


@pytest.mark.slow
def test_export_front_end_bert_to_onnx(tmp_path):
    gm, ids, mask = _bert_gm()
    path = export_onnx(gm, (ids,), tmp_path / "bert.onnx", example_kwargs={"attention_mask": mask})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("input_ids", ["batch", 7]), ("attention_mask", ["batch", 7])]
    ids_b, mask_b = _tokens(3, seed=3)
    hidden, pooled = session.run(None, {"input_ids": ids_b.numpy(), "attention_mask": mask_b.numpy()})
    with torch.no_grad():
        want = gm(ids_b, attention_mask=mask_b)
    _assert_close(torch.from_numpy(hidden), want.last_hidden_state, 1e-4)
    _assert_close(torch.from_numpy(pooled), want.pooler_output, 1e-4)


@torch.fx.wrap
def off_under_export(x):
    """A deliberately broken op: it adds 1 only while torch.export traces it."""
    return x + 1 if torch.compiler.is_exporting() else x


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return off_under_export(self.fc(x))


def test_a_program_that_computes_something_else_is_refused():
    gm = _random_adapters(lora(fxtune.trace(Broken().eval()), r=2))
    with pytest.raises(ExportError, match="differs by up to 1"):
        export_program(gm, (_inputs((3, 4)),))


class DropoutCNN(CNN):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.drop(super().forward(x))


def test_training_mode_export_is_checked_on_one_seed_and_keeps_batchnorm_statistics():
    model = _model(DropoutCNN).train()
    gm = _random_adapters(lora(fxtune.trace(model), r=2))
    gm_snap = snapshot(gm)
    export_program(gm, (_inputs((4, 3, 8, 8)),))  # dropout draws alike in both runs, or this raises
    assert_unchanged(gm, gm_snap)  # running statistics put back after the check


def test_dynamic_batch_needs_two_samples_and_a_static_program_keeps_its_batch():
    _, gm, shape = _case("mlp_lora_weight")
    one = _inputs((1, *shape))
    with pytest.raises(ExportError, match="batch of at least 2"):
        export_program(gm, (one,))
    program = export_program(gm, (one,), dynamic_batch=False)
    with torch.no_grad():
        _assert_close(program.module()(one), gm(one), 1e-5)
    with pytest.raises(Exception):
        program.module()(_inputs((3, *shape)))


def test_export_onnx_names_the_extra_when_onnx_is_missing(monkeypatch, tmp_path):
    import fxtune.io.export as deploy

    real = deploy.importlib.util.find_spec
    monkeypatch.setattr(deploy.importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    _, gm, shape = _case("mlp_lora_weight")
    with pytest.raises(ExportError, match=re.escape('pip install "fxtune[onnx]"')):
        export_onnx(gm, (_inputs((2, *shape)),), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


class FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x).reshape(2, -1)  # the traced code keeps the constant 2


def test_a_graph_that_fixes_the_batch_size_is_explained():
    gm = fxtune.trace(FixedBatch())
    x = _inputs((2, 4))
    with pytest.raises(ExportError, match="fixes the batch size"):
        export_program(gm, (x,))
    with torch.no_grad():
        _assert_close(export_program(gm, (x,), dynamic_batch=False).module()(x), gm(x), 1e-5)


def test_a_batched_graphmodule_is_refused_with_a_reason():
    _, gm, shape = _case("mlp_lora_weight")
    mixed = fxtune.batched(lora(gm, r=4, form="weight", adapter="other"), ["default", "other"])
    with pytest.raises(ExportError, match="host"):
        export_program(mixed, (_inputs((4, *shape)), torch.tensor([0, 1, -1, 0])))
