"""Shared by the graph-file and pickling tests: small models, an exact comparison of two GraphModules,
and the worker an mp.spawn test runs.

`assert_same_graph_module` compares everything a round trip must keep, value by value against
the GraphModule that was saved (bits, not tolerances).
"""

from __future__ import annotations

import torch
from torch import fx, nn

import fxtune
from fxtune.graph.traced_calls import _Ref

FXTUNE_META = ("fxtune", "fxtune_base", "fxtune_output", "fxtune_structure")
TOKENS = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(4))  # inputs of TiedNet
SLOT_FIELDS = ("kind", "target", "adapter", "config", "form", "form_reason", "order", "active", "merged")


class TiedNet(nn.Module):
    """A token model whose head shares the embedding's weight, plus a BatchNorm kept in eval mode."""

    def __init__(self, vocab: int = 11, dim: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.BatchNorm1d(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.tensor(0.5), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.proj(self.embed(tokens)))
        h = self.norm(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h * self.scale)


class Scaled(nn.Module):
    """A user layer kept as a leaf module (so the graph calls it): y = x · factor + shift."""

    def __init__(self, features: int, factor: float):
        super().__init__()
        self.features, self.factor = features, factor
        self.shift = nn.Parameter(torch.linspace(-1, 1, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor + self.shift


class WithLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.scaled = Scaled(6, 3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaled(self.fc(x))


def tied_net(seed: int = 0) -> TiedNet:
    torch.manual_seed(seed)
    model = TiedNet()
    with torch.no_grad():
        model.norm.running_mean.uniform_(-0.5, 0.5)
        model.norm.running_var.uniform_(0.5, 2.0)
    model.train()
    model.norm.eval()  # mixed modes must survive
    return model


def _plain(value):
    """A value with node references made distinguishable from strings (so `_Ref` must survive as `_Ref`)."""
    if isinstance(value, _Ref):
        return ("_Ref", str(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value).__name__, [_plain(v) for v in value]
    return value


def fxtune_meta(gm: fx.GraphModule) -> list:
    return [(n.name, n.op, {k: _plain(n.meta[k]) for k in FXTUNE_META if k in n.meta}) for n in gm.graph.nodes]


def tie_pattern(module: nn.Module) -> list:
    """For each parameter or buffer name, the first name holding the same tensor object."""
    names = [(k, v) for k, v in module.named_parameters(remove_duplicate=False)]
    names += [(k, v) for k, v in module.named_buffers(remove_duplicate=False)]
    first: dict[int, str] = {}
    return [(k, first.setdefault(id(v), k)) for k, v in names]


def records(module: nn.Module) -> dict:
    """fxtune's base-weight records (basekeeping) of every module, tensors as values."""
    out = {}
    for path, m in module.named_modules():
        for key, value in m.__dict__.items():
            if key.startswith("_fxtune_"):
                out[(path, key)] = {k: (v.detach().clone(), v.stride()) if isinstance(v, torch.Tensor) else v for k, v in value.items()}
    return out


def _same_records(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].keys() == b[key].keys(), key
        for field, value in a[key].items():
            other = b[key][field]
            if isinstance(value, tuple):
                assert torch.equal(value[0], other[0]) and value[0].dtype == other[0].dtype, (key, field)
            else:
                assert value == other, (key, field)


def slot_state(gm: nn.Module) -> dict:
    out = {}
    for path, m in gm.named_modules():
        if isinstance(m, fxtune.AdapterSlot):
            out[path] = ({f: getattr(m, f) for f in SLOT_FIELDS}, m.__dict__.get("_trainable_before_merge"))
    return out


def assert_same_graph_module(loaded: fx.GraphModule, original: fx.GraphModule, *inputs, **kwargs) -> None:
    """`loaded` is `original` again: code, class name, node.meta, tensors (bits, strides, ties), flags, records."""
    assert loaded.code == original.code
    assert type(loaded).__name__ == type(original).__name__
    assert fxtune_meta(loaded) == fxtune_meta(original)
    assert loaded.meta == original.meta
    for a, b in ((loaded.named_parameters(remove_duplicate=False), original.named_parameters(remove_duplicate=False)),
                 (loaded.named_buffers(remove_duplicate=False), original.named_buffers(remove_duplicate=False))):
        a, b = list(a), list(b)
        assert [k for k, _ in a] == [k for k, _ in b]
        for (k, x), (_, y) in zip(a, b):
            assert torch.equal(x, y) and x.dtype == y.dtype and x.stride() == y.stride(), k
            assert x.requires_grad == y.requires_grad and isinstance(x, nn.Parameter) == isinstance(y, nn.Parameter), k
    assert tie_pattern(loaded) == tie_pattern(original)
    assert list(loaded.state_dict()) == list(original.state_dict())
    modules_a, modules_b = dict(loaded.named_modules()), dict(original.named_modules())
    assert list(modules_a) == list(modules_b)
    for path, m in modules_b.items():
        assert modules_a[path].training == m.training, path
        assert modules_a[path]._non_persistent_buffers_set == m._non_persistent_buffers_set, path
        if type(m).__module__.startswith("torch.nn.") or isinstance(m, fxtune.AdapterSlot):
            assert type(modules_a[path]) is type(m), path
    _same_records(records(loaded), records(original))
    assert slot_state(loaded) == slot_state(original)
    assert str(fxtune.adapters(loaded)) == str(fxtune.adapters(original))
    assert fxtune.summary(loaded) == fxtune.summary(original)
    with torch.no_grad():
        assert _equal(loaded(*inputs, **kwargs), original(*inputs, **kwargs))


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if hasattr(a, "to_tuple"):
        a, b = a.to_tuple(), b.to_tuple()
    return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))


def gradients(gm: fx.GraphModule, *inputs) -> list[torch.Tensor]:
    """The gradients a squared-output loss gives the trainable parameters (which must all receive one)."""
    params = fxtune.trainable_parameters(gm)
    for p in params:
        p.grad = None
    gm(*inputs).square().mean().backward()
    assert params and all(p.grad is not None for p in params)
    return [p.grad.clone() for p in params]


def train_worker(rank: int, gm: fx.GraphModule, x: torch.Tensor, y: torch.Tensor, steps: int, out: str) -> None:
    """Runs in an mp.spawn'ed process: trains the adapters it was handed, fuses, and reports."""
    torch.set_num_threads(1)
    from fxtune.passes import fuse

    tagged = sum("fxtune" in n.meta for n in gm.graph.nodes)
    params = fxtune.trainable_parameters(gm)
    opt = torch.optim.SGD(params, lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(gm(x), y).backward()
        opt.step()
    with torch.no_grad():
        fused = fuse(gm)(x)
    trained = {k: v.detach().clone() for k, v in gm.state_dict().items() if k.startswith("fxtune.")}
    torch.save({"tagged": tagged, "trained": trained, "fused": fused, "pid_rank": rank}, out)


def train(gm: fx.GraphModule, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    """What `train_worker` does, in this process (the reference)."""
    params = fxtune.trainable_parameters(gm)
    opt = torch.optim.SGD(params, lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(gm(x), y).backward()
        opt.step()
