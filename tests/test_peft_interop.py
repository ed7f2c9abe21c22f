"""PEFT adapter directories in and out of fxtune, with PEFT itself as the oracle.

PEFT → fxtune: a PEFT model with non-zero random factors is saved by `save_pretrained` and
loaded by `fxtune.load_adapters`; the outputs must be PEFT's. fxtune → PEFT: `save_adapters(...,
format="peft")` is loaded by `peft.PeftModel.from_pretrained`; the outputs must be fxtune's, and
the factors inside PEFT must be the saved (non-zero) ones. Mismatches raise and change nothing.
"""

from __future__ import annotations

import copy
import json
import os
import pickle

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fxtune
import fxtune.passes  # noqa: F401  (registers the lora kind)
from core_helpers import assert_unchanged, lora_slots, randomize_lora, rel_err, snapshot, vision_model
from fxtune.passes import ia3, lora
from fxtune.io.peft_files import load_peft

TOL = 1e-5
pytestmark = [
    pytest.mark.filterwarnings("ignore::fxtune.FxtuneWarning"),  # small test layers: r near their size on purpose
    pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups:UserWarning"),
]


class Net(nn.Module):
    """Linear and Conv2d targets, a module path ending like another ('fc', 'proj.fc'), and layers
    PEFT's LoRA treats differently (dilated, grouped). Input (2, 3, 8, 8)."""

    def __init__(self, out: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(8)
        self.proj = nn.ModuleDict({"fc": nn.Linear(8, 16)})
        self.fc = nn.Linear(16, out)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = torch.relu(self.bn(self.grouped(torch.relu(self.dilated(h)))))
        return self.fc(torch.relu(self.proj["fc"](h.mean((2, 3)))))


def _net(out: int = 5) -> Net:
    torch.manual_seed(0)
    return Net(out).eval()


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _peft_dir(model: nn.Module, path, *, seed: int = 0, **config) -> peft.PeftModel:
    """PEFT on a copy of `model` with non-zero random A and B, saved by save_pretrained into `path`."""
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.eval()
    pm.save_pretrained(str(path))
    return pm


def _peft_layers(pm: peft.PeftModel) -> dict[str, nn.Module]:
    return {n: m for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def _edit_config(path, **changes) -> None:
    file = os.path.join(path, "adapter_config.json")
    with open(file) as f:
        config = json.load(f)
    config.update(changes)
    with open(file, "w") as f:
        json.dump(config, f)


def _assert_matches_peft(gm, pm, x, base) -> None:
    """Same outputs, and per layer the same factors and scale as inside PEFT."""
    with torch.no_grad():
        expected = pm(x)
        assert rel_err(base(x), expected) > 1e-3, "the adapter must change the output for the test to mean anything"
        assert rel_err(gm(x), expected) < TOL
    layers, slots = _peft_layers(pm), lora_slots(gm)
    assert set(layers) == set(slots)
    for path, layer in layers.items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert b.abs().sum() > 0
        assert torch.equal(slots[path].lora_a, a) and torch.equal(slots[path].lora_b, b), path
        assert slots[path].config["scale"] == pytest.approx(layer.scaling["default"], rel=1e-12)
        dropout = layer.lora_dropout["default"]
        assert getattr(getattr(slots[path], "dropout", None), "p", 0.0) == getattr(dropout, "p", 0.0)


# ----------------------------------------------------------------------------- PEFT -> fxtune

PEFT_CONFIGS = {
    "suffix-list": dict(target_modules=["conv", "fc"], r=4, lora_alpha=8),  # 'fc' also selects proj.fc
    "regex-rslora-patterns": dict(
        target_modules=r"conv|proj\.fc", r=4, lora_alpha=6, use_rslora=True,
        rank_pattern={r"proj\.fc": 2}, alpha_pattern={"^conv": 3},
    ),
    "pattern-order": dict(target_modules=["conv", "fc"], r=4, lora_alpha=4, rank_pattern={"fc": 3, r"proj\.fc": 2}),
    "all-linear-exclude": dict(target_modules="all-linear", exclude_modules=["proj.fc"], r=3, lora_alpha=5),
    "exclude-suffix": dict(target_modules=["conv", "proj.fc"], exclude_modules=["fc"], r=2, lora_alpha=4),  # conv only
    "exclude-regex-dropout": dict(target_modules=["conv", "fc"], exclude_modules=r"fc", r=2, lora_alpha=2, lora_dropout=0.1),
}


@pytest.mark.parametrize("case", list(PEFT_CONFIGS))
def test_peft_to_fxtune(case, tmp_path):
    base, x = _net(), _x()
    pm = _peft_dir(base, tmp_path, **PEFT_CONFIGS[case])
    gm = fxtune.trace(base)
    snap = snapshot(gm)
    loaded = fxtune.load_adapters(gm, str(tmp_path))
    assert_unchanged(gm, snap)
    _assert_matches_peft(loaded.eval(), pm, x, base)


def test_peft_dir_loads_in_peft_form_unless_asked(tmp_path):
    base, x = _net(), _x()
    pm = _peft_dir(base, tmp_path, target_modules=["conv", "fc"], r=4)
    assert {s.form for s in lora_slots(fxtune.load_adapters(fxtune.trace(base), str(tmp_path))).values()} == {"activation"}
    weight = load_peft(fxtune.trace(base), str(tmp_path), form="weight").eval()
    assert {s.form for s in lora_slots(weight).values()} == {"weight"}
    with torch.no_grad():
        assert rel_err(weight(x), pm(x)) < TOL


def test_peft_pattern_order_is_peft_first_match(tmp_path):
    """{'fc': 3, 'proj\\.fc': 2}: 'fc' also hits proj.fc and comes first, so PEFT gives it r=3."""
    pm = _peft_dir(_net(), tmp_path, **PEFT_CONFIGS["pattern-order"])
    assert _peft_layers(pm)["proj.fc"].r["default"] == 3
    assert lora_slots(fxtune.load_adapters(fxtune.trace(_net()), str(tmp_path)))["proj.fc"].config["r"] == 3


def test_peft_load_never_unpickles(tmp_path, monkeypatch):
    _peft_dir(_net(), tmp_path, target_modules=["conv"], r=2)

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for mod, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(mod, name, refuse)
    assert "conv" in lora_slots(fxtune.load_adapters(fxtune.trace(_net()), str(tmp_path)))


# ----------------------------------------------------------------------------- fxtune -> PEFT


def _fx_lora(base, **options):
    gm = lora(fxtune.trace(base), **options)
    randomize_lora(gm, std=0.2, seed=3)
    return gm.eval()


FX_CASES = {
    "mixed-r-alpha": dict(targets=["conv", "fc"], r={"fc": 2}, alpha={"conv": 3}),  # 'fc' but not 'proj.fc'
    "rslora": dict(targets=["conv", "proj.fc", "fc"], r={"fc": 6}, alpha=5, rslora=True),  # rank_pattern '^fc'
    "dropout": dict(targets=["conv", "proj.fc"], r=3, dropout=0.2),
    "weight-form": dict(targets=["conv", "proj.fc", "fc"], r=2, form="weight"),
}


@pytest.mark.parametrize("case", list(FX_CASES))
def test_fxtune_to_peft_and_back(case, tmp_path):
    base, x = _net(), _x()
    gm = _fx_lora(base, **FX_CASES[case])
    snap = snapshot(gm)
    fxtune.save_adapters(gm, str(tmp_path), format="peft")
    assert_unchanged(gm, snap)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]

    config = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert config.peft_type == peft.PeftType.LORA and config.bias == "none" and config.init_lora_weights is True
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    targets = set(FX_CASES[case]["targets"])
    assert set(_peft_layers(pm)) == targets  # exactly the adapted modules, no suffix look-alikes
    _assert_matches_peft(gm, pm, x, base)

    again = fxtune.load_adapters(fxtune.trace(base), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(again(x), gm(x))
    assert {p: s.form for p, s in lora_slots(again).items()} == {p: s.form for p, s in lora_slots(gm).items()}


def test_saved_keys_are_peft_layout(tmp_path):
    gm = _fx_lora(_net(), targets=["conv", "fc"], r=2)
    fxtune.save_adapters(gm, str(tmp_path), format="peft")
    keys = set(load_file(os.path.join(tmp_path, "adapter_model.safetensors")))
    assert keys == {f"base_model.model.{m}.lora_{f}.weight" for m in ("conv", "fc") for f in "AB"}


def test_pissa_exports_as_exact_rank_2r_lora(tmp_path):
    base, x = _net(), _x()
    gm = lora(fxtune.trace(base), ["conv", "proj.fc", "fc"], r=2, alpha=3, init="pissa")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for slot in lora_slots(gm).values():  # "training": move the factors away from their start
            for t in (slot.lora_a, slot.lora_b):
                t.add_(torch.randn(t.shape, generator=g) * 0.1)
    gm.eval()
    fxtune.save_adapters(gm, str(tmp_path), format="peft")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert {layer.r["default"] for layer in _peft_layers(pm).values()} == {4}
    with torch.no_grad():
        assert rel_err(base(x), pm(x)) > 1e-3
        assert rel_err(gm(x), pm(x)) < TOL


# ----------------------------------------------------------------------------- resnet18


def _resnet_targets(model) -> list[str]:
    return [n for n, m in model.named_modules() if n.startswith("layer4") and isinstance(m, nn.Conv2d)] + ["fc"]


def test_resnet18_peft_to_fxtune(tmp_path):
    base = vision_model("resnet18")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    pm = _peft_dir(base, tmp_path, target_modules=r"layer4\..*(conv\d|downsample\.0)|fc", r=4, lora_alpha=8,
                   use_rslora=True, rank_pattern={"fc": 8, r"layer4\.1\.conv2": 2}, alpha_pattern={r"downsample\.0": 3})
    with torch.no_grad():  # keep resnet's activations moderate so the comparison is meaningful
        for layer in _peft_layers(pm).values():
            layer.lora_B["default"].weight.mul_(0.05)
    pm.save_pretrained(str(tmp_path))
    gm = fxtune.load_adapters(fxtune.trace(base), str(tmp_path)).eval()
    assert set(lora_slots(gm)) == set(_resnet_targets(base))
    _assert_matches_peft(gm, pm, x, base)


def test_resnet18_fxtune_to_peft(tmp_path):
    base = vision_model("resnet18")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    gm = lora(fxtune.trace(base), _resnet_targets(base), r={"fc": 8, "layer4.0.*": 2}, alpha={"layer4.1.*": 12}, rslora=True)
    randomize_lora(gm, std=0.02, seed=4)
    gm.eval()
    fxtune.save_adapters(gm, str(tmp_path), format="peft")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    _assert_matches_peft(gm, pm, x, base)
    again = fxtune.load_adapters(fxtune.trace(base), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(again(x), gm(x))


# ----------------------------------------------------------------------------- mismatches


def _refused(gm, path, *needles):
    snap = snapshot(gm)
    with pytest.raises(fxtune.AdapterError) as err:
        fxtune.load_adapters(gm, str(path))
    assert_unchanged(gm, snap)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "changes,needles",
    [
        (dict(target_modules=["conv", "fc", "bn"]), ["'bn'", "not an fxtune call site"]),
        (dict(target_modules=["conv"]), ["'fc'", "'proj.fc'", "does not select"]),
        (dict(rank_pattern={"^conv": 3}), ["'conv'", "r=3"]),
        (dict(target_modules="conv|fc(["), ["regular expression"]),
        (dict(use_dora=True), ["DoRA"]),
        (dict(bias="all"), ["bias='all'"]),
        (dict(modules_to_save=["bn"]), ["modules_to_save"]),
        (dict(layers_to_transform=[0]), ["layers_to_transform"]),
        (dict(init_lora_weights="pissa"), ["init_lora_weights='pissa'"]),
        (dict(some_future_option={"on": 1}), ["some_future_option"]),
        (dict(peft_type="IA3"), ["'IA3'"]),
    ],
)
def test_config_mismatch_refused(changes, needles, tmp_path):
    _peft_dir(_net(), tmp_path, target_modules=["conv", "fc"], r=4)
    _edit_config(tmp_path, **changes)
    _refused(fxtune.trace(_net()), tmp_path, *needles)


def test_shape_mismatch_refused(tmp_path):
    _peft_dir(_net(), tmp_path, target_modules=["conv", "fc"], r=4)
    _refused(fxtune.trace(_net(out=6)), tmp_path, "'fc'", "[6, 4]")


def test_missing_and_stray_tensors_refused(tmp_path):
    _peft_dir(_net(), tmp_path, target_modules=["conv", "fc"], r=4)
    file = os.path.join(tmp_path, "adapter_model.safetensors")
    tensors = load_file(file)
    del tensors["base_model.model.conv.lora_B.weight"]
    tensors["base_model.model.fc.lora_magnitude_vector"] = torch.ones(5)
    save_file(tensors, file)
    _refused(fxtune.trace(_net()), tmp_path, "'conv'", "no lora_B", "lora_magnitude_vector")


@pytest.mark.parametrize("target,needle", [("dilated", "dilation"), ("grouped", "grouped conv")])
def test_conv_peft_computes_differently_refused(target, needle, tmp_path):
    _peft_dir(_net(), tmp_path, target_modules=[target], r=4)
    _refused(fxtune.trace(_net()), tmp_path, f"'{target}'", needle)


def test_real_dora_and_ia3_dirs_refused(tmp_path):
    _peft_dir(_net(), tmp_path / "dora", target_modules=["fc"], r=2, use_dora=True)
    _refused(fxtune.trace(_net()), tmp_path / "dora", "DoRA")
    peft.get_peft_model(copy.deepcopy(_net()), peft.IA3Config(target_modules=["fc"], feedforward_modules=[])).save_pretrained(
        str(tmp_path / "ia3")
    )
    _refused(fxtune.trace(_net()), tmp_path / "ia3", "'IA3'")


def test_pickle_only_dir_refused(tmp_path):
    _peft_dir(_net(), tmp_path, target_modules=["fc"], r=2)
    os.remove(os.path.join(tmp_path, "adapter_model.safetensors"))
    with open(os.path.join(tmp_path, "adapter_model.bin"), "wb") as f:
        f.write(b"not to be opened")
    _refused(fxtune.trace(_net()), tmp_path, "adapter_model.bin", "never loads")


def test_both_formats_in_one_dir_refused(tmp_path):
    gm = _fx_lora(_net(), targets=["fc"], r=2)
    fxtune.save_adapters(gm, str(tmp_path / "peft"), format="peft")
    fxtune.save_adapters(gm, str(tmp_path / "fx"))
    os.replace(tmp_path / "fx" / "adapters.json", tmp_path / "peft" / "adapters.json")  # mixed by hand
    _refused(fxtune.trace(_net()), tmp_path / "peft", "adapters.json", "adapter_config.json")


@pytest.mark.parametrize("first,second", [("peft", "fxtune"), ("fxtune", "peft")])
def test_saving_into_another_formats_dir_is_refused_unless_overwrite(first, second, tmp_path):
    """Before, the second save wrote its files beside the first's: a directory load_adapters refuses."""
    base, x = _net(), _x()
    gm = _fx_lora(base, targets=["fc"], r=2)
    fxtune.save_adapters(gm, str(tmp_path), format=first)
    before = {name: os.path.getmtime(tmp_path / name) for name in os.listdir(tmp_path)}
    with pytest.raises(fxtune.AdapterError, match="already holds .*overwrite=True"):
        fxtune.save_adapters(gm, str(tmp_path), format=second)
    assert {name: os.path.getmtime(tmp_path / name) for name in os.listdir(tmp_path)} == before
    fxtune.save_adapters(gm, str(tmp_path), format=second, overwrite=True)
    assert len(os.listdir(tmp_path)) == 2 and not set(os.listdir(tmp_path)) & set(before)
    with torch.no_grad():
        assert torch.equal(fxtune.load_adapters(fxtune.trace(base), str(tmp_path)).eval()(x), gm(x))


def test_lora_kind_must_be_registered(tmp_path, monkeypatch):
    _peft_dir(_net(), tmp_path, target_modules=["fc"], r=2)
    monkeypatch.delitem(fxtune.adapter.kinds._REGISTRY, "lora")
    _refused(fxtune.trace(_net()), tmp_path, "import fxtune.passes")


def _save_refused(gm, path, *needles):
    snap = snapshot(gm)
    with pytest.raises(fxtune.AdapterError) as err:
        fxtune.save_adapters(gm, str(path), format="peft")
    assert_unchanged(gm, snap)
    assert not os.path.exists(path)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_save_refusals(tmp_path):
    base = _net()
    _save_refused(ia3(fxtune.trace(base), ["fc"]), tmp_path / "a", "'fc'", "ia3")
    _save_refused(lora(fxtune.trace(base), ["conv", "dilated"], r=2), tmp_path / "b", "'dilated'", "dilation")
    _save_refused(lora(fxtune.trace(base), ["grouped"], r=2), tmp_path / "c", "'grouped'", "grouped conv")
    _save_refused(lora(fxtune.trace(base), ["conv", "fc"], r=2, dropout={"fc": 0.1}), tmp_path / "d", "dropout differs")
    _save_refused(lora(fxtune.trace(base), ["conv", "fc"], rslora={"fc": True}), tmp_path / "e", "rslora differs")
    _save_refused(lora(fxtune.trace(base), ["fc"], adapter="other"), tmp_path / "f", "no adapter named 'default'")
