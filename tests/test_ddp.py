"""DistributedDataParallel on an adapted GraphModule: two CPU processes (gloo, loopback only).

Each rank traces the same model, adds the same LoRA adapters and trains on its own batch. The
ranks write what they saw to files; the test checks them against its own arithmetic: the
gradient DDP leaves on each adapter is the mean of the two ranks' local gradients (computed
without DDP), base weights never change, and both ranks end with identical adapters.
"""

from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fxtune
from fxtune.passes import lora

WORLD = 2
STEPS = 3
TIMEOUT_S = 120


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _adapted(model: nn.Module) -> torch.fx.GraphModule:
    """LoRA in both forms, with non-zero A and B (same on every rank: a fixed seed)."""
    gm = lora(fxtune.trace(model), targets="conv", r=2, form="activation")
    gm = lora(gm, targets="fc", r=2, form="weight")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in fxtune.trainable_parameters(gm):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return gm


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 4, (4,), generator=g)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = Net()
        base = {k: v.detach().clone() for k, v in model.state_dict().items()}
        gm = _adapted(model)
        names = [n for n, p in gm.named_parameters() if p.requires_grad]
        x, y = _batch(rank, 0)
        local = torch.autograd.grad(nn.functional.cross_entropy(gm(x), y), [p for _, p in gm.named_parameters() if p.requires_grad])
        ddp = nn.parallel.DistributedDataParallel(gm)
        opt = torch.optim.SGD(fxtune.trainable_parameters(gm), lr=0.1)
        averaged = None
        for step in range(STEPS):
            x, y = _batch(rank, step)
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            if step == 0:
                averaged = {n: p.grad.detach().clone() for n, p in gm.named_parameters() if p.requires_grad}
            opt.step()
        torch.save(
            {
                "names": names,
                "local": dict(zip(names, local)),
                "averaged": averaged,
                "adapters": {n: p.detach().clone() for n, p in gm.named_parameters() if p.requires_grad},
                "base_before": base,
                "model_after": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "gm_base_after": {k: v.detach().clone() for k, v in gm.state_dict().items() if not k.startswith("fxtune.")},
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(out_dir: str) -> None:
    """Starts the ranks and waits at most TIMEOUT_S for them; kills them if they hang."""
    context = mp.start_processes(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=False, start_method="spawn")
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=TIMEOUT_S)
    while not context.join(timeout=1):
        if datetime.datetime.now() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the DDP ranks did not finish within {TIMEOUT_S} s")


def test_ddp_averages_adapter_gradients_and_keeps_base_weights(tmp_path):
    _run_ranks(str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    names = ranks[0]["names"]
    assert names and all(n.startswith("fxtune.") for n in names)  # only adapters train
    for name in names:
        mean = sum(r["local"][name] for r in ranks) / WORLD
        assert not torch.allclose(ranks[0]["local"][name], ranks[1]["local"][name])  # the ranks saw other data
        for r in ranks:
            torch.testing.assert_close(r["averaged"][name], mean, rtol=1e-5, atol=1e-7)
    for name in names:
        assert torch.equal(ranks[0]["adapters"][name], ranks[1]["adapters"][name])
    for r in ranks:
        for key, value in r["base_before"].items():
            assert torch.equal(r["model_after"][key], value), f"the user's model changed at {key}"
            assert torch.equal(r["gm_base_after"][key], value), f"the GraphModule's base weight {key} changed"
