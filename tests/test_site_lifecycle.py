"""The new site types through selection, coverage and the adapter lifecycle.

merge/unmerge/unload must give back the traced tensors bit for bit on sliced (q/k/v), transposed
(embedding, Conv1D) and tied weights; adapter files must round-trip; batched and structural passes
must refuse what they cannot do with an fxtune error naming the site. References are the earlier
tests' float64 formulas or runs of plain models.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxtune
from fxtune.passes import dora, fuse, ia3, lora, low_rank
from site_helpers import Conv1D, GPTish, randomize, rel_err, slots
from test_site_types import Attention, Functional, TiedLM, Tokens, Values, _functional_inputs

pytestmark = pytest.mark.filterwarnings("ignore::fxtune.FxtuneWarning")


class Mixed(nn.Module):
    """One of everything: attention, Conv1D, a functional linear, an embedding with padding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(9, 8, padding_idx=0)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.c_fc = Conv1D(8, 8)
        self.w = nn.Parameter(torch.randn(4, 8) * 0.3)

    def forward(self, idx):
        h = self.embed(idx)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return F.linear(torch.relu(self.c_fc(h)), self.w)


IDX = torch.tensor([[0, 3, 5, 8], [1, 0, 2, 7]])


def _mixed():
    torch.manual_seed(0)
    return Mixed().eval()


def test_type_selectors():
    """A module type selects its instances' weights, the sites inside it, and every site of its op."""
    gm = fxtune.trace(_mixed())
    names = lambda t: [s.name for s in fxtune.sites(gm, t)]  # noqa: E731
    assert names(nn.Linear) == ["attn.q", "attn.k", "attn.v", "attn.out_proj", "c_fc", "w"]
    assert names(nn.MultiheadAttention) == ["attn.q", "attn.k", "attn.v", "attn.out_proj"]
    assert names(nn.Embedding) == ["embed"]
    assert names("attn.*") == names(nn.MultiheadAttention)


def test_coverage_names_weights_that_are_not_sites():
    class Hidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
            self.norm_embed = nn.Embedding(5, 8, max_norm=1.0)
            self.spare = nn.Linear(8, 8)
            self.fc = nn.Linear(8, 3)

        def forward(self, idx):
            return self.fc(self.block(self.norm_embed(idx)))

    model = Hidden().eval()
    report = fxtune.coverage(model, fxtune.trace(model))
    # the layers inside the leaf TransformerEncoderLayer are sites: adapted through the parameters it is called with
    assert report.found == ("block.self_attn.q", "block.self_attn.k", "block.self_attn.v", "block.self_attn.out_proj",
                            "block.linear1", "block.linear2", "fc")
    assert set(report.missing) == {"norm_embed"}
    assert "max_norm" in report.missing["norm_embed"]
    assert report.unused == ("spare",) and report.total == 8 and not report.complete
    assert "7 of 8 weights the graph uses are call sites (87.5%)" in str(report)
    full = fxtune.coverage(_mixed())
    assert full.complete and full.found == ("embed", "attn.q", "attn.k", "attn.v", "attn.out_proj", "c_fc")


def test_functional_weight_of_a_plain_parameter_counts_in_the_graph_not_in_coverage():
    """Coverage counts layer weights; `w` (a bare parameter in F.linear) is a site all the same."""
    gm = fxtune.trace(_mixed())
    assert "w" in {s.name for s in fxtune.sites(gm)} and "w" not in fxtune.coverage(_mixed(), gm).found


def _params(gm):
    return {k: v.detach().clone() for k, v in gm.state_dict().items() if not k.startswith("fxtune.")}


def test_merge_unmerge_unload_are_bit_exact_on_every_site_type():
    model = _mixed()
    gm = fxtune.trace(model)
    base = _params(gm)
    a = randomize_and(lora(gm, r=2, adapter="a"), adapter="a")
    ab = randomize_and(ia3(a, ["attn.k", "c_fc", "embed"], adapter="b"), seed=2, adapter="b")
    with torch.no_grad():
        expected = ab(IDX)
        merged = fxtune.merge(ab)
        assert rel_err(merged(IDX), expected) < 1e-5
        assert not torch.equal(merged.attn.in_proj_weight, model.attn.in_proj_weight)
        assert torch.equal(merged.embed.weight[0], model.embed.weight[0])  # padding row
        back = fxtune.unmerge(merged)
        assert all(torch.equal(v, base[k]) for k, v in _params(back).items())
        assert torch.equal(back(IDX), expected)
        assert torch.equal(fxtune.set_active(ab, [])(IDX), gm(IDX))
        plain = fxtune.unload(fxtune.merge(ab, ["a", "b"]))
    assert all(torch.equal(v, base[k]) for k, v in _params(plain).items()) and plain.code == gm.code


