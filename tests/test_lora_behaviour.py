"""LoRA behaviour: initialisations, dropout, training, trainable parameters, form="auto"."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxtune
from core_helpers import (
    MLP,
    assert_unchanged,
    count_lora_params,
    lora_delta64,
    lora_reference,
    lora_slots,
    randomize_lora,
    rel_err,
    small_net,
    snapshot,
    vision_model,
)
from fxtune.passes import fuse, lora
from fxtune.passes.lora import activation_is_cheaper

FORMS = ["weight", "activation"]


def _x_small():
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))


# ----------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("init", ["default", "gaussian"])
@pytest.mark.parametrize("form", FORMS)
def test_zero_b_inits_leave_output_exactly_unchanged(init, form):
    model = small_net()
    x = _x_small()
    gm = lora(fxtune.trace(model), r=2, init=init, form=form)
    for slot in lora_slots(gm).values():
        assert torch.count_nonzero(slot.lora_b) == 0
        assert torch.count_nonzero(slot.lora_a) > 0
    # torch picks F.linear's kernel for 3-D inputs by the weight's requires_grad (bitwise
    # different results); gm's base weights are frozen, so compare with a frozen copy
    frozen = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        assert torch.equal(gm(x), frozen(x))


def test_gaussian_init_a_statistics():
    """gaussian: A ~ N(0, 1/r²) (std 1/r), B = 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512))
    r = 8
    gm = lora(fxtune.trace(model), r=r, init="gaussian", form="weight")
    a = gm.get_submodule("fxtune.default.0").lora_a
    assert abs(a.std().item() - 1 / r) < 0.01
    assert abs(a.mean().item()) < 0.01


@pytest.mark.parametrize("form", FORMS)
def test_pissa_keeps_output_and_user_weights(form):
    model = small_net()
    snap = snapshot(model)
    x = _x_small()
    r, alpha = 2, 4.0
    gm = lora(fxtune.trace(model), r=r, alpha=alpha, init="pissa", form=form)
    assert_unchanged(model, snap)
    gm_snap = snapshot(gm)
    with torch.no_grad():
        base = copy.deepcopy(model).double()(x.double())
        assert rel_err(gm(x), base) < 1e-5
        assert rel_err(fuse(gm)(x), base) < 1e-5
    assert_unchanged(gm, gm_snap)
    assert_unchanged(model, snap)
    # the adapter holds the principal part: s·B@A is the best rank-r approximation of W
    for path, slot in lora_slots(gm).items():
        w = model.get_submodule(path).weight.detach().double()
        delta = lora_delta64(slot, w.shape, alpha / r)
        s = torch.linalg.svdvals(w.flatten(1))
        best = torch.linalg.svdvals(delta.flatten(1))[:r]
        assert torch.allclose(best, s[:r], rtol=1e-4, atol=1e-6), path


def test_pissa_resnet_layer3():
    model = vision_model("resnet18")
    snap = snapshot(model)
    x = torch.randn(2, 3, 32, 32)
    gm = lora(fxtune.trace(model), "layer3.*", r=8, init="pissa")
    with torch.no_grad():
        assert rel_err(gm(x), copy.deepcopy(model).double()(x.double())) < 1e-5
    assert_unchanged(model, snap)


# ----------------------------------------------------------------------------- dropout


def test_dropout_train_mode_matches_reference_and_varies():
    """Train mode: y = base(x) + B(A(dropout(x))); the base never sees the dropout."""
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(5, 16)
    p = 0.5
    gm = lora(fxtune.trace(model), ["fc1"], r=4, dropout=p, form="activation")
    randomize_lora(gm, std=0.1)
    slot = gm.get_submodule("fxtune.default.fc1")
    gm.train()

    def expected(dropped):
        a, b = slot.lora_a.double(), slot.lora_b.double()
        h = F.linear(x.double(), model.fc1.weight.double(), model.fc1.bias.double()) + dropped.double() @ a.T @ b.T
        return F.linear(torch.relu(h), model.fc2.weight.double(), model.fc2.bias.double())

    outs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        dropped = F.dropout(x, p, training=True)
        torch.manual_seed(seed)
        y = gm(x)
        assert rel_err(y, expected(dropped)) < 1e-5
        outs.append(y)
    assert not torch.allclose(outs[0], outs[1])

    # with B = 0 the branch adds nothing: train-mode output is the base, every time
    with torch.no_grad():
        slot.lora_b.zero_()
    ys = [gm(x) for _ in range(3)]
    base = model(x)
    assert all(rel_err(y, base) < 1e-6 for y in ys)


