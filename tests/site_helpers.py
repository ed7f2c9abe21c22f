"""Where each adapted weight sits in the user's model, and float64 references built from that alone.

The mapping from a site's target to a tensor is written out here (module path -> .weight;
`<attention>.q/.k/.v` -> rows of in_proj_weight or q/k/v_proj_weight; embeddings and Conv1D
transposed) so the references never ask fxtune where a weight is or how it is viewed. Also the
transformers-style Conv1D models that several test files share.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def location(model: nn.Module, target: str) -> tuple[nn.Module, str, slice | None, bool]:
    """(module, parameter name, row slice, transposed) of the weight an adapter target names."""
    parent, _, last = target.rpartition(".")
    if last in ("q", "k", "v") and isinstance(model.get_submodule(parent), nn.MultiheadAttention):
        mha, i = model.get_submodule(parent), "qkv".index(last)
        e = mha.embed_dim
        if mha._qkv_same_embed_dim:
            return mha, "in_proj_weight", slice(i * e, (i + 1) * e), False
        return mha, f"{last}_proj_weight", None, False
    module = model.get_submodule(target)
    return module, "weight", None, isinstance(module, nn.Embedding) or type(module).__name__ == "Conv1D"


def canonical64(model: nn.Module, target: str) -> torch.Tensor:
    """The weight as (out, in/groups, *kernel), in float64 (a copy)."""
    module, name, rows, transposed = location(model, target)
    w = getattr(module, name).detach()
    w = w[rows] if rows is not None else w
    return (w.t() if transposed else w).to(torch.float64, copy=True)


def bias_location(model: nn.Module, target: str) -> tuple[nn.Module, str, slice | None]:
    """(module, parameter name, row slice) of the bias that goes with a target's weight."""
    module, name, _, _ = location(model, target)
    if isinstance(module, nn.MultiheadAttention):
        i, e = "qkv".index(target.rpartition(".")[2]), module.embed_dim
        return module, "in_proj_bias", slice(i * e, (i + 1) * e)
    return module, "bias", None


def bias64(model: nn.Module, target: str) -> torch.Tensor | None:
    module, name, rows = bias_location(model, target)
    b = getattr(module, name, None)
    if b is None:
        return None
    return (b.detach().double()[rows] if rows is not None else b.detach().double()).clone()


def set_weight(ref: nn.Module, target: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Writes a canonical float64 weight (and bias) into the test's own float64 copy `ref`."""
    module, name, rows, transposed = location(ref, target)
    raw = weight.t() if transposed else weight
    with torch.no_grad():
        param = getattr(module, name)
        (param[rows] if rows is not None else param).copy_(raw)
        if bias is not None:
            module, name, rows = bias_location(ref, target)
            b = getattr(module, name)
            (b[rows] if rows is not None else b).copy_(bias)


def slots(gm: nn.Module, adapter: str = "default") -> dict[str, nn.Module]:
    """{target: slot} under the documented layout gm.fxtune.<adapter>.<key>."""
    return {slot.target: slot for slot in gm.get_submodule(f"fxtune.{adapter}").children()}


def randomize(gm: nn.Module, *, std: float = 0.05, seed: int = 0, adapter: str = "default") -> None:
    """Adds N(0, std²) noise to every adapter parameter of `adapter` (in place, on gm's own copies)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for slot in slots(gm, adapter).values():
            for p in slot.parameters(recurse=False):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def lora_delta64(slot: nn.Module, shape: tuple) -> torch.Tensor:
    """s·(B.flatten(1) @ A.flatten(1)).view(shape), in float64."""
    a, b = slot.lora_a.detach().double().flatten(1), slot.lora_b.detach().double().flatten(1)
    return slot.config["scale"] * (b @ a).view(shape)


def reference(model: nn.Module, gm: nn.Module, transform, *, adapter: str = "default", keep: dict | None = None) -> nn.Module:
    """A float64 deepcopy of `model` with each adapted weight W (canonical view) replaced by
    `transform(W, b, slot) -> (W', b')`; `keep` {target: (dim, indices)} entries keep W's values."""
    ref = copy.deepcopy(model).double()
    for target, slot in slots(gm, adapter).items():
        w, b = canonical64(model, target), bias64(model, target)
        new_w, new_b = transform(w, b, slot)
        if keep and target in keep:
            dim, index = keep[target]
            new_w.index_copy_(dim, torch.tensor(index), w.index_select(dim, torch.tensor(index)))
        set_weight(ref, target, new_w, new_b)
    return ref


def lora64(w: torch.Tensor, b, slot) -> tuple:
    return w + lora_delta64(slot, w.shape), b


def ia3_64(w: torch.Tensor, b, slot) -> tuple:
    """diag(s)·W, s·b (output) or W·diag(s) per group (input), written out per entry."""
    s = slot.scale.detach().double()
    if slot.config["position"] == "output":
        return w * s.view(-1, *([1] * (w.dim() - 1))), None if b is None else b * s
    per_group = w.shape[1]
    out = w.clone()
    groups = s.numel() // per_group
    rows = w.shape[0] // groups
    for o in range(w.shape[0]):
        g = o // rows
        out[o] = w[o] * s[g * per_group:(g + 1) * per_group].view(-1, *([1] * (w.dim() - 2)))
    return out, b


def slice_delta64(w: torch.Tensor, b, slot) -> tuple:
    """W[S] += T on the (out, rest) matrix view."""
    c = slot.config
    m = w.reshape(w.shape[0], -1).clone()
    m[c["row"]:c["row"] + c["rows"], c["col"]:c["col"] + c["cols"]] += slot.tuner.detach().double()
    return m.view(w.shape), b


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.detach().double(), ref.detach().double()
    return float((y - ref).norm() / ref.norm())


class Conv1D(nn.Module):
    """transformers' Conv1D as GPT-2 uses it: weight (in, out), y = x @ W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.4)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class GPTish(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn, self.c_proj = Conv1D(12, 6), Conv1D(6, 12)

    def forward(self, x):
        return self.c_proj(torch.relu(self.c_attn(x)))
