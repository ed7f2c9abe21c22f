"""Random tiny networks for the fuzz tests: a hypothesis strategy for a plain-data spec, and its builder.

A spec is a dict of modules (name -> (type, kwargs)) and a list of steps that `Net.forward`
interprets; the loop over steps is static Python, so `fxtune.trace` unrolls it into a flat graph.
Every step keeps track of shapes while drawing, so each drawn network is valid for its input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
FUNCTIONAL_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class Conv1D(nn.Module):
    """transformers' Conv1D as GPT-2 uses it: weight (in, out), y = x @ W + b (fxtune knows it by name)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.4)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


MODULE_TYPES = {
    "Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d, "Embedding": nn.Embedding,
    "MultiheadAttention": nn.MultiheadAttention, "Conv1D": Conv1D,
    "BatchNorm1d": nn.BatchNorm1d, "BatchNorm2d": nn.BatchNorm2d, "BatchNorm3d": nn.BatchNorm3d,
}


@dataclass
class NetSpec:
    """A drawn network: its input, modules, steps and tied weights (plain data, printable)."""

    input: tuple  # ("float", shape) or ("tokens", shape, vocab)
    dtype: str = "float32"  # of the model's parameters and a float input
    layout: str = "contiguous"  # or "channels_last" (conv2d/3d inputs and weights)
    modules: dict = field(default_factory=dict)  # name -> (type name, kwargs)
    steps: list = field(default_factory=list)
    ties: list = field(default_factory=list)  # (module, param) takes the Parameter of (module, param)

    @property
    def has_bn(self) -> bool:
        return any(t.startswith("BatchNorm") for t, _ in self.modules.values())