def test_dropout_eval_mode_equals_no_dropout():
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(5, 16)
    gm = lora(fxtune.trace(model), r=4, dropout=0.3, form="activation")
    randomize_lora(gm, std=0.1)
    gm.eval()
    ref = lora_reference(model, gm, 1.0)
    with torch.no_grad():
        assert rel_err(gm(x), ref(x.double())) < 1e-5
        assert torch.equal(gm(x), gm(x))


def test_dropout_auto_picks_activation_and_weight_form_refuses():
    model = small_net()
    gm = fxtune.trace(model)
    snap = snapshot(gm)
    with pytest.raises(fxtune.AdapterError):
        lora(gm, r=2, dropout=0.1, form="weight")
    assert_unchanged(gm, snap)
    auto = lora(gm, r=2, dropout=0.1, form="auto")
    rows = [line for line in fxtune.summary(auto).splitlines() if "default:lora" in line]
    assert len(rows) == len(fxtune.sites(gm))
    assert all("[activation]" in line for line in rows)


def test_weight_form_adapter_after_dropout_adapter_is_refused():
    """Dropout needs the activation form; an adapter added after it in weight form forces the earlier
    one into the weight form too, where dropout cannot act. That must be refused, not silent."""
    torch.manual_seed(0)
    gm = lora(fxtune.trace(MLP()), ["fc1"], r=4, dropout=0.5, form="activation")
    snap = snapshot(gm)
    with pytest.raises(fxtune.AdapterError, match="dropout"):
        lora(gm, ["fc1"], r=2, form="weight", adapter="second")
    assert_unchanged(gm, snap)


# ----------------------------------------------------------------------------- training


