"""Every kind of call site on small hand-written models, for LoRA, IA³ and slice_delta.

Sites: F.linear / F.conv2d / F.embedding on parameters, weights passed as values into fx.wrap-ped
functions, nn.MultiheadAttention (batch_first or not, packed or separate q/k/v weights),
nn.Embedding with padding_idx, a transformers-style `Conv1D`, and an LM head tied to its embedding.
References are float64 and written out here: the models' forwards as formulas (attention by hand),
each adapter's meaning on the canonical (out, in/groups, *kernel) view, placed by explicit layouts.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxtune
from fxtune.passes import fuse, ia3, lora, slice_delta
from site_helpers import GPTish, ia3_64, lora64, randomize, reference, rel_err, slice_delta64, slots

pytestmark = pytest.mark.filterwarnings("ignore::fxtune.FxtuneWarning")


@fx.wrap
def mixed_projection(x, weight, bias):
    """Stands in for swin's wrapped shifted_window_attention: takes a Linear's weight and bias as values."""
    return torch.tanh(x @ weight.t() + bias) * 2


@fx.wrap
def conv_value(x, weight, bias):
    return F.conv2d(x, weight, bias, padding=1, groups=2)


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(6, 5) * 0.4), nn.Parameter(torch.randn(6) * 0.1)
        self.cw, self.cb = nn.Parameter(torch.randn(8, 2, 3, 3) * 0.3), nn.Parameter(torch.randn(8) * 0.1)
        self.table = nn.Parameter(torch.randn(11, 6))

    def forward(self, x, img, idx):
        h = F.linear(x, self.w, self.b)
        c = F.conv2d(img, self.cw, self.cb, stride=2, padding=1, groups=2).mean((2, 3))
        e = F.embedding(idx, self.table, padding_idx=0).mean(1)
        return torch.cat([h, c, e], 1)


def functional64(p, x, img, idx):
    h = x @ p["w"].t() + p["b"]
    c = F.conv2d(img, p["cw"], p["cb"], stride=2, padding=1, groups=2).mean((2, 3))
    return torch.cat([h, c, p["table"][idx].mean(1)], 1)


FUNCTIONAL_LAYOUT = {"w": ("w", None, False, "b"), "cw": ("cw", None, False, "cb"), "table": ("table", None, True, None)}


class Values(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(5, 6)
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)

    def forward(self, x, img):
        return torch.cat([mixed_projection(x, self.proj.weight, self.proj.bias), conv_value(img, self.conv.weight, self.conv.bias).mean((2, 3))], 1)


def values64(p, x, img):
    a = torch.tanh(x @ p["proj.weight"].t() + p["proj.bias"]) * 2
    return torch.cat([a, F.conv2d(img, p["conv.weight"], p["conv.bias"], padding=1, groups=2).mean((2, 3))], 1)


VALUES_LAYOUT = {"proj": ("proj.weight", None, False, "proj.bias"), "conv": ("conv.weight", None, False, "conv.bias")}


def adapt64(params: dict, gm, transform, layout: dict, keep: dict | None = None) -> dict:
    """Float64 copies of `params` with each adapted weight replaced by transform(W, b, slot) on its
    canonical view; layout: {target: (weight name, row slice or None, transposed, bias name)}."""
    out = {k: v.detach().double().clone() for k, v in params.items()}
    for target, slot in slots(gm).items():
        wname, rows, transposed, bname = layout[target]
        rows = slice(None) if rows is None else rows
        w = out[wname][rows].t() if transposed else out[wname][rows]
        b = None if bname is None or out.get(bname) is None else out[bname][rows]
        new_w, new_b = transform(w.clone(), None if b is None else b.clone(), slot)
        if keep and target in keep:
            dim, index = keep[target]
            new_w.index_copy_(dim, torch.tensor(index), w.index_select(dim, torch.tensor(index)))
        out[wname][rows] = new_w.t() if transposed else new_w
        if new_b is not None:
            out[bname][rows] = new_b
    return out


PASSES = {
    "lora-weight": (lambda g: lora(g, r=2, form="weight"), lora64),
    "lora-activation": (lambda g: lora(g, r=2, form="activation"), lora64),
    "ia3-output": (lambda g: ia3(g), ia3_64),
    "ia3-input-weight": (lambda g: ia3(g, position="input", form="weight"), ia3_64),
    "slice_delta": (lambda g: slice_delta(g, size=0.3), slice_delta64),
}


def _run(model, make, *, seed=3):
    """(traced code, adapted gm, fused gm) with random adapter values; the model must stay as it was."""
    before = copy.deepcopy(model.state_dict())
    gm = fxtune.trace(model)
    adapted = make(gm)
    randomize(adapted, std=0.3, seed=seed)
    fused = fuse(adapted)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    return gm.code, adapted, fused


def _check(model, inputs, inputs64, forward64, params, layout, name, keep=None):
    make, transform = PASSES[name]
    code, adapted, fused = _run(model, make)
    expected = forward64(adapt64(params, adapted, transform, layout, keep), *inputs64)
    with torch.no_grad():
        assert rel_err(model(*inputs), expected) > 1e-2
        assert rel_err(adapted(*inputs), expected) < 1e-5
        assert rel_err(fused(*inputs), expected) < 1e-5
    assert fused.code == code
    return adapted, fused


def _functional_inputs():
    g = torch.Generator().manual_seed(1)
    x, img = torch.randn(3, 5, generator=g), torch.randn(3, 4, 7, 7, generator=g)
    idx = torch.tensor([[0, 3, 5, 0, 10], [1, 0, 2, 7, 9], [4, 4, 0, 6, 8]])
    return (x, img, idx), (x.double(), img.double(), idx)


def test_functional_sites_are_found_with_the_call_geometry():
    torch.manual_seed(0)
    sites = {s.name: s for s in fxtune.sites(fxtune.trace(Functional()))}
    assert {n: (s.call, s.kind, s.weight_shape, s.type_name) for n, s in sites.items()} == {
        "w": ("function", "linear", (6, 5), "F.linear"),
        "cw": ("function", "conv2d", (8, 2, 3, 3), "F.conv2d"),
        "table": ("function", "embedding", (6, 11), "F.embedding"),
    }
    assert (sites["cw"].groups, sites["cw"].in_features, sites["cw"].geometry.stride, sites["cw"].geometry.padding) == (2, 4, 2, 1)
    assert sites["table"].padding_idx == 0 and sites["table"].kept == (1, (0,))


@pytest.mark.parametrize("name", PASSES)
def test_functional_sites(name):
    torch.manual_seed(0)
    model = Functional()
    inputs, inputs64 = _functional_inputs()
    _check(model, inputs, inputs64, functional64, dict(model.named_parameters()), FUNCTIONAL_LAYOUT, name, keep={"table": (1, (0,))})


@pytest.mark.parametrize("name", ["lora-activation", "ia3-output", "slice_delta"])
def test_weights_passed_as_values_into_wrapped_functions(name):
    """Weight form whatever was asked: the adapted weight (and IA³'s scaled bias) flows into the function."""
    torch.manual_seed(0)
    model = Values()
    g = torch.Generator().manual_seed(1)
    x, img = torch.randn(3, 5, generator=g), torch.randn(3, 4, 6, 6, generator=g)
    sites = fxtune.sites(fxtune.trace(model))
    assert [(s.name, s.call, s.kind) for s in sites] == [("proj", "value", "linear"), ("conv", "value", "conv2d")]
    adapted, _ = _check(model, (x, img), (x.double(), img.double()), values64, dict(model.named_parameters()), VALUES_LAYOUT, name)
    if name != "slice_delta":  # asked for the activation form: the summary says why it is not used
        assert fxtune.summary(adapted).count("[weight] (its weight flows on as a value)") == 2


class Attention(nn.Module):
    def __init__(self, batch_first: bool, separate: bool, bias: bool):
        super().__init__()
        kdim, vdim = (5, 7) if separate else (None, None)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=vdim, bias=bias)
        with torch.no_grad():
            for p in self.mha.parameters():
                p.copy_(torch.randn_like(p) * 0.4)

    def forward(self, q, k, v):
        return self.mha(q, k, v, need_weights=False)[0]


