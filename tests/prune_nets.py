"""Small networks for the channel-group and pruning tests, one coupling each, and their masked references.

Every net documents its groups; the tests write the expected members out from that, and build
the masked model by zeroing, in a deepcopy, exactly the tensors listed here.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import fx, nn


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Norm statistics and affine parameters far from the (0, 1) defaults, layer scales and heads non-zero:
    untrained defaults hide bugs (a BatchNorm bias of 0 keeps a masked channel at 0 by luck)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
                mod.running_mean.copy_(torch.rand(mod.num_features, generator=g) * 2 - 1)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) * 2 + 0.25)
            if isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)) and getattr(mod, "weight", None) is not None:
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.copy_(torch.rand(mod.bias.shape, generator=g) - 0.5)
        for name, p in model.named_parameters():
            if name.endswith("layer_scale") or (p.dim() == 1 and name.endswith("norm.weight")):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        heads = getattr(model, "heads", None)
        if heads is not None and hasattr(heads, "head"):  # torchvision's ViT head starts at zero
            heads.head.weight.copy_(torch.randn(heads.head.weight.shape, generator=g) * 0.02)
    return model.eval()


def random_keep(n: int, ratio: float, seed: int = 0) -> torch.Tensor:
    """A keep mask over n units removing floor(ratio·n) of them at random."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.randperm(n, generator=g)[: n - math.floor(ratio * n)]] = True
    return keep


def zeroed(model: nn.Module, entries: list[tuple[str, int, torch.Tensor]]) -> nn.Module:
    """A deepcopy of `model` with positions `index` along `axis` of each named tensor set to zero."""
    ref = copy.deepcopy(model)
    tensors = {**dict(ref.named_parameters()), **dict(ref.named_buffers())}
    with torch.no_grad():
        for name, axis, index in entries:
            tensors[name].index_fill_(axis, index, 0.0)
    return ref


def gone(keep: torch.Tensor) -> torch.Tensor:
    return (~keep).nonzero().flatten()


class Residual(nn.Module):
    """Group "a": a and b are added, so a's and b's rows, both BatchNorms and fc's columns go together."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.bn_a(self.a(x)))
        h = torch.relu(self.bn_b(self.b(h)) + h)
        return self.fc(h.mean((2, 3)))


class Concat(nn.Module):
    """Groups "p" (4 channels) and "q" (6): r reads them concatenated, p's at offset 0 and q's at offset 4."""

    def __init__(self):
        super().__init__()
        self.p, self.q = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 3, padding=1)
        self.r = nn.Conv2d(10, 5, 1)

    def forward(self, x):
        return self.r(torch.cat([torch.relu(self.p(x)), torch.relu(self.q(x))], dim=1)).mean((2, 3))


class Split(nn.Module):
    """Group "c": its 8 channels are chunked; u reads channels 0-3, v reads 4-7."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 1)
        self.u, self.v = nn.Conv2d(4, 5, 1), nn.Conv2d(4, 5, 1)

    def forward(self, x):
        first, second = torch.relu(self.c(x)).chunk(2, dim=1)
        return (self.u(first) + self.v(second)).mean((2, 3))


class SqueezeExcite(nn.Module):
    """Group "c": the gate's rows (excite) multiply c's channels; group "squeeze" is the gate's inner width."""

    def __init__(self):
        super().__init__()
        self.c, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.squeeze, self.excite = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.out = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        h = F.hardswish(self.bn(self.c(x)))
        gate = torch.sigmoid(self.excite(torch.relu(self.squeeze(F.adaptive_avg_pool2d(h, 1)))))
        return self.out(h * gate).mean((2, 3))


class Depthwise(nn.Module):
    """Group "pw": the depthwise conv's rows (in = out) and both BatchNorms go with pw's rows."""

    def __init__(self):
        super().__init__()
        self.pw, self.bn1 = nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.dw, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.out = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        h = F.relu6(self.bn1(self.pw(x)))
        return self.out(F.relu6(self.bn2(self.dw(h)))).mean((2, 3))


class Grouped(nn.Module):
    """Group "c": 12 channels in 3 units of 4, one per group of g (groups=3, 4 in and 2 out per group)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 12, 1)
        self.g = nn.Conv2d(12, 6, 3, padding=1, groups=3)
        self.out = nn.Conv2d(6, 5, 1)

    def forward(self, x):
        return self.out(torch.relu(self.g(torch.relu(self.c(x))))).mean((2, 3))


class OuterSlice(nn.Module):
    """One getitem slices two channel dims at once (an outer product's corner): groups "f1" and "f2"."""

    def __init__(self):
        super().__init__()
        self.f1, self.f2, self.f3 = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(6, 3)

    def forward(self, x):
        outer = self.f1(x)[:, :, None] * self.f2(x)[:, None, :]
        return self.f3(outer[:, :6, :6].sum(2))


class FlattenLinear(nn.Module):
    """Group "c": each of its 4 channels is a block of 4 features (2×2) of fc's input."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(torch.relu(self.c(x)), 2), 1))


class Norms(nn.Module):
    """Group "fc1" is normalised by a LayerNorm over its features (a NORM reason); "fc2" reaches the output."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm = nn.Linear(6, 8), nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


@fx.wrap
def opaque_scale(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A function symbolic tracing keeps as one call: the analysis cannot see inside."""
    return x * weight.abs().mean()


class Blocked(nn.Module):
    """Every group but "d" is blocked, each for its own reason."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)  # sigmoid(0) = 0.5 reaches b: no exact removal
        self.b = nn.Conv2d(4, 4, 1)  # a mean over channels
        self.c = nn.Conv2d(4, 4, 1)  # its weight is used as a value by an opaque function
        self.d = nn.Conv2d(4, 4, 1)  # fine
        self.e = nn.Conv2d(4, 2, 1)  # reaches the output

    def forward(self, x):
        h = self.b(torch.sigmoid(self.a(x)))
        h = h * h.mean(1, keepdim=True)
        h = opaque_scale(self.c(h), self.c.weight)
        return self.e(torch.relu(self.d(h)))


class Attention(nn.Module):
    """Explicit attention: q/k/v/o linears, the head count a literal in view (heads are units)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.scale = (d // heads) ** -0.5

    def forward(self, x, mask):
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        k = self.k(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        v = self.v(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        att = ((q @ k.transpose(-2, -1)) * self.scale).masked_fill(mask == 0, float("-inf")).softmax(-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, t, d))


class GatedMLP(nn.Module):
    """silu(gate(x)) · up(x) → down: gate's and up's rows are one group."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate, self.up = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class RMSNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Decoder(nn.Module):
    """A plain PyTorch decoder: embedding + learned positions, pre-norm blocks of attention and gated MLP."""

    def __init__(self, vocab: int = 50, d: int = 32, heads: int = 4, hidden: int = 48, layers: int = 2, ctx: int = 12):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, ctx, d) * 0.02)
        self.blocks = nn.ModuleList(nn.ModuleDict({"norm1": RMSNorm(d), "attn": Attention(d, heads), "norm2": RMSNorm(d),
                                                   "mlp": GatedMLP(d, hidden)}) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.register_buffer("mask", torch.tril(torch.ones(ctx, ctx)).view(1, 1, ctx, ctx))

    def forward(self, ids):
        x = self.embed(ids) + self.pos
        for block in self.blocks:
            x = x + block["attn"](block["norm1"](x), self.mask)
            x = x + block["mlp"](block["norm2"](x))
        return self.head(self.norm(x))


def decoder(seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    model = Decoder()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                p.uniform_(0.5, 1.5)
    return model.eval()
