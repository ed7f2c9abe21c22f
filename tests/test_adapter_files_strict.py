"""Adapter files are strict: a file that says one thing and holds another is refused, naming what.

Each case was found loading silently or failing with an internal error (issue 11): a hand-edited
adapters.json (r, alpha, extra keys), a bfloat16 file on a float32 model (the first forward
crashed), missing or damaged files (raw FileNotFoundError / SafetensorError without the path).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fxtune
from core_helpers import assert_unchanged, lora_slots, randomize_lora, rel_err, snapshot
from fxtune.passes import dora, lora

pytestmark = pytest.mark.filterwarnings("ignore::fxtune.FxtuneWarning")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _net(dtype=torch.float32) -> Net:
    torch.manual_seed(0)
    return Net().to(dtype).eval()


X = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))


def _saved(path, dtype=torch.float32, **options):
    gm = lora(fxtune.trace(_net(dtype)), r=4, alpha=8, **options)
    randomize_lora(gm, std=0.3, seed=2)
    fxtune.save_adapters(gm, str(path))
    return gm.eval()


def _edit_json(path, edit) -> None:
    file = os.path.join(path, "adapters.json")
    with open(file) as f:
        meta = json.load(f)
    edit(meta)
    with open(file, "w") as f:
        json.dump(meta, f)


def _refused(path, *needles, model=None):
    gm = fxtune.trace(model or _net())
    snap = snapshot(gm)
    with pytest.raises(fxtune.AdapterError) as err:
        fxtune.load_adapters(gm, str(path))
    assert_unchanged(gm, snap)
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    return str(err.value)


# ----------------------------------------------------------------------------- hand-edited JSON


@pytest.mark.parametrize(
    "key,value,needles",
    [
        ("r", 2, ["'fc1'", "setting 'r' is 2", "but 4 was saved"]),
        ("alpha", 16, ["setting 'alpha' is 16", "but 8 was saved"]),
        ("scale", 5.0, ["setting 'scale'"]),
        ("extra", 1, ["setting 'extra'"]),
    ],
)
def test_edited_settings_are_refused_by_name(key, value, needles, tmp_path):
    """Before: an edited alpha loaded, and a PEFT re-export then computed another output than fxtune."""
    _saved(tmp_path)

    def edit(meta):
        meta["slots"][0]["config"][key] = value

    _edit_json(tmp_path, edit)
    _refused(tmp_path, *needles, "edited after saving")


def _drop_saved_settings(path) -> None:
    """Rewrites adapters.safetensors without fxtune's copy of the settings (as a file from elsewhere)."""
    file = os.path.join(path, "adapters.safetensors")
    save_file(load_file(file), file, metadata={"format": "fxtune.adapter"})


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("r", 2, "r=2, but lora_a [4, 6] and lora_b [8, 4] have rank 4"),
        ("alpha", 16, "scale=2.0, but alpha=16, r=4, rslora=False give 4.0"),
        ("extra", 1, "unknown setting 'extra'"),
    ],
)
def test_settings_the_tensors_imply_are_checked_against_them(key, value, needle, tmp_path):
    """Without the saved copy, the kind's own check still ties r to the factors and scale to alpha/r."""
    _saved(tmp_path)
    _drop_saved_settings(tmp_path)

    def edit(meta):
        meta["slots"][0]["config"][key] = value

    _edit_json(tmp_path, edit)
    _refused(tmp_path, "'fc1'", needle)


@pytest.mark.parametrize(
    "edit,needles",
    [
        (lambda m: m.update(note="hi"), ["unknown key 'note'"]),
        (lambda m: m.pop("adapter"), ["missing key 'adapter'"]),
        (lambda m: m["slots"][0].update(extra=1), ["slot 0 ('fc1')", "unknown key 'extra'"]),
        (lambda m: m["slots"][1].pop("form"), ["slot 1 ('fc2')", "missing key 'form'"]),
        (lambda m: m["slots"][0]["tensors"]["lora_a"].update(bits=8), ["tensor 'lora_a'", "unknown key 'bits'"]),
        (lambda m: m["slots"][0]["tensors"]["lora_b"].pop("dtype"), ["tensor 'lora_b'", "missing key 'dtype'"]),
        (lambda m: m["slots"][0].update(form="sideways"), ["form 'sideways'"]),
        (lambda m: m["slots"][0]["tensors"]["lora_a"].update(dtype="float33"), ["dtype 'float33' is no torch dtype"]),
        (lambda m: m["slots"][0].update(weight_shape="8x6"), ["'weight_shape' is '8x6'", "not a list"]),
        (lambda m: m.update(format_version=2), ["v2"]),
    ],
)
def test_adapters_json_follows_its_schema(edit, needles, tmp_path):
    _saved(tmp_path)
    _edit_json(tmp_path, edit)
    _refused(tmp_path, *needles)