def randomize_and(gm, seed=0, adapter="default"):
    randomize(gm, std=0.2, seed=seed, adapter=adapter)
    return gm


def test_pissa_on_an_attention_slice_and_an_embedding_keeps_the_output_and_unloads_exactly():
    model = _mixed()
    gm = fxtune.trace(model)
    adapted = lora(gm, ["attn.q", "embed"], r=2, init="pissa")
    with torch.no_grad():
        assert rel_err(adapted(IDX), model(IDX)) < 1e-5
        assert torch.equal(adapted.embed.weight[0], model.embed.weight[0])
    back = fxtune.unload(adapted)
    assert torch.equal(back.attn.in_proj_weight, model.attn.in_proj_weight) and torch.equal(back.embed.weight, model.embed.weight)


def test_adapter_files_round_trip_on_every_site_type(tmp_path):
    model = _mixed()
    adapted = randomize_and(lora(fxtune.trace(model), r=2))
    fxtune.save_adapters(adapted, tmp_path / "a")
    loaded = fxtune.load_adapters(fxtune.trace(model), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(loaded(IDX), adapted(IDX))
    with pytest.raises(fxtune.AdapterError, match="attn.q.*PEFT's format here holds LoRA on Linear/Conv"):
        fxtune.save_adapters(adapted, tmp_path / "p", format="peft")


def test_dora_activation_form_sees_the_canonical_weight_of_conv1d():
    torch.manual_seed(0)
    model = GPTish()
    x = torch.randn(2, 3, 6)
    act = dora(fxtune.trace(model), r=2, form="activation")
    randomize(act, std=0.2)
    weight = dora(fxtune.trace(model), r=2, form="weight")
    weight.load_state_dict(act.state_dict())
    assert "default:dora[activation]" in fxtune.summary(act) and "default:dora[weight]" in fxtune.summary(weight)
    with torch.no_grad():
        assert rel_err(act(x), weight(x)) < 1e-6 and rel_err(fuse(act)(x), weight(x)) < 1e-6
        assert rel_err(act(x), model(x)) > 1e-2


def test_batched_serves_embeddings_and_refuses_attention_and_values():
    torch.manual_seed(0)
    model = Tokens().eval()
    gm = randomize_and(lora(randomize_and(lora(fxtune.trace(model), r=2, adapter="a"), adapter="a"), r=2, adapter="b", form="weight"), seed=1, adapter="b")
    tokens = torch.tensor([[2, 5, 11, 2, 0], [1, 2, 3, 4, 2], [3, 3, 2, 1, 0]])
    index = torch.tensor([1, -1, 0])
    mixed = fxtune.batched(gm, ["a", "b"])(tokens, index)
    for row, k in enumerate(index.tolist()):
        alone = fxtune.set_active(gm, [] if k < 0 else [["a", "b"][k]])
        assert rel_err(mixed[row], alone(tokens)[row]) < 1e-6
    with pytest.raises(fxtune.AdapterError, match="batched cannot serve site 'attn.q': it is inside nn.MultiheadAttention"):
        fxtune.batched(lora(fxtune.trace(_mixed()), "attn.*", r=2), ["default"])
    with pytest.raises(fxtune.AdapterError, match="'proj': its weight is passed as a value"):
        fxtune.batched(lora(fxtune.trace(Values()), r=2), ["default"])


def test_structural_pass_refuses_sites_it_cannot_replace():
    with pytest.raises(fxtune.StructureError, match="attn.q.*inside nn.MultiheadAttention"):
        low_rank(fxtune.trace(_mixed()), "attn.*", rank=1)
    with pytest.warns(fxtune.FxtuneWarning, match=r"leaves \d+ site\(s\) it cannot replace(.|\n)*attn.q"):
        every = low_rank(fxtune.trace(_mixed()), rank=1, force=True)
    names = [s.name for s in fxtune.sites(every)]
    assert {"attn.q", "attn.out_proj", "embed", "w", "c_fc.0", "c_fc.1"} <= set(names) and "c_fc" not in names
    with pytest.raises(fxtune.StructureError, match="cannot replace"):
        low_rank(fxtune.trace(_mixed()), exclude="c_fc", rank=1)
    with pytest.raises(fxtune.StructureError, match="embedding site"):
        low_rank(fxtune.trace(_mixed()), ["embed"], rank=1)
    factored = low_rank(fxtune.trace(_mixed()), "c_fc", rank=2)
    assert [s.name for s in fxtune.sites(factored, "c_fc.*")] == ["c_fc.0", "c_fc.1"]


class Chain(nn.Module):
    """A conv whose output feeds a grouped conv directly (as in convnext): activation form, then weight form."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(4, 6, 2, stride=2)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)

    def forward(self, x):
        return self.dw(self.down(x))


def test_rewriting_one_site_keeps_its_adapted_neighbour():
    torch.manual_seed(0)
    model = Chain()
    x = torch.randn(2, 4, 8, 8)
    gm = randomize_and(lora(fxtune.trace(model), r=2, form="auto"))
    forms = fxtune.summary(gm)
    assert "default:lora[activation]" in forms and "default:lora[weight]" in forms
    w_down = model.down.weight.double() + _delta(gm, "down")
    w_dw = model.dw.weight.double() + _delta(gm, "dw")
    expected = F.conv2d(F.conv2d(x.double(), w_down, model.down.bias.double(), stride=2), w_dw, model.dw.bias.double(), padding=1, groups=6)
    more = randomize_and(ia3(gm, "dw", adapter="extra"), seed=5, adapter="extra")
    for g in (gm, fxtune.delete_adapter(more, "extra"), fxtune.merge(gm), fxtune.unmerge(fxtune.merge(gm)), fuse(gm)):
        with torch.no_grad():
            assert rel_err(g(x), expected) < 1e-5


def _delta(gm, target):
    slot = slots(gm)[target]
    a, b = slot.lora_a.double().flatten(1), slot.lora_b.double().flatten(1)
    return slot.config["scale"] * (b @ a).view(gm.get_submodule(target).weight.shape)


def test_functional_site_with_a_computed_bias_refuses_folding_a_bias_change():
    class Computed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(3))

        def forward(self, x):
            return F.linear(x, self.w, self.b * 2)

    adapted = ia3(fxtune.trace(Computed()), form="weight")
    with pytest.raises(fxtune.FusionError, match="'w'.*computed in the graph"):
        fuse(adapted)
    assert fuse(lora(fxtune.trace(Computed()), r=1)).code == fxtune.trace(Computed()).code


def test_functional_and_attention_models_keep_working_after_other_adapters_come_and_go():
    torch.manual_seed(0)
    inputs, _ = _functional_inputs()
    gm = randomize_and(lora(fxtune.trace(Functional()), r=2, adapter="a"), adapter="a")
    with torch.no_grad():
        expected = gm(*inputs)
        twice = fxtune.delete_adapter(randomize_and(ia3(gm, adapter="b"), seed=4, adapter="b"), "b")
        assert torch.equal(twice(*inputs), expected)
    attn = Attention(True, True, True).eval()
    q = torch.randn(2, 3, 8)
    k, v = torch.randn(2, 4, 5), torch.randn(2, 4, 7)
    g = randomize_and(lora(fxtune.trace(attn), ["mha.k", "mha.out_proj"], r=2))
    with torch.no_grad():
        assert torch.equal(fxtune.delete_adapter(randomize_and(ia3(g, "mha.v", adapter="b"), adapter="b"), "b")(q, k, v), g(q, k, v))


def test_tied_weights_select_together_or_not_at_all():
    gm = fxtune.trace(TiedLM())
    assert {s.name: s.target for s in fxtune.sites(gm, ["embed", "head"])} == {"embed": "embed", "head": "embed"}
    adapted = lora(gm, ["embed", "head"], r=2)
    assert set(slots(adapted)) == {"embed"}


def test_low_rank_on_transformers_conv1d_matches_its_truncated_svd():
    torch.manual_seed(0)
    model = GPTish()
    x = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(1))
    factored = low_rank(fxtune.trace(model), "c_attn", rank=3)
    first, second = factored.c_attn[0], factored.c_attn[1]
    assert isinstance(first, nn.Linear) and (first.in_features, first.out_features, second.out_features) == (6, 3, 12)
    u, s, vh = torch.linalg.svd(model.c_attn.weight.detach().double().T)  # Conv1D keeps (in, out): W = weight.T
    best = (u[:, :3] * s[:3]) @ vh[:3]
    assert rel_err(second.weight.double() @ first.weight.double(), best) < 1e-6
    assert torch.equal(second.bias, model.c_attn.bias)
    with torch.no_grad():
        h = torch.relu(x.double() @ best.T + model.c_attn.bias.double())
        expected = h @ model.c_proj.weight.double() + model.c_proj.bias.double()
        assert rel_err(factored(x), expected) < 1e-5
        exact = low_rank(fxtune.trace(model), rank=12, force=True)
        assert rel_err(exact(x), model(x)) < 1e-5
