"""The torch.export front end on tiny Hugging Face models (built from configs, nothing downloaded)
and on resnet18, against references written out here.

The LoRA reference is the HF model in float64 with each adapted weight replaced by
W + s·(B @ A), or W + s·(B @ A)ᵀ for GPT-2's Conv1D, which stores its weight as (in, out).
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

import fxtune
from hf_models import HF, bert, gpt2, t5, tokens
from core_helpers import assert_unchanged, lora_slots, randomize_lora, rel_err, snapshot, vision_model
from fxtune.graph.ownership import same_storage
from fxtune.passes import fuse, lora

pytestmark = pytest.mark.filterwarnings("ignore::fxtune.FxtuneWarning")

LINEAR_LIKE = (nn.Linear, Conv1D)




def _trace(model, args, kwargs):
    return fxtune.trace(model, frontend="export", example_inputs=args, example_kwargs=kwargs)


def _out(result):
    """Every tensor of an HF model output (last hidden state, pooler output...) as one flat tensor."""
    if isinstance(result, torch.Tensor):
        return result
    return torch.cat([t.flatten() for t in result.to_tuple() if isinstance(t, torch.Tensor)])


def _lora_reference(model: nn.Module, adapted: nn.Module, scale: float, adapter: str = "default") -> nn.Module:
    """float64 copy of `model` with W + s·B@A on every LoRA slot (transposed for Conv1D)."""
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        for path, slot in lora_slots(adapted, adapter).items():
            m = ref.get_submodule(path)
            delta = scale * (slot.lora_b.detach().double().flatten(1) @ slot.lora_a.detach().double().flatten(1))
            m.weight += delta.t() if isinstance(m, Conv1D) else delta.view(m.weight.shape)
    return ref


def _double(value):
    return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


@pytest.mark.parametrize("form", ["weight", "activation"])
@pytest.mark.parametrize("name", list(HF))
def test_hf_model_lora_every_linear_then_fuse(name, form):
    model, args, kwargs = HF[name]()
    snap = snapshot(model)
    gm = _trace(model, args, kwargs)
    assert_unchanged(model, snap)
    with torch.no_grad():
        torch.testing.assert_close(_out(gm(*args, **kwargs)), _out(model(*args, **kwargs)), rtol=1e-5, atol=1e-6)
    assert list(gm.state_dict()) == list(model.state_dict())

    linear_paths = {n for n, m in model.named_modules() if isinstance(m, LINEAR_LIKE)}
    chosen = [s.name for s in fxtune.sites(gm) if s.target in linear_paths]
    assert set(chosen) == linear_paths  # every linear of the model is a site, named by its path
    adapted = lora(gm, targets=chosen, r=4, form=form)
    assert set(lora_slots(adapted)) == linear_paths
    randomize_lora(adapted, std=0.1, seed=3)
    ref = _lora_reference(model, adapted, scale=1.0)
    with torch.no_grad():
        expected = _out(ref(*[_double(a) for a in args], **{k: _double(v) for k, v in kwargs.items()}))
        got = _out(adapted(*args, **kwargs))
        assert rel_err(_out(model(*args, **kwargs)), expected) > 1e-2, "adapters too small to matter"
        assert rel_err(got, expected) < 1e-5

    fused = fuse(adapted)
    assert_unchanged(model, snap)
    assert fused.code == gm.code
    with torch.no_grad():
        assert rel_err(_out(fused(*args, **kwargs)), got) < 1e-6
        assert rel_err(_out(fused(*args, **kwargs)), expected) < 1e-5
    state = fused.state_dict()
    assert list(state) == list(model.state_dict())
    fresh, _, _ = HF[name](seed=123)
    fresh.load_state_dict(state)
    fresh.requires_grad_(False)
    with torch.no_grad():
        torch.testing.assert_close(_out(fresh(*args, **kwargs)), _out(fused(*args, **kwargs)), rtol=1e-6, atol=1e-7)


def test_t5_tied_embedding_stays_tied_through_lora_and_fuse():
    """T5's encoder reads the embedding it shares with `shared`: adapting it adapts both names."""
    model, args, kwargs = t5()
    snap = snapshot(model)
    gm = _trace(model, args, kwargs)
    assert gm.shared.weight is gm.encoder.embed_tokens.weight
    adapted = lora(gm, targets=["encoder.embed_tokens", "encoder.block.0.layer.0.SelfAttention.q"], r=4)
    randomize_lora(adapted, std=0.1, seed=5)
    fused = fuse(adapted)
    assert fused.shared.weight is fused.encoder.embed_tokens.weight
    state = fused.state_dict()
    assert torch.equal(state["shared.weight"], state["encoder.embed_tokens.weight"])
    # an embedding's LoRA is PEFT's: A (r, num), B (dim, r), and the table gains (B @ A)ᵀ
    slots = lora_slots(adapted)
    ref = copy.deepcopy(model).double()  # deepcopy keeps the tie: one table under both names
    with torch.no_grad():
        for path, slot in slots.items():
            delta = slot.lora_b.detach().double().flatten(1) @ slot.lora_a.detach().double().flatten(1)
            ref.get_submodule(path).weight += delta.t() if path == "encoder.embed_tokens" else delta
        expected = _out(ref(*args))
        assert rel_err(_out(model(*args)), expected) > 1e-2
        assert rel_err(_out(adapted(*args)), expected) < 1e-5
        assert rel_err(_out(fused(*args)), expected) < 1e-5
    torch.testing.assert_close(state["shared.weight"].double(), ref.shared.weight)
    fresh, _, _ = t5(seed=9)
    fresh.load_state_dict(state)
    assert fresh.shared.weight is fresh.encoder.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(_out(fresh(*args)), _out(fused(*args)), rtol=1e-6, atol=1e-7)
    assert_unchanged(model, snap)