def test_training_updates_only_adapters():
    model = vision_model("resnet18")
    snap = snapshot(model)
    model_bn = {k: v.clone() for k, v in model.named_buffers()}
    gm = lora(fxtune.trace(model), r=4)
    base_before = {k: p.detach().clone() for k, p in gm.named_parameters() if not k.startswith("fxtune.")}
    adapters_before = {k: p.detach().clone() for k, p in gm.named_parameters() if k.startswith("fxtune.")}
    gm_bn_before = {k: v.clone() for k, v in gm.named_buffers() if k.endswith("running_mean")}

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=g)
    target = torch.randint(0, 1000, (4,), generator=g)
    opt = torch.optim.AdamW(fxtune.trainable_parameters(gm), lr=1e-2)
    gm.train()
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(gm(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses

    for k, p in gm.named_parameters():
        if k.startswith("fxtune."):
            continue
        assert torch.equal(p, base_before[k]), k
        assert p.grad is None and not p.requires_grad, k
    changed = [k for k, p in gm.named_parameters() if k.startswith("fxtune.") and not torch.equal(p, adapters_before[k])]
    assert any(k.endswith("lora_a") for k in changed) and any(k.endswith("lora_b") for k in changed)
    # gm trained its own BatchNorm statistics; the user's stayed
    assert all(not torch.equal(gm.get_buffer(k), v) for k, v in gm_bn_before.items())
    assert all(torch.equal(model.get_buffer(k), v) for k, v in model_bn.items())
    assert_unchanged(model, snap)
    assert not model.training


def test_trainable_parameters_are_exactly_the_adapters():
    model = vision_model("resnet18")
    gm = lora(fxtune.trace(model), "layer[34].*", r=4)
    params = fxtune.trainable_parameters(gm)
    slots = lora_slots(gm)
    expected = {id(t) for s in slots.values() for t in (s.lora_a, s.lora_b)}
    assert {id(p) for p in params} == expected and len(params) == len(expected)
    assert sum(p.numel() for p in params) == count_lora_params(gm)
    # 4 conv 3x3 + 1 downsample in layer3 and in layer4, r=4: A r·in·k, B out·r
    shapes = {n: m.weight.shape for n, m in model.named_modules() if n.startswith(("layer3.", "layer4.")) and isinstance(m, nn.Conv2d)}
    assert count_lora_params(gm) == sum(4 * s[1] * s[2] * s[3] + s[0] * 4 for s in shapes.values())
    grad = [n for n, p in gm.named_parameters() if p.requires_grad]
    assert sorted(grad) == sorted(f"fxtune.default.{k.replace('.', '_')}.{t}" for k in slots for t in ("lora_a", "lora_b"))
    assert all(p.requires_grad for p in model.parameters())  # the user's flags are the user's
    assert fxtune.trainable_parameters(fxtune.trace(model)) == []


# ----------------------------------------------------------------------------- form="auto"


def _rule(site, r):
    """The documented rule: activation when r·(in·k + out) < out·(in/groups)·k."""
    out, in_per_group = site.weight_shape[0], site.weight_shape[1]
    k = 1
    for d in site.weight_shape[2:]:
        k *= d
    return r * (in_per_group * site.groups * k + out) < out * in_per_group * k


def test_auto_rule_activation_on_resnet_3x3_weight_on_depthwise():
    resnet = fxtune.trace(vision_model("resnet18"))
    for site in fxtune.sites(resnet, lambda s: s.kernel_size == (3, 3)):
        assert activation_is_cheaper(site, 8) is True, site.name
        assert _rule(site, 8)
    small = fxtune.trace(small_net())
    for site in fxtune.sites(small):
        assert activation_is_cheaper(site, 2) == _rule(site, 2), site.name
    (dw,) = fxtune.sites(small, ["depthwise"])
    assert activation_is_cheaper(dw, 2) is False


def test_auto_form_shown_in_summary():
    gm = lora(fxtune.trace(small_net()), r=2, form="auto")
    table = fxtune.summary(gm)
    rows = {line.split()[0]: line for line in table.splitlines()[2:-1]}
    for site in fxtune.sites(gm):
        form = "[activation]" if _rule(site, 2) else "[weight]"
        assert form in rows[site.name], (site.name, rows[site.name])
    assert "[weight]" in rows["depthwise"] and "[activation]" in rows["stem"]
    # and both forms give the same numbers as the reference
    randomize_lora(gm)
    x = _x_small()
    with torch.no_grad():
        assert rel_err(gm(x), lora_reference(small_net(), gm, 1.0)(x.double())) < 1e-5


# ----------------------------------------------------------------------------- two adapters


@pytest.mark.parametrize("forms", [("weight", "activation"), ("activation", "weight"), ("activation", "activation")])
def test_two_lora_adapters_compose_and_fuse_selectively(forms):
    model = small_net()
    x = _x_small()
    gm = lora(fxtune.trace(model), ["stem", "tok", "grouped"], r=2, form=forms[0])
    gm = lora(gm, ["tok", "fc", "grouped"], r=3, alpha=6.0, form=forms[1], adapter="other")
    randomize_lora(gm, seed=1)
    randomize_lora(gm, seed=2, adapter="other")
    ref = lora_reference(model, gm, 1.0)
    other = lora_slots(gm, "other")
    with torch.no_grad():
        for path, slot in other.items():
            w = ref.get_submodule(path).weight
            w.add_(lora_delta64(slot, w.shape, 2.0))
        assert rel_err(gm(x), ref(x.double())) < 1e-5
        assert rel_err(fuse(gm)(x), ref(x.double())) < 1e-5
        only_other = lora_reference(model, gm, 2.0, adapter="other")
        assert rel_err(fuse(gm, adapters=["other"])(x), only_other(x.double())) < 1e-5


def test_inserted_nodes_are_tagged_and_named_after_the_site():
    model = vision_model("resnet18")
    gm = fxtune.trace(model)
    original = {n.name for n in gm.graph.nodes}
    adapted = lora(gm, ["layer1.0.conv1", "fc"], r=2, form="activation")
    new = [n for n in adapted.graph.nodes if n.name not in original]
    assert new
    for n in new:
        tag = n.meta.get("fxtune")
        assert tag and tag["site"] in ("layer1.0.conv1", "fc") and tag["adapter"] == "default" and tag["kind"] == "lora"
        assert tag["role"]
        assert n.name.startswith(tag["site"].replace(".", "_") + "_"), n.name
    assert "layer1_0_conv1_lora_a" in {n.name for n in new}
    # the original nodes are all still there, with their names
    assert original <= {n.name for n in adapted.graph.nodes}


def test_adapters_added_to_an_eval_graph_are_in_eval_mode():
    """LoRA dropout on an eval-mode GraphModule is off: two forwards agree (the slots follow gm's mode)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    gm = lora(fxtune.trace(model), r=2, dropout=0.5)
    with torch.no_grad():
        for p in fxtune.trainable_parameters(gm):
            p.normal_()
    x = torch.randn(8, 4)
    assert not gm.training and not any(m.training for m in gm.modules())
    assert torch.equal(gm(x), gm(x))
    gm.train()
    assert not torch.equal(gm(x), gm(x))