class Net(nn.Module):
    """Runs a NetSpec's steps; every step is a fixed piece of Python, so symbolic tracing flattens it."""

    def __init__(self, spec: NetSpec):
        super().__init__()
        self.steps = [tuple(s) for s in spec.steps]
        for name, (type_name, kwargs) in spec.modules.items():
            self.add_module(name, MODULE_TYPES[type_name](**kwargs))
        for (mod, param), (src, src_param) in spec.ties:
            setattr(getattr(self, mod), param, getattr(getattr(self, src), src_param))

    def forward(self, x):
        h = x
        for step in self.steps:
            h = self._run(step, h)
        return h

    def _run(self, step, h):
        op, args = step[0], step[1:]
        if op in ("call", "emb", "bn"):
            return getattr(self, args[0])(h)
        if op == "gpt":  # transformers' Conv1D views its input as (-1, in): GPT-2 feeds it contiguous tensors
            return getattr(self, args[0])(h.contiguous())
        if op == "act":
            return torch.relu(h)
        if op == "res":
            return h + getattr(self, args[0])(h)
        if op == "cat":
            return torch.cat([getattr(self, args[0])(h), getattr(self, args[1])(h)], args[2])
        if op == "twice":
            m = getattr(self, args[0])
            return m(torch.relu(m(h)))
        if op == "pool":
            return h.mean(args[0])
        if op == "t":
            return h.transpose(1, 2)
        if op == "flin":
            m = getattr(self, args[0])
            return F.linear(h, m.weight, m.bias)
        if op == "vlin":
            m = getattr(self, args[0])
            y = torch.matmul(h, m.weight.t())
            return y if m.bias is None else y + m.bias
        if op == "fconv":
            m = getattr(self, args[0])
            return FUNCTIONAL_CONVS[args[1]](h, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
        if op == "mha":
            name, batch_first, kv = args
            m = getattr(self, name)
            mem = h if kv is None else getattr(self, kv)(h)
            if not batch_first:
                h, mem = h.transpose(0, 1), mem.transpose(0, 1)
            y = m(h, mem, mem, need_weights=False)[0]
            return y if batch_first else y.transpose(0, 1)
        raise ValueError(f"unknown step {step}")


def build(spec: NetSpec, seed: int) -> Net:
    """The network with a seeded random init (BatchNorm statistics and affine parameters too), in eval mode."""
    torch.manual_seed(seed)
    net = Net(spec)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
            elif isinstance(m, nn.MultiheadAttention):
                for name in ("in_proj_bias", "bias_k", "bias_v"):
                    if getattr(m, name, None) is not None:
                        getattr(m, name).normal_(0, 0.2)
                if m.out_proj.bias is not None:
                    m.out_proj.bias.normal_(0, 0.2)
    net = net.to(getattr(torch, spec.dtype))
    if spec.layout == "channels_last":
        net = net.to(memory_format=torch.channels_last if len(spec.input[1]) == 4 else torch.channels_last_3d)
    return net.eval()


def example_input(spec: NetSpec, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    if spec.input[0] == "tokens":
        return torch.randint(0, spec.input[2], spec.input[1], generator=g)
    x = torch.randn(spec.input[1], generator=g, dtype=getattr(torch, spec.dtype))
    if spec.layout == "channels_last":
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class _Drawer:
    """Draws modules and steps while tracking the current activation's layout and sizes."""

    def __init__(self, draw):
        self.draw = draw
        self.spec = NetSpec(input=())
        self.count = 0

    def module(self, prefix: str, type_name: str, **kwargs) -> str:
        name = f"{prefix}{self.count}"
        self.count += 1
        self.spec.modules[name] = (type_name, kwargs)
        return name

    def conv_kwargs(self, dim: int, cin: int, sizes: tuple, *, keep: bool) -> tuple[dict, int, tuple]:
        """Random conv settings valid on `sizes`; `keep` = same channels and sizes out (for res/twice)."""
        draw = self.draw
        groups = draw(st.sampled_from(_divisors(cin)))
        cout = cin if keep else groups * draw(st.integers(1, max(1, 6 // groups)))
        kernel = tuple(draw(st.integers(1, 3)) for _ in range(dim))
        dilation = draw(st.sampled_from([1, 1, 2]))
        stride = 1 if keep else draw(st.sampled_from([1, 1, 2]))
        mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
        if keep:
            kernel = tuple(k if k % 2 else k + 1 for k in kernel)
            padding = draw(st.sampled_from(["same", "explicit"]))
            if padding == "explicit":
                padding = tuple(dilation * (k - 1) // 2 for k in kernel)
        else:
            padding = draw(st.sampled_from(["same", "valid", 0, 1, 2, "tuple"]))
            if padding == "tuple":
                padding = tuple(draw(st.integers(0, 2)) for _ in range(dim))
            if padding == "same" and stride != 1:
                padding = 1
        pads = []
        for k, s in zip(kernel, sizes):
            total = dilation * (k - 1)
            if padding == "same":
                pads.append((total // 2, total - total // 2))
            elif padding == "valid":
                pads.append((0, 0))
            else:
                p = padding if isinstance(padding, int) else padding[len(pads)]
                pads.append((p, p))
        if mode in ("reflect", "circular") and any(max(p) >= s for p, s in zip(pads, sizes)):
            mode = "replicate"
        out_sizes = tuple((s + sum(p) - dilation * (k - 1) - 1) // stride + 1 for s, p, k in zip(sizes, pads, kernel))
        if min(out_sizes) < 1:  # too large a kernel for this input: fall back to a 1-kernel conv
            kernel, padding, dilation, out_sizes = (1,) * dim, 0, 1, tuple((s - 1) // stride + 1 for s in sizes)
        kwargs = dict(in_channels=cin, out_channels=cout, kernel_size=kernel, stride=stride, padding=padding,
                      dilation=dilation, groups=groups, bias=draw(st.booleans()), padding_mode=mode)
        return kwargs, cout, out_sizes


def _conv_blocks(d: _Drawer, dim: int, channels: int, sizes: tuple, *, batched: bool) -> int:
    """1-3 conv blocks on a ([B,] C, *sizes) activation; returns the channels at the end."""
    draw = d.draw
    for _ in range(draw(st.integers(1, 3))):
        block = draw(st.sampled_from(["conv", "conv", "fconv", "res", "cat", "twice"]))
        keep = block in ("res", "twice")
        kwargs, cout, out_sizes = d.conv_kwargs(dim, channels, sizes, keep=keep)
        if block == "fconv":
            kwargs["padding_mode"] = "zeros"
        name = d.module("conv", CONVS[dim].__name__, **kwargs)
        if block in ("conv", "fconv"):
            d.spec.steps.append(("call", name) if block == "conv" else ("fconv", name, dim))
            if block == "conv" and batched and draw(st.booleans()):
                d.spec.steps.append(("bn", d.module("bn", f"BatchNorm{dim}d", num_features=cout)))
        elif block == "cat":
            other = dict(kwargs, out_channels=kwargs["groups"] * draw(st.integers(1, max(1, 6 // kwargs["groups"]))),
                         bias=draw(st.booleans()))
            d.spec.steps.append(("cat", name, d.module("conv", CONVS[dim].__name__, **other), -1 - dim))
            cout += other["out_channels"]
        else:
            d.spec.steps.append((block, name))
        channels, sizes = cout, out_sizes
        if draw(st.booleans()):
            d.spec.steps.append(("act",))
    return channels


def _linear_blocks(d: _Drawer, width: int, *, seq: bool) -> int:
    """0-3 blocks on a channels-last (B, [L,] C) activation; returns the width at the end."""
    draw = d.draw
    kinds = ["lin", "flin", "vlin", "res", "cat", "twice", "conv1D"] + (["mha", "mha", "mha", "seqconv"] if seq else [])
    for _ in range(draw(st.integers(0 if seq else 1, 3))):
        block = draw(st.sampled_from(kinds))
        out = width if block in ("res", "twice") else draw(st.integers(1, 6))
        bias = draw(st.booleans())
        if block in ("lin", "flin", "vlin"):
            name = d.module("lin", "Linear", in_features=width, out_features=out, bias=bias)
            d.spec.steps.append(("call", name) if block == "lin" else (block, name))
        elif block in ("res", "twice"):
            d.spec.steps.append((block, d.module("lin", "Linear", in_features=width, out_features=width, bias=bias)))
        elif block == "cat":
            a = d.module("lin", "Linear", in_features=width, out_features=out, bias=bias)
            other = draw(st.integers(1, 4))
            b = d.module("lin", "Linear", in_features=width, out_features=other, bias=draw(st.booleans()))
            d.spec.steps.append(("cat", a, b, -1))
            out += other
        elif block == "conv1D":
            d.spec.steps.append(("gpt", d.module("gpt", "Conv1D", nf=out, nx=width)))
        elif block == "mha":
            heads = draw(st.sampled_from([h for h in _divisors(width) if h <= 4]))
            kv = None
            kwargs = dict(embed_dim=width, num_heads=heads, bias=bias, batch_first=draw(st.booleans()))
            if draw(st.booleans()):  # cross-attention on a projection of another width: separate q/k/v weights
                kdim = draw(st.integers(1, 5).filter(lambda k: k != width))
                kv = d.module("kv", "Linear", in_features=width, out_features=kdim, bias=draw(st.booleans()))
                kwargs.update(kdim=kdim, vdim=kdim)
            d.spec.steps.append(("mha", d.module("attn", "MultiheadAttention", **kwargs), kwargs["batch_first"], kv))
            out = width
        else:  # seqconv: a Conv1d over the sequence
            length = d.spec.input[1][1]
            kwargs, out, _ = d.conv_kwargs(1, width, (length,), keep=True)
            d.spec.steps += [("t",), ("call", d.module("conv", "Conv1d", **kwargs)), ("t",)]
        width = out
        if draw(st.booleans()):
            d.spec.steps.append(("act",))
    return width


@st.composite
def networks(draw) -> NetSpec:
    """A tiny random network: conv trunks (1d/2d/3d), token or feature inputs, linear/attention blocks, a head."""
    d = _Drawer(draw)
    domain = draw(st.sampled_from(["conv1d", "conv2d", "conv3d", "seq", "tokens", "tokens", "vector"]))
    d.spec.dtype = draw(st.sampled_from(["float32", "float32", "float32", "float64"]))
    batch = draw(st.sampled_from([(1,), (2,), (2,), (3,)]))
    if domain.startswith("conv"):
        dim = int(domain[4])
        sizes = tuple(draw(st.integers(3, {1: 9, 2: 7, 3: 4}[dim])) for _ in range(dim))
        channels = draw(st.integers(1, 6))
        layout = draw(st.sampled_from(["contiguous", "contiguous", "unbatched"] + (["channels_last"] if dim > 1 else [])))
        if layout == "unbatched":
            batch = ()
        else:
            d.spec.layout = layout
        d.spec.input = ("float", (*batch, channels, *sizes))
        channels = _conv_blocks(d, dim, channels, sizes, batched=bool(batch))
        d.spec.steps.append(("pool", tuple(range(-dim, 0))))
        width = _linear_blocks(d, channels, seq=False) if draw(st.booleans()) else channels
    elif domain == "vector":
        width = draw(st.integers(1, 6))
        d.spec.input = ("float", (*batch, width))
        width = _linear_blocks(d, width, seq=False)
    else:
        length = draw(st.integers(2, 5))
        if domain == "tokens":
            vocab, dim = draw(st.integers(4, 10)), draw(st.integers(2, 6))
            d.spec.input = ("tokens", (*batch, length), vocab)
            padding_idx = draw(st.sampled_from([None, None, 0, vocab - 1]))
            emb = d.module("emb", "Embedding", num_embeddings=vocab, embedding_dim=dim, padding_idx=padding_idx)
            d.spec.steps.append(("emb", emb))
            width = dim
        else:
            width = draw(st.integers(2, 6))
            d.spec.input = ("float", (*batch, length, width))
        width = _linear_blocks(d, width, seq=True)
        if domain == "tokens" and draw(st.booleans()):  # an LM head tied to the embedding
            if width != dim:
                d.spec.steps.append(("call", d.module("lin", "Linear", in_features=width, out_features=dim, bias=draw(st.booleans()))))
            head = d.module("head", "Linear", in_features=dim, out_features=vocab, bias=False)
            d.spec.ties.append(((head, "weight"), (emb, "weight")))
            d.spec.steps.append(("call", head))
            return d.spec
    head = d.module("head", "Linear", in_features=width, out_features=draw(st.integers(1, 4)), bias=draw(st.booleans()))
    d.spec.steps.append(("call", head))
    return d.spec


def site_count(spec: NetSpec) -> int:
    return sum(4 if t == "MultiheadAttention" else 1 for t, _ in spec.modules.values() if not t.startswith("BatchNorm"))

