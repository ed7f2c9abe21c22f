"""Shared by the ia3 / slice_delta / svdiff / composition tests: a small model with every kind of
call site, snapshots, and float64 references written out from each technique's math.

Nothing here calls into a pass to compute an expected value; references read only the adapter
tensors (and, for slice_delta, the slice position) from the documented slot layout
`gm.fxtune.<adapter>.<path with dots as underscores>`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call

import fxtune


class Net(nn.Module):
    """Linear, Conv1d, Conv2d, grouped Conv2d, depthwise Conv2d and Conv3d in one small model."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, padding=1, padding_mode="circular")
        self.c2 = nn.Conv2d(4, 8, 3, padding=1, stride=2)
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=4, padding_mode="reflect")
        self.depthwise = nn.Conv2d(12, 12, 3, padding=2, dilation=2, groups=12, bias=False)
        self.c3 = nn.Conv3d(2, 4, (2, 3, 3), padding=(0, 1, 1))
        self.fc = nn.Linear(6 + 12 + 4, 5)

    def forward(self, a, b, v):
        ya = torch.relu(self.c1(a)).mean(-1)
        yb = self.depthwise(torch.relu(self.grouped(torch.relu(self.c2(b))))).mean((-2, -1))
        yv = torch.relu(self.c3(v)).mean((-3, -2, -1))
        return self.fc(torch.cat([ya, yb, yv], 1))


SITES = ["c1", "c2", "grouped", "depthwise", "c3", "fc"]


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


def inputs(seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 3, 7, generator=g),
        torch.randn(2, 4, 10, 10, generator=g),
        torch.randn(2, 2, 3, 6, 6, generator=g),
    )


def groups_of(model: nn.Module, name: str) -> int:
    return getattr(model.get_submodule(name), "groups", 1)


def slot(gm: nn.Module, name: str, adapter: str = "default") -> nn.Module:
    return gm.get_submodule(f"fxtune.{adapter}.{name.replace('.', '_')}")


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def assert_unchanged(model: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    now = model.state_dict(keep_vars=True)
    assert now.keys() == snap.keys()
    for k, v in snap.items():
        assert torch.equal(now[k].detach(), v), f"{k} of the user's model changed"
    for k, p in model.named_parameters():
        assert p.requires_grad, f"{k} of the user's model had requires_grad switched off"


def base64(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """{site: (W, b)} of the model in float64 (copies)."""
    out = {}
    for name in SITES:
        m = model.get_submodule(name)
        out[name] = (m.weight.detach().double().clone(), None if m.bias is None else m.bias.detach().double().clone())
    return out


def reference(model: nn.Module, weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]], xs) -> torch.Tensor:
    """The model's output in float64 with the given (W', b') per site (a copy; the model is untouched)."""
    ref = copy.deepcopy(model).double()
    params = {}
    for name, (w, b) in weights.items():
        params[f"{name}.weight"] = w
        if b is not None:
            params[f"{name}.bias"] = b
    with torch.no_grad():
        return functional_call(ref, params, tuple(x.double() for x in xs))


def assert_close(y: torch.Tensor, ref: torch.Tensor, rtol: float = 2e-5) -> None:
    y = y.detach().double()
    err = float((y - ref).abs().max() / ref.abs().max())
    assert err < rtol, f"max error {err:.2e} (relative to max |ref|) exceeds {rtol:.0e}"


def randomize(gm: nn.Module, fn, seed: int = 0) -> None:
    """Sets every adapter parameter of gm (only gm's own) to fn(name, parameter, generator)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if name.startswith("fxtune."):
                p.copy_(fn(name, p, g))


def assert_only_adapters_got_gradients(gm: nn.Module, model: nn.Module) -> None:
    """After a backward through gm: every adapter parameter has a non-zero gradient, nothing else
    of gm requires or got one, and the user's model got none."""
    for name, p in gm.named_parameters():
        if name.startswith("fxtune."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- the math, fp64


def ia3_ref(w: torch.Tensor, b: torch.Tensor | None, s: torch.Tensor, position: str, groups: int):
    """IA³ entry by entry: output rows (and bias) times s[o], or column j of row o times the
    scale of the input channel it reads, g·(in/groups) + j with g the group of o."""
    s = s.detach().double()
    w2 = w.clone()
    out, per = w.shape[:2]
    for o in range(out):
        if position == "output":
            w2[o] = w[o] * s[o]
        else:
            g = o // (out // groups)
            for j in range(per):
                w2[o, j] = w[o, j] * s[g * per + j]
    b2 = None if b is None else (b * s if position == "output" else b.clone())
    return w2, b2


def lora_ref(w: torch.Tensor, sl: nn.Module) -> torch.Tensor:
    """W + s·(B @ A) with A (r, in/groups, *k), B (out, r, 1...) flattened to matrices."""
    a, b = sl.lora_a.detach().double().flatten(1), sl.lora_b.detach().double().flatten(1)
    return w + sl.config["scale"] * (b @ a).reshape(w.shape)


def slice_ref(w: torch.Tensor, tuner: torch.Tensor, row: int, col: int, op: str) -> torch.Tensor:
    """W'[S] = W[S] + T (or · T) on the (out, rest) matrix view, every other entry unchanged."""
    m = w.reshape(w.shape[0], -1).clone()
    t = tuner.detach().double()
    rows, cols = t.shape
    if op == "add":
        m[row : row + rows, col : col + cols] += t
    else:
        m[row : row + rows, col : col + cols] *= t
    return m.reshape(w.shape)


def group_svds(w: torch.Tensor, groups: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The SVD of each group's block of rows of the (out, in/groups·k) matrix, in float64."""
    m = w.reshape(w.shape[0], -1)
    rows = w.shape[0] // groups
    return [torch.linalg.svd(m[g * rows : (g + 1) * rows], full_matrices=False) for g in range(groups)]


def svdiff_ref(w: torch.Tensor, delta: torch.Tensor, groups: int) -> torch.Tensor:
    """SVDiff as published, per group: U·diag(relu(σ + δ_g))·Vᵀ."""
    delta = delta.detach().double()
    blocks = [u @ torch.diag(torch.relu(s + delta[g])) @ vh for g, (u, s, vh) in enumerate(group_svds(w, groups))]
    return torch.cat(blocks).reshape(w.shape)


def traced_code(model: nn.Module) -> str:
    return fxtune.trace(model).code
