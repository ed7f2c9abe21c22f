"""Hostile and damaged graph files are refused with an error naming what is wrong, and nothing in them runs.

Each case edits a real saved directory: call targets outside the allow-list, code hidden in names,
damaged safetensors files, wrong JSON types, unknown fields, module types that are not allowed.
Commands in them would create a marker file; the tests check it never appears, and (in a fresh
interpreter) that modules named by a refused file are not imported.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fxtune
from core_helpers import MLP
from fxtune import load, save
from fxtune import GraphFileError
from fxtune.passes import lora

RELU = 6  # index of the `relu = torch.relu(fc1_lora)` node in the saved graph
FC1 = 0  # index of child 'fc1' in the root module's children


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    save(lora(fxtune.trace(MLP()), targets="fc1", r=2), tmp_path / "gm")
    doc = json.loads((tmp_path / "gm" / "graph.json").read_text())
    assert doc["module"]["graph"]["nodes"][RELU]["target"] == {"name": "torch.relu"}
    assert doc["module"]["children"][FC1][0] == "fc1"
    return tmp_path / "gm"


def edit(directory, change) -> None:
    path = directory / "graph.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def nodes(doc):
    return doc["module"]["graph"]["nodes"]


@pytest.mark.parametrize("target", [
    "os.system", "builtins.eval", "builtins.exec", "subprocess.run", "importlib.import_module", "torch.save",
    "torch.load", "operator.attrgetter", "posix.system", "shutil.rmtree", "pickle.loads", "torch.get_device_module",
    "torch.set_default_device", "fxtune.io.graph_files.store.save", "fxtune.passes.lora.torch.save",
])
def test_target_outside_allow_list_is_refused_and_nothing_runs(saved, tmp_path, target):
    marker = tmp_path / "pwned"

    def change(doc):
        nodes(doc)[RELU]["target"] = {"name": target}
        nodes(doc)[RELU]["args"] = [f"touch {marker}"]

    edit(saved, change)
    with pytest.raises(GraphFileError, match=rf"'{target}'.*allow=\['{target}'\]"):
        load(saved)
    assert not marker.exists()


@pytest.mark.parametrize("where, value", [
    ("target", {"name": "os.system('touch MARKER')"}),
    ("target", {"name": "__import__('os').system"}),
    ("target", {"name": "builtins.__import__"}),
    ("name", "relu; __import__('os').system('touch MARKER')"),
    ("name", "relu\nimport os"),
    ("op", "call_method"),
])
def test_code_in_names_is_refused(saved, tmp_path, where, value):
    marker = tmp_path / "MARKER"
    value = json.loads(json.dumps(value).replace("MARKER", str(marker)))
    edit(saved, lambda doc: nodes(doc)[RELU].__setitem__(where, value))
    with pytest.raises(GraphFileError, match="not a qualified name|not a Python identifier|not an attribute name"):
        load(saved)
    assert not marker.exists()


@pytest.mark.parametrize("change, message", [
    (lambda d: nodes(d)[RELU].update(op="call_method", target="__class__"), "not an attribute name"),
    (lambda d: nodes(d)[RELU].update(op="call_method", target="from_file"), "not an attribute name"),
    (lambda d: nodes(d)[RELU].update(op="call_method", target="numpy"), "not an attribute name"),
    (lambda d: nodes(d)[RELU].update(op="call_method", target="system"), "not an attribute name"),
    (lambda d: nodes(d)[RELU].update(target={"name": "builtins.getattr"}, args=[{"node": "fc1_lora"}, "os"]),
     "not an attribute name"),
    (lambda d: nodes(d)[RELU].update(target={"name": "builtins.getattr"}, args=[{"node": "fc1_lora"}, "__globals__"]),
     "not an attribute name"),
    (lambda d: nodes(d)[0].update(target="x=__import__('os').system('touch MARKER')"), "not a Python identifier"),
    (lambda d: nodes(d)[2].update(target="fxtune.__class__.__init__"), "not a module or attribute name"),
    (lambda d: nodes(d)[2].update(target='fxtune.x"); __import__("os").system("touch MARKER'), "not a module or attribute name"),
    (lambda d: d["module"].update(class_name="G(): pass\nimport os\nclass G"), "not a class name"),
    (lambda d: d["module"]["children"][FC1].__setitem__(0, "fc1; import os"), "not a module or attribute name"),
    (lambda d: d["module"]["children"][FC1][1]["attributes"].update({"forward": {"callable": {"name": "torch.zeros_like"}}}),
     "not a plain attribute name"),
    (lambda d: d["module"]["children"][FC1][1]["attributes"].update({"extra_repr": 1}), "would hide"),
])
def test_dangerous_names_and_attributes_are_refused(saved, tmp_path, change, message):
    marker = tmp_path / "MARKER"
    doc = json.loads((saved / "graph.json").read_text())
    change(doc)
    (saved / "graph.json").write_text(json.dumps(doc).replace("MARKER", str(marker)))
    with pytest.raises(GraphFileError, match=message):
        load(saved)
    assert not marker.exists()


def test_truncated_or_modified_safetensors_is_refused(saved):
    tensors = saved / "tensors.safetensors"
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])
    with pytest.raises(GraphFileError, match="damaged"):
        load(saved)
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    tensors.write_bytes(bytes(flipped))
    with pytest.raises(GraphFileError, match="damaged"):
        load(saved)


def _replace_tensors(directory, payload: bytes) -> None:
    """Puts `payload` in place of the safetensors file and records its hash, as a careful forger would."""
    import hashlib

    (directory / "tensors.safetensors").write_bytes(payload)
    edit(directory, lambda doc: doc["tensors"].update(sha256=hashlib.sha256(payload).hexdigest()))


def test_corrupt_safetensors_with_matching_hash_is_refused(saved):
    data = (saved / "tensors.safetensors").read_bytes()
    _replace_tensors(saved, b"\xff" * 8 + data[8:])
    with pytest.raises(GraphFileError, match="not a readable safetensors file"):
        load(saved)


def test_safetensors_not_matching_the_graph_is_refused(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {k: v.clone() for k, v in load_file(str(saved / "tensors.safetensors")).items()}  # not mmapped: the file is replaced
    tensors["fc1.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(tmp_path / "other.safetensors"))
    _replace_tensors(saved, (tmp_path / "other.safetensors").read_bytes())
    with pytest.raises(GraphFileError, match=r"fc1\.weight.*\[3, 3\].*\[32, 16\]"):
        load(saved)
    tensors.pop("fc1.weight")
    save_file(tensors, str(tmp_path / "fewer.safetensors"))
    _replace_tensors(saved, (tmp_path / "fewer.safetensors").read_bytes())
    with pytest.raises(GraphFileError, match=r"missing \['fc1.weight'\]"):
        load(saved)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format_version="1"), r"format_version: expected int, found a string"),
    (lambda d: d.update(format_version=True), r"format_version: expected int, found a boolean"),
    (lambda d: d.update(surprise=1), r"unknown field\(s\) \['surprise'\]"),
    (lambda d: nodes(d)[RELU].update(evil=1), r"nodes\[6\]: unknown field\(s\) \['evil'\]"),
    (lambda d: nodes(d)[RELU].update(name=5), r"nodes\[6\].name: expected str, found a int"),
    (lambda d: nodes(d)[RELU].update(args="fc1_lora"), r"nodes\[6\].args: expected list"),
    (lambda d: nodes(d)[RELU].update(args=[{"pickle": "gASV"}]), r"unknown value tag 'pickle'"),
    (lambda d: nodes(d)[RELU].update(args=[{"node": "fc2"}]), r"refers to node 'fc2', which is not defined before it"),
    (lambda d: nodes(d)[RELU].update(op="exec"), r"unknown op 'exec'"),
    (lambda d: nodes(d)[RELU].update(meta={"val": 1}), r"unknown key 'val'"),
    (lambda d: nodes(d).pop(), r"end with exactly one 'output' node"),
    (lambda d: nodes(d).insert(1, {**nodes(d)[0], "name": "x_again"}),  # parts fx generates no valid code from
     r"torch.fx cannot generate code for this graph: SyntaxError: duplicate argument"),
    (lambda d: d["module"]["children"][FC1][1].update(class_=1), r"unknown field\(s\) \['class_'\]"),
    (lambda d: d["module"]["children"][FC1][1]["parameters"][0].__setitem__(1, 99), r"99 is not a tensor index"),
    (lambda d: d["module"]["children"][FC1][1]["args"].update(in_features=4), r"weight' is \[32, 16\] in the file"),
    (lambda d: d["module"]["children"][FC1][1].update(training="yes"), r"training: expected bool"),
    (lambda d: d["tensors"]["objects"][0].update(parameter=False), r"a parameter must be an nn.Parameter"),
    (lambda d: d["tensors"]["data"]["fc1.weight"].update(stride=[1, 1]), r"not a dense layout"),
    (lambda d: d.update(format_version=2), r"newer fxtune.*format version 2.*Upgrade fxtune"),
    (lambda d: d.update(format="pickle"), r"not an fxtune graph file"),
])
def test_wrong_types_and_unknown_fields_are_refused(saved, change, message):
    edit(saved, change)
    with pytest.raises(GraphFileError, match=message):
        load(saved)


def test_invalid_json_is_refused(saved):
    text = (saved / "graph.json").read_text()
    (saved / "graph.json").write_text(text[: len(text) // 2])
    with pytest.raises(GraphFileError, match="not valid JSON"):
        load(saved)
    (saved / "graph.json").write_text(text.replace('"format_version": 1', '"format_version": NaN'))
    with pytest.raises(GraphFileError, match="not valid JSON"):
        load(saved)


def test_module_type_not_allowed_is_refused(saved):
    edit(saved, lambda d: d["module"]["children"][FC1][1].update({"class": {"name": "collections.OrderedDict"}}))
    with pytest.raises(GraphFileError, match=r"module 'fc1'.*calls this collections.OrderedDict.*allow=\['collections.OrderedDict'\]"):
        load(saved)


IN_SPEC = {"type": "builtins.tuple", "context": None, "children": [
    {"type": "builtins.tuple", "context": None, "children": [{"leaf": True}]},
    {"type": "builtins.dict", "context": [], "children": []},
]}  # forward(x): ((x,), {})

EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")
def boom(*args):
    pathlib.Path({marker!r}).write_text("called")
class Layer:
    pass
"""

