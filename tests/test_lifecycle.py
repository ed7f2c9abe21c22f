"""Named adapters, set_active, merge/unmerge, unload, delete, adapter files and swap_base, for every kind.

References: the base model itself (bit-exact), and float64 compositions of the LoRA formula
written out here; exactness claims (unmerge, unload, reload) are checked with torch.equal.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import fxtune
from fxtune.passes import fuse, ia3, lora, slice_delta, sp_lopa, sp_lora, sp_para, svdiff




class Net(nn.Module):
    """Linear, Conv2d and grouped Conv2d with dimensions divisible by 4 (for SPLoPA blocks)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.grouped(torch.relu(self.conv(x)))).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(h)))


def net(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


X = torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(5))

KINDS = {
    "lora": functools.partial(lora, r=2),
    "lora_weight_form": functools.partial(lora, r=2, form="weight"),
    "lora_pissa": functools.partial(lora, r=2, init="pissa"),
    "ia3_output": ia3,
    "ia3_input": functools.partial(ia3, position="input"),
    "slice_delta": functools.partial(slice_delta, size=0.3),
    "slice_delta_mul": functools.partial(slice_delta, size=0.3, op="mul"),
    "svdiff": svdiff,
    "sp_lora": functools.partial(
        sp_lora, r=2, masks={"fc1": {"out_mask": torch.tensor([True, False] * 8)}}
    ),
    "sp_para": functools.partial(sp_para, targets=["grouped", "fc1", "fc2"]),
    "sp_lopa": functools.partial(sp_lopa, targets=["fc1", "fc2"], r=1, num_prototypes=2, block=(4, 4)),
    "train_module": lambda gm, adapter="default": fxtune.train_module(gm, "fc2", adapter=adapter),
}