def attention64(p, q, k, v, *, batch_first: bool, heads: int = 2):
    """Multi-head attention written out: per-head softmax(QKᵀ/√d)·V, then the output projection."""
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    e = p["out_proj.weight"].shape[0]
    w = p.get("in_proj_weight")
    wq, wk, wv = (w[:e], w[e:2 * e], w[2 * e:]) if w is not None else (p["q_proj_weight"], p["k_proj_weight"], p["v_proj_weight"])
    b = p.get("in_proj_bias")
    bq, bk, bv = (b[:e], b[e:2 * e], b[2 * e:]) if b is not None else (0, 0, 0)

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], heads, e // heads).transpose(1, 2)

    qh, kh, vh = split(q @ wq.t() + bq), split(k @ wk.t() + bk), split(v @ wv.t() + bv)
    scores = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(e // heads), -1)
    out = (scores @ vh).transpose(1, 2).reshape(q.shape[0], q.shape[1], e) @ p["out_proj.weight"].t()
    out = out + p["out_proj.bias"] if p.get("out_proj.bias") is not None else out
    return out if batch_first else out.transpose(0, 1)


def attention_layout(separate: bool, bias: bool) -> dict:
    rows = {letter: slice(8 * i, 8 * (i + 1)) for i, letter in enumerate("qkv")}
    layout = {"mha.out_proj": ("out_proj.weight", None, False, "out_proj.bias" if bias else None)}
    for letter in "qkv":
        weight = (f"{letter}_proj_weight", None) if separate else ("in_proj_weight", rows[letter])
        layout[f"mha.{letter}"] = (*weight, False, "in_proj_bias" if bias else None)
    return layout


def _adapt_bias_rows(params, gm, transform, layout, separate):
    """adapt64 for attention: with separate q/k/v weights, the bias rows still come from in_proj_bias."""
    if not separate:
        return adapt64(params, gm, transform, layout)
    out = {k: v.detach().double().clone() for k, v in params.items()}
    for target, slot in slots(gm).items():
        wname, _, _, bname = layout[target]
        rows = slice(8 * "qkv".index(target[-1]), 8 * ("qkv".index(target[-1]) + 1)) if target[-1] in "qkv" else slice(None)
        b = None if bname is None else out[bname][rows]
        new_w, new_b = transform(out[wname].clone(), None if b is None else b.clone(), slot)
        out[wname] = new_w
        if new_b is not None:
            out[bname][rows] = new_b
    return out


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("separate,bias", [(False, True), (True, True), (False, False)])
@pytest.mark.parametrize("name", ["lora-activation", "ia3-output", "slice_delta"])
def test_multihead_attention_projections(batch_first, separate, bias, name):
    torch.manual_seed(0)
    model = Attention(batch_first, separate, bias).eval()
    g = torch.Generator().manual_seed(1)
    shape = (lambda L, d: (3, L, d)) if batch_first else (lambda L, d: (L, 3, d))
    q, k, v = torch.randn(shape(4, 8), generator=g), torch.randn(shape(6, 5 if separate else 8), generator=g), torch.randn(shape(6, 7 if separate else 8), generator=g)
    sites = fxtune.sites(fxtune.trace(model))
    assert [(s.name, s.call, s.weight_shape) for s in sites] == [
        ("mha.q", "mha", (8, 8)), ("mha.k", "mha", (8, 5 if separate else 8)), ("mha.v", "mha", (8, 7 if separate else 8)),
        ("mha.out_proj", "mha", (8, 8)),
    ]
    make, transform = PASSES[name]
    code, adapted, fused = _run(model, make)
    if name == "lora-activation":
        assert fxtune.summary(adapted).count("default:lora[weight] (inside nn.MultiheadAttention)") == 4
    params = {k: p.detach().double() for k, p in model.mha.named_parameters()}
    expected = attention64(_adapt_bias_rows(params, adapted, transform, attention_layout(separate, bias), separate),
                           q.double(), k.double(), v.double(), batch_first=batch_first)
    with torch.no_grad():
        assert rel_err(model(q, k, v), attention64(params, q.double(), k.double(), v.double(), batch_first=batch_first)) < 1e-6
        assert rel_err(model(q, k, v), expected) > 1e-2
        assert rel_err(adapted(q, k, v), expected) < 1e-5
        assert rel_err(fused(q, k, v), expected) < 1e-5
    assert fused.code == code


def test_only_k_adapted_changes_only_the_k_rows():
    torch.manual_seed(0)
    model = Attention(True, False, True).eval()
    adapted = lora(fxtune.trace(model), "mha.k", r=2)
    randomize(adapted, std=0.3)
    fused = fuse(adapted)
    w, base = fused.mha.in_proj_weight, model.mha.in_proj_weight
    assert torch.equal(w[:8], base[:8]) and torch.equal(w[16:], base[16:]) and not torch.equal(w[8:16], base[8:16])
    assert torch.equal(fused.mha.in_proj_bias, model.mha.in_proj_bias)


def randomize_and_return(gm, seed=0):
    randomize(gm, std=0.3, seed=seed)
    return gm


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(12, 6, padding_idx=2)
        self.out = nn.Linear(6, 3)

    def forward(self, idx):
        return self.out(self.embed(idx))


TOKENS = torch.tensor([[2, 5, 11, 2, 0], [1, 2, 3, 4, 2]])


@pytest.mark.parametrize("form", ["weight", "activation"])
def test_embedding_lora_as_peft_with_the_padding_row_never_adapted(form):
    torch.manual_seed(0)
    model = Tokens().eval()
    gm = fxtune.trace(model)
    adapted = lora(gm, "embed", r=3, form=form)
    slot = slots(adapted)["embed"]
    assert slot.lora_a.shape == (3, 12) and slot.lora_b.shape == (6, 3)
    assert not slot.lora_a.any() and slot.lora_b.std() > 0.5  # PEFT: A zero, B ~ N(0, 1)
    randomize(adapted, std=0.3, seed=1)
    ref = reference(model, adapted, lora64, keep={"embed": (1, (2,))})
    with torch.no_grad():
        expected = ref(TOKENS)
        assert rel_err(adapted(TOKENS), expected) < 1e-6
        fused = fuse(adapted)
        assert rel_err(fused(TOKENS), expected) < 1e-6
        pad = TOKENS == 2
        assert torch.equal(adapted(TOKENS)[pad], model(TOKENS)[pad])
    assert torch.equal(fused.embed.weight[2], model.embed.weight[2]) and not torch.equal(fused.embed.weight[3], model.embed.weight[3])
    assert fused.code == gm.code
    opt = torch.optim.SGD(fxtune.trainable_parameters(adapted), lr=0.5)
    adapted(TOKENS).square().sum().backward()
    opt.step()
    with torch.no_grad():
        assert torch.equal(adapted(TOKENS)[pad], model(TOKENS)[pad])


def test_embedding_input_side_adapter_takes_the_weight_form():
    """IA³ on the input side would scale indices: it scales the table's rows (weight form) instead."""
    torch.manual_seed(0)
    model = Tokens().eval()
    adapted = randomize_and_return(ia3(fxtune.trace(model), "embed", position="input"))
    assert "[weight] (ia3 acts on the input, which is indices here)" in fxtune.summary(adapted)
    ref = reference(model, adapted, ia3_64, keep={"embed": (1, (2,))})
    with torch.no_grad():
        assert rel_err(adapted(TOKENS), ref(TOKENS)) < 1e-6
    output = randomize_and_return(ia3(fxtune.trace(model), "embed"))
    assert "default:ia3[activation]" in fxtune.summary(output)


def test_lora_dropout_on_an_embedding_is_refused():
    with pytest.raises(fxtune.AdapterError, match="embedding's input, which is indices"):
        lora(fxtune.trace(Tokens()), r=2, dropout=0.1)


@pytest.mark.parametrize("name", ["lora-weight", "lora-activation", "ia3-output", "ia3-input-weight", "slice_delta"])
def test_transformers_style_conv1d(name):
    torch.manual_seed(0)
    model = GPTish()
    x = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(1))
    sites = fxtune.sites(fxtune.trace(model))
    assert [(s.name, s.call, s.kind, s.weight_shape) for s in sites] == [("c_attn", "module", "linear", (12, 6)), ("c_proj", "module", "linear", (6, 12))]
    make, transform = PASSES[name]
    code, adapted, fused = _run(model, make)
    ref = reference(model, adapted, transform)
    with torch.no_grad():
        expected = ref(x.double())
        assert rel_err(model(x), expected) > 1e-2
        assert rel_err(adapted(x), expected) < 1e-5 and rel_err(fused(x), expected) < 1e-5
    assert fused.code == code and fused.c_attn.weight.shape == (6, 12)


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 10)
        self.head.weight = self.embed.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.mix(self.embed(idx))))