def test_tensors_must_be_what_the_json_says(tmp_path):
    _saved(tmp_path)
    file = os.path.join(tmp_path, "adapters.safetensors")
    tensors = load_file(file)
    tensors["fc1.lora_b"] = tensors["fc1.lora_b"].double()
    tensors["fc9.lora_a"] = torch.zeros(2)
    save_file(tensors, file)
    _refused(tmp_path, "'fc1': tensor 'lora_b' is float64 in adapters.safetensors, float32 in adapters.json",
             "tensor 'fc9.lora_a' in adapters.safetensors belongs to no slot")


# ----------------------------------------------------------------------------- dtypes


def test_a_bfloat16_file_loads_onto_a_float32_model_in_float32(tmp_path):
    """Before: the adapter stayed bfloat16 on a float32 model and the first forward crashed."""
    saved = _saved(tmp_path, dtype=torch.bfloat16)
    model = _net()
    loaded = fxtune.load_adapters(fxtune.trace(model), str(tmp_path)).eval()
    slots, before = lora_slots(loaded), lora_slots(saved)
    for name, slot in slots.items():
        assert slot.lora_a.dtype == slot.lora_b.dtype == torch.float32
        assert torch.equal(slot.lora_a, before[name].lora_a.float()) and torch.equal(slot.lora_b, before[name].lora_b.float())
    ref = {k: v.double() for k, v in model.state_dict().items()}
    for name, slot in slots.items():  # W + (alpha/r)·B@A in float64, from the file's (bfloat16) values
        ref[f"{name}.weight"] += 2.0 * before[name].lora_b.double() @ before[name].lora_a.double()
    h = torch.relu(X.double() @ ref["fc1.weight"].T + ref["fc1.bias"])
    expected = h @ ref["fc2.weight"].T + ref["fc2.bias"]
    with torch.no_grad():
        assert rel_err(loaded(X).double(), expected) < 1e-5


def test_values_the_weight_dtype_cannot_hold_are_refused(tmp_path):
    gm = lora(fxtune.trace(_net()), r=4)
    with torch.no_grad():
        lora_slots(gm)["fc2"].lora_b.fill_(1e6)
    fxtune.save_adapters(gm, str(tmp_path))
    _refused(tmp_path, "'fc2'", "tensor 'lora_b' (float32)", "float16", "cannot hold", model=_net(torch.float16))


# ----------------------------------------------------------------------------- unreadable files


def test_missing_and_damaged_files_are_adapter_errors_naming_the_path(tmp_path):
    """Before: a raw FileNotFoundError / SafetensorError / JSONDecodeError without the file's path."""
    _saved(tmp_path / "a")
    tensors = os.path.join(tmp_path, "a", "adapters.safetensors")
    os.remove(tensors)
    _refused(tmp_path / "a", tensors, "does not exist")

    _saved(tmp_path / "b")
    tensors = os.path.join(tmp_path, "b", "adapters.safetensors")
    with open(tensors, "r+b") as f:
        f.truncate(os.path.getsize(tensors) // 2)
    _refused(tmp_path / "b", tensors, "damaged or truncated")

    _saved(tmp_path / "c")
    meta = os.path.join(tmp_path, "c", "adapters.json")
    with open(meta, "w") as f:
        f.write('{"format": "fxtune.adapter", ')
    _refused(tmp_path / "c", meta, "cannot read")


def test_damaged_peft_files_are_adapter_errors_naming_the_path(tmp_path):
    gm = lora(fxtune.trace(_net()), r=2)
    fxtune.save_adapters(gm, str(tmp_path / "a"), format="peft")
    weights = os.path.join(tmp_path, "a", "adapter_model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(100)
    _refused(tmp_path / "a", weights, "damaged or truncated")

    fxtune.save_adapters(gm, str(tmp_path / "b"), format="peft")
    os.remove(os.path.join(tmp_path, "b", "adapter_model.safetensors"))
    _refused(tmp_path / "b", "adapter_model.safetensors", "does not exist")

    fxtune.save_adapters(gm, str(tmp_path / "c"), format="peft")
    config = os.path.join(tmp_path, "c", "adapter_config.json")
    with open(config, "w") as f:
        f.write("[1, 2")
    _refused(tmp_path / "c", config, "cannot read")


def test_saving_onto_a_file_path_is_refused(tmp_path):
    file = tmp_path / "taken"
    file.write_text("mine")
    with pytest.raises(fxtune.AdapterError, match="is a file"):
        fxtune.save_adapters(lora(fxtune.trace(_net()), r=2), str(file))
    assert file.read_text() == "mine"


def test_a_dora_file_whose_rank_disagrees_with_its_factors_is_refused(tmp_path):
    """Any kind can declare its settings check (AdapterKind.check), not only kinds with a PEFT mapping."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    fxtune.save_adapters(dora(fxtune.trace(model), r=2), tmp_path)
    meta = json.loads((tmp_path / "adapters.json").read_text())
    meta["slots"][0]["config"]["r"] = 3
    (tmp_path / "adapters.json").write_text(json.dumps(meta))
    with pytest.raises(fxtune.AdapterError, match=r"r=3, but lora_a \[2, 6\] has rank 2"):
        fxtune.load_adapters(fxtune.trace(model), tmp_path)