CHECK = """
import sys
sys.path.insert(0, {home!r})
import fxtune, fxtune.passes
from fxtune import load
from fxtune import GraphFileError
assert "evil_mod" not in sys.modules
results = []
for directory in {directories!r}:
    try:
        load(directory)
        results.append("loaded")
    except GraphFileError as exc:
        results.append("refused: " + str(exc)[:200])
print(repr(results))
print("evil_mod" in sys.modules)
"""


def test_refused_files_import_nothing(saved, tmp_path):
    """In a fresh interpreter: files naming a function, a module type, an output type, an enum context (which
    torch's own treespec loader would import) and an annotation from a module that writes a marker when
    imported. Nothing is imported; the annotation only names a type, so that file loads."""
    home = tmp_path / "home"
    home.mkdir()
    marker = tmp_path / "marker"
    (home / "evil_mod.py").write_text(EVIL.format(marker=str(marker)))
    cases = {
        "function": lambda d: nodes(d)[RELU].update(target={"name": "evil_mod.boom"}),
        "module": lambda d: d["module"]["children"][FC1][1].update({"class": {"name": "evil_mod.Layer"}}),
        "output": lambda d: d["module"]["graph"].update(codegen={
            "kind": "pytree", "orig_args": ["x"], "in_spec": IN_SPEC,
            "out_spec": {"type": "evil_mod.Out", "context": None, "children": []}}),
        "enum": lambda d: d["module"]["graph"].update(codegen={
            "kind": "pytree", "orig_args": ["x"], "in_spec": IN_SPEC, "out_spec": {
                "type": "builtins.dict", "context": {"dict": {"__enum__": True, "fqn": "evil_mod:Layer", "name": "A"}},
                "children": []}}),
        "annotation": lambda d: nodes(d)[0].update(type={"class": "evil_mod.Layer"}),
    }
    directories = []
    for name, change in cases.items():
        directory = tmp_path / name
        directory.mkdir()
        for file in ("graph.json", "tensors.safetensors"):
            (directory / file).write_bytes((saved / file).read_bytes())
        edit(directory, change)
        directories.append(str(directory))
    script = CHECK.format(home=str(home), directories=directories)
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert run.returncode == 0, run.stderr
    results_line, imported = run.stdout.strip().splitlines()[-2:]
    results = ast.literal_eval(results_line)
    assert [r.split(":")[0] for r in results[:4]] == ["refused"] * 4 and results[4] == "loaded", results
    assert "evil_mod.boom" in results[0] and "evil_mod.Layer" in results[1] and "evil_mod.Out" in results[2]
    assert imported == "False"
    assert not marker.exists()