def test_gpt2_lm_head_tied_to_embedding():
    """Export reads both names of GPT-2's tied embedding as `lm_head.weight`; sites keep the model's names."""
    model, args, _ = gpt2()
    model = transformers.GPT2LMHeadModel(model.config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    snap = snapshot(model)
    gm = _trace(model, args, {})
    tied = {s.name: s.target for s in fxtune.sites(gm) if s.name in ("transformer.wte", "lm_head")}
    assert tied == {"transformer.wte": "transformer.wte", "lm_head": "transformer.wte"}
    adapted = lora(gm, targets=list(tied), r=4)
    randomize_lora(adapted, std=0.1, seed=6)
    slot = lora_slots(adapted)["transformer.wte"]
    delta = slot.lora_b.detach().double().flatten(1) @ slot.lora_a.detach().double().flatten(1)
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        ref.transformer.wte.weight += delta.t()  # one table, read by the embedding and the head
        expected = ref(*args).logits
        assert rel_err(model(*args).logits, expected) > 1e-2
        assert rel_err(adapted(*args).logits, expected) < 1e-5
    fused = fuse(adapted)
    assert fused.lm_head.weight is fused.transformer.wte.weight
    fresh = transformers.GPT2LMHeadModel(model.config).eval().requires_grad_(False)
    fresh.load_state_dict(fused.state_dict())
    with torch.no_grad():
        assert rel_err(fused(*args).logits, expected) < 1e-5
        torch.testing.assert_close(fresh(*args).logits, fused(*args).logits, rtol=1e-6, atol=1e-7)
    assert_unchanged(model, snap)


def test_gpt2_conv1d_is_one_module_call_as_in_fx():
    """Export's view-addmm-view of a Conv1D becomes one call of the module, so LoRA's activation
    form and its dropout apply (a weight read as a plain value would allow the weight form only)."""
    model, args, _ = gpt2()
    gm = _trace(model, args, {})
    assert "addmm" not in gm.code and 'getattr(self.h, "0").attn.c_attn(' in gm.code
    conv1d = [s.name for s in fxtune.sites(gm) if isinstance(s.module, Conv1D)]
    assert len(conv1d) == 8
    adapted = lora(gm, targets=conv1d, r=4, dropout=0.1)
    assert "addmm" not in adapted.code and "h_0_attn_c_attn_lora_dropout" in adapted.code


def test_resnet18_export_matches_fx_front_end():
    """Same site names as symbolic tracing; LoRA with the same A, B and fuse give the same model."""
    model = vision_model("resnet18")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    snap = snapshot(model)
    by_fx = fxtune.trace(model)
    by_export = fxtune.trace(model, frontend="export", example_inputs=(x,))
    assert [s.name for s in fxtune.sites(by_export)] == [s.name for s in fxtune.sites(by_fx)]
    with torch.no_grad():
        assert torch.equal(by_export(x), by_fx(x))

    a_fx = lora(by_fx, r=4, form="activation")
    a_export = lora(by_export, r=4, form="activation")
    randomize_lora(a_fx, std=0.05, seed=7)
    with torch.no_grad():
        fx_slots = lora_slots(a_fx)
        for path, slot in lora_slots(a_export).items():
            slot.lora_a.copy_(fx_slots[path].lora_a)
            slot.lora_b.copy_(fx_slots[path].lora_b)
        torch.testing.assert_close(a_export(x), a_fx(x), rtol=1e-5, atol=1e-6)
        f_fx, f_export = fuse(a_fx), fuse(a_export)
        s_fx, s_export = f_fx.state_dict(), f_export.state_dict()
        assert list(s_export) == list(s_fx) == list(model.state_dict())
        assert all(torch.equal(s_export[k], s_fx[k]) for k in s_fx)
        assert torch.equal(f_export(x), f_fx(x))
    assert_unchanged(model, snap)


# ----------------------------------------------------------------------------- ownership and shapes


def test_parameters_shared_read_only_buffers_copied_model_untouched():
    model, args, kwargs = bert()
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    snap = snapshot(model)
    gm = _trace(model, args, kwargs)
    assert_unchanged(model, snap)
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    for (k, p), (k2, q) in zip(gm.named_parameters(), model.named_parameters()):
        assert k == k2 and same_storage(p, q) and not p.requires_grad
    for (k, b), (_, c) in zip(gm.named_buffers(), model.named_buffers()):
        assert torch.equal(b, c) and not same_storage(b, c), k
    assert isinstance(gm.encoder.layer[0].attention.self.query, nn.Linear)
    # readable code: a weight is read where it is used, and the op is named by its module
    assert "encoder_layer_0_attention_self_query = torch.ops.aten.linear.default(" in gm.code
    assert fxtune.trainable_parameters(gm) == []


def test_training_adapters_in_train_mode_leaves_model():
    """A model traced in train mode fine-tunes like one: dropout on, gradients reach adapters only."""
    model, args, kwargs = bert()
    model.train()
    snap = snapshot(model)
    linear = lambda site: isinstance(site.module, nn.Linear)  # an embedding's input is indices: no dropout
    adapted = lora(_trace(model, args, kwargs), linear, r=4, dropout=0.1, init="gaussian")
    assert adapted.training
    trainable = fxtune.trainable_parameters(adapted)
    opt = torch.optim.SGD(trainable, lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        out = adapted(*args, **kwargs)
        (out.last_hidden_state.square().mean() + out.pooler_output.square().mean()).backward()
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert all(p.grad is None for n, p in adapted.named_parameters() if not n.startswith("fxtune."))
    with torch.no_grad():
        assert not torch.equal(_out(adapted(*args, **kwargs)), _out(adapted(*args, **kwargs)))  # dropout
    assert_unchanged(model, snap)


def test_forward_takes_inputs_directly_so_passes_can_add_some():
    """`forward(self, input_ids, attention_mask)`: fxtune.batched appends `adapter_index`."""
    model, args, kwargs = bert()
    gm = _trace(model, args, kwargs)
    assert "def forward(self, input_ids, attention_mask):" in gm.code and "_in_spec" not in gm.code
    adapted = lora(gm, lambda site: isinstance(site.module, nn.Linear), r=4, adapter="a")
    randomize_lora(adapted, std=0.1, seed=8, adapter="a")
    mixed = fxtune.batched(adapted, ["a"])
    ids, mask = args[0], kwargs["attention_mask"]
    ref = _lora_reference(model, adapted, scale=1.0, adapter="a")
    with torch.no_grad():
        out = mixed(ids, mask, adapter_index=torch.tensor([-1, 0])).last_hidden_state  # row 0 base, row 1 "a"
        base = model(ids, attention_mask=mask).last_hidden_state
        assert rel_err(out[0], base[0]) < 1e-6 and rel_err(out[1], base[1]) > 1e-2
        assert rel_err(out[1], ref(ids, attention_mask=mask).last_hidden_state[1]) < 1e-5


TOKENS = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}


def test_named_dynamic_dims_run_other_sizes_and_out_of_range_is_refused():
    """dynamic= frees batch and sequence; what export fixed (BERT's 64 positions) is checked."""
    model, args, kwargs = bert()
    gm = fxtune.trace(model, frontend="export", example_inputs=args, example_kwargs=kwargs, dynamic=TOKENS)
    ids, mask = tokens((3, 11), seed=4), torch.ones(3, 11, dtype=torch.long)
    with torch.no_grad():
        expected = _out(model(ids, attention_mask=mask))
        torch.testing.assert_close(_out(gm(ids, attention_mask=mask)), expected, rtol=1e-5, atol=1e-6)
    too_long = tokens((2, 65), seed=5)
    with pytest.raises(Exception, match="64"):
        gm(too_long, attention_mask=torch.ones(2, 65, dtype=torch.long))


def test_shapes_are_static_unless_asked():
    """Static by default (export costs what torch.export.export costs); other sizes are refused by name."""
    model, args, kwargs = bert()
    gm = _trace(model, args, kwargs)
    assert not any(isinstance(n.meta.get("val"), torch.SymInt) for n in gm.graph.nodes)  # no symbolic sizes
    with torch.no_grad():
        torch.testing.assert_close(_out(gm(*args, **kwargs)), _out(model(*args, **kwargs)), rtol=1e-5, atol=1e-6)
        with pytest.raises(Exception, match=r"input_ids\.size\(\)\[0\] == 2"):
            gm(tokens((3, 7)), attention_mask=torch.ones(3, 7, dtype=torch.long))
    batch = fxtune.trace(model, frontend="export", example_inputs=args, example_kwargs=kwargs, dynamic="batch")
    ids, mask = tokens((5, 7), seed=6), torch.ones(5, 7, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(_out(batch(ids, attention_mask=mask)), _out(model(ids, attention_mask=mask)), rtol=1e-5, atol=1e-6)
        with pytest.raises(Exception, match=r"size\(\)\[1\] == 7"):
            batch(tokens((5, 8)), attention_mask=torch.ones(5, 8, dtype=torch.long))


class Stateful(nn.Module):
    """BatchNorm in training mode, a plain tensor attribute and a constant made in forward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.offset = torch.tensor([1.0, -1.0, 0.5, 0.0])

    def forward(self, x):
        return self.bn(self.fc(x)) + self.offset + torch.tensor([0.0, 1.0, 2.0, 3.0])


def test_training_mode_statistics_update_the_copy_only():
    torch.manual_seed(0)
    model = Stateful().train()
    snap = snapshot(model)
    x = torch.randn(8, 4)
    gm = fxtune.trace(model, frontend="export", example_inputs=(x,))
    assert list(gm.state_dict()) == list(model.state_dict())
    reference = copy.deepcopy(model)
    torch.testing.assert_close(gm(x), reference(x))  # batch statistics, and running stats move
    torch.testing.assert_close(gm.bn.running_mean, reference.bn.running_mean)
    assert gm.bn.num_batches_tracked.item() == 1
    assert_unchanged(model, snap)