@pytest.mark.parametrize("name", ["lora-activation", "ia3-output", "slice_delta"])
def test_tied_embedding_and_head_share_one_adapter_and_stay_tied(name):
    torch.manual_seed(0)
    model = TiedLM().eval()
    idx = torch.tensor([[1, 4, 9], [0, 3, 3]])
    sites = {s.name: s for s in fxtune.sites(fxtune.trace(model))}
    assert (sites["head"].target, sites["head"].canonical, sites["embed"].canonical) == ("embed", False, True)
    make, transform = PASSES[name]
    code, adapted, fused = _run(model, make)
    assert set(slots(adapted)) == {"embed", "mix"}
    ref = reference(model, adapted, transform)
    assert ref.head.weight is ref.embed.weight
    with torch.no_grad():
        expected = ref(idx)
        assert rel_err(model(idx), expected) > 1e-2
        assert rel_err(adapted(idx), expected) < 1e-5 and rel_err(fused(idx), expected) < 1e-5
    assert fused.head.weight is fused.embed.weight and fused.code == code
    state = fused.state_dict()
    assert torch.equal(state["head.weight"], state["embed.weight"])
    assert "(shares embed)" in fxtune.summary(adapted)
    with pytest.raises(fxtune.SelectionError, match="shares its weight"):
        lora(fxtune.trace(model), "head")