def randomize(gm, seed=0):
    """Non-trivial adapter values (a no-op adapter would make every check below vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fxtune.trainable_parameters(gm):
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return gm


def adapted(kind, model, adapter="default", seed=0):
    return randomize(KINDS[kind](fxtune.trace(model), adapter=adapter), seed)


def snapshot(gm):
    return gm.code, {k: v.clone() for k, v in gm.state_dict().items()}


def assert_same(gm, snap):
    code, state = snap
    assert gm.code == code
    assert set(gm.state_dict()) == set(state)
    assert all(torch.equal(v, state[k]) for k, v in gm.state_dict().items())


@pytest.mark.parametrize("kind", KINDS)
def test_merge_unmerge_unload_are_exact(kind):
    model = net()
    base_out = model(X)
    gm = adapted(kind, model)
    out = gm(X)
    assert not torch.allclose(out, base_out), "the adapter must change the output for this test to mean anything"
    snap = snapshot(gm)
    merged = fxtune.merge(gm)
    assert_same(gm, snap)
    torch.testing.assert_close(merged(X), out, rtol=1e-5, atol=1e-6)
    assert all(a.merged for a in fxtune.adapters(merged))
    assert not any(p.requires_grad for p in merged.parameters())
    unmerged = fxtune.unmerge(merged)
    assert unmerged.code == gm.code
    for key, value in gm.state_dict().items():
        assert torch.equal(unmerged.state_dict()[key], value), key
    assert torch.equal(unmerged(X), out)
    unloaded = fxtune.unload(gm)
    assert unloaded.code == fxtune.trace(model).code
    assert torch.equal(unloaded(X), base_out)
    assert set(unloaded.state_dict()) == set(model.state_dict())


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_is_bit_identical(kind, tmp_path):
    model = net()
    gm = adapted(kind, model, adapter="task")
    fxtune.save_adapters(gm, tmp_path, adapter="task")
    fresh = fxtune.trace(net())
    snap = snapshot(fresh)
    loaded = fxtune.load_adapters(fresh, tmp_path)
    assert_same(fresh, snap)
    assert loaded.code == gm.code
    assert torch.equal(loaded(X), gm(X))
    assert [(a.name, a.kind, a.sites, a.parameters) for a in fxtune.adapters(loaded)] == [
        (a.name, a.kind, a.sites, a.parameters) for a in fxtune.adapters(gm)
    ]
    assert torch.equal(fuse(loaded)(X), fuse(gm)(X))


def test_adapter_file_holds_only_adapter_state(tmp_path):
    from safetensors.torch import load_file

    gm = adapted("svdiff", net())
    fxtune.save_adapters(gm, tmp_path)
    keys = set(load_file(tmp_path / "adapters.safetensors"))
    assert keys == {f"{t}.delta" for t in ("conv", "grouped", "fc1", "fc2")}
    masked = adapted("sp_lora", net())
    fxtune.save_adapters(masked, tmp_path / "sp")
    stored = load_file(tmp_path / "sp" / "adapters.safetensors")
    slot = masked.get_submodule("fxtune.default.fc1")
    assert stored["fc1.sp_lora_c"].numel() == int(torch.broadcast_to(slot.sp_lora_c_mask, slot.sp_lora_c.shape).sum())


def _mismatch_cases(tmp_path):
    gm = adapted("lora", net())
    fxtune.save_adapters(gm, tmp_path)

    class Wider(Net):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(8, 12)
            self.fc2 = nn.Linear(12, 4)

    class Fewer(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    return {"shape": Wider(), "missing site": Fewer()}


@pytest.mark.parametrize("case", ["shape", "missing site"])
def test_load_mismatch_raises_and_changes_nothing(case, tmp_path):
    target = fxtune.trace(_mismatch_cases(tmp_path)[case])
    snap = snapshot(target)
    with pytest.raises(fxtune.AdapterError) as err:
        fxtune.load_adapters(target, tmp_path)
    assert "fc1" in str(err.value)
    assert_same(target, snap)


def test_load_unknown_kind_and_bad_directory(tmp_path):
    import json

    gm = adapted("lora", net())
    fxtune.save_adapters(gm, tmp_path)
    meta = json.loads((tmp_path / "adapters.json").read_text())
    meta["slots"][0]["kind"] = "nonexistent"
    (tmp_path / "adapters.json").write_text(json.dumps(meta))
    target = fxtune.trace(net())
    with pytest.raises(fxtune.AdapterError, match="nonexistent"):
        fxtune.load_adapters(target, tmp_path)
    with pytest.raises(fxtune.AdapterError, match="not an fxtune adapter directory"):
        fxtune.load_adapters(target, tmp_path / "nowhere")


def lora_reference(model, slots_in_order):
    """float64 eager model whose weights are W + s·B@A applied in order."""
    import copy

    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        for slot in slots_in_order:
            module = ref.get_submodule(slot.target)
            delta = slot.lora_b.double().flatten(1) @ slot.lora_a.double().flatten(1)
            module.weight += slot.config["scale"] * delta.view(module.weight.shape)
    return ref


def test_two_adapters_switch_and_compose():
    model = net()
    gm = lora(fxtune.trace(model), r=2, adapter="a")
    gm = randomize(lora(gm, targets=["fc1", "conv"], r={"conv": 3}, alpha=lambda s: 6.0, adapter="b"), seed=1)
    slots = {(s.adapter, s.target): s for s in fxtune.adapter.slots.all_slots(gm)}
    assert slots["b", "conv"].config["r"] == 3 and slots["b", "fc1"].config["r"] == 8
    assert slots["b", "conv"].config["scale"] == 2.0
    a = [s for (name, _), s in slots.items() if name == "a"]
    b = [s for (name, _), s in slots.items() if name == "b"]
    x = X.double()
    for names, expected in [("a", a), (["b"], b), (["a", "b"], a + b)]:
        out = fxtune.set_active(gm, names)(X)
        torch.testing.assert_close(out.double(), lora_reference(model, expected)(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(fxtune.set_active(gm, [])(X), model(X))
    assert [(i.name, i.active) for i in fxtune.adapters(fxtune.set_active(gm, "b"))] == [("a", False), ("b", True)]
    only_a = fxtune.delete_adapter(gm, "b")
    assert [i.name for i in fxtune.adapters(only_a)] == ["a"]
    assert torch.equal(only_a(X), fxtune.set_active(gm, "a")(X))
    assert "a" in str(fxtune.adapters(gm)) and "merged" in str(fxtune.adapters(gm))


def test_merge_order_and_merged_state_rules():
    gm = randomize(lora(randomize(ia3(fxtune.trace(net()), adapter="first")), r=2, adapter="second"), seed=2)
    with pytest.raises(fxtune.AdapterError, match="acts before"):
        fxtune.merge(gm, "second")
    partly = fxtune.merge(gm, "first")
    torch.testing.assert_close(partly(X), gm(X), rtol=1e-5, atol=1e-6)
    assert [(i.name, i.merged) for i in fxtune.adapters(partly)] == [("first", True), ("second", False)]
    with pytest.raises(fxtune.AdapterError, match="unmerge"):
        fxtune.set_active(partly, "second")
    with pytest.raises(fxtune.AdapterError, match="unmerge"):
        fxtune.delete_adapter(partly, "first")
    with pytest.raises(fxtune.FusionError, match="merged"):
        fuse(partly, adapters="second")
    torch.testing.assert_close(fuse(partly)(X), gm(X), rtol=1e-5, atol=1e-6)
    with pytest.raises(fxtune.AdapterError, match="no adapter named"):
        fxtune.set_active(gm, "third")


def test_pissa_switched_off_or_unloaded_gives_the_traced_weights():
    model = net()
    gm = lora(fxtune.trace(model), r=2, init="pissa")
    assert not torch.equal(gm.fc1.weight, model.fc1.weight)
    base = fxtune.set_active(gm, [])
    assert torch.equal(base.fc1.weight, model.fc1.weight) and torch.equal(base(X), model(X))
    assert torch.equal(fxtune.set_active(base, "default")(X), gm(X))
    assert torch.equal(fxtune.unload(gm)(X), model(X))
    dropped = fuse(fxtune.set_active(gm, []))
    assert torch.equal(dropped.fc1.weight, model.fc1.weight)


def test_swap_base_reuses_adapter_tensors_on_another_model():
    gm = adapted("lora", net(0), adapter="a")
    gm = randomize(ia3(gm, targets="fc*", adapter="b"), seed=3)
    other = net(1)
    moved = fxtune.swap_base(gm, other)
    expected = ia3(lora(fxtune.trace(other), r=2, adapter="a"), targets="fc*", adapter="b")
    adapter_state = {k: v for k, v in gm.state_dict().items() if k.startswith("fxtune.")}
    expected.load_state_dict({**expected.state_dict(), **adapter_state})
    assert torch.equal(moved(X), expected(X))
    assert not torch.equal(moved(X), gm(X))
    with pytest.raises(fxtune.AdapterError, match="fc1"):
        fxtune.swap_base(gm, _mismatch_cases_model())


def _mismatch_cases_model():
    model = Net()
    model.fc1, model.fc2 = nn.Linear(8, 12), nn.Linear(12, 4)
    return model


def test_train_module_trains_a_copy_and_swaps_it_in_at_fuse():
    model = net()
    gm = fxtune.train_module(lora(fxtune.trace(model), targets="fc1", r=2), "fc2")
    assert {a.kind for a in fxtune.adapters(gm)} == {"lora+train_module"}
    before = model.fc2.weight.clone()
    opt = torch.optim.SGD(fxtune.trainable_parameters(gm), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        gm(X).pow(2).sum().backward()
        opt.step()
    copy = gm.get_submodule("fxtune.default.fc2")
    assert not torch.equal(copy.weight_copy, before) and torch.equal(model.fc2.weight, before)
    expected = torch.relu(lora_reference(model, [gm.get_submodule("fxtune.default.fc1")]).fc1(
        torch.relu(model.grouped(torch.relu(model.conv(X)))).mean((2, 3)).double()))
    expected = expected @ copy.weight_copy.double().T + copy.bias_copy.double()
    torch.testing.assert_close(gm(X).double(), expected, rtol=1e-5, atol=1e-6)
    fused = fuse(gm)
    assert fused.code == fxtune.trace(model).code
    assert torch.equal(fused.fc2.weight, copy.weight_copy)
