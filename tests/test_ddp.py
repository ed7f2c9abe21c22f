"""DistributedDataParallel on adapted GraphModules: two CPU processes (gloo, loopback only).

One launch runs three scenarios on both ranks and writes what each rank saw to a file; the test
checks them with its own arithmetic:
- plain DDP: each rank trains on its own batches; the gradient DDP leaves on every adapter is
  the mean of the two ranks' local gradients (computed without DDP), base weights never change,
  both ranks end with identical (trained) adapters;
- `fxtune.data_parallel` with a second, inactive adapter: trains for several steps (no unused
  parameter error), and the same three facts hold;
- `fxtune.data_parallel` when rank 1 loaded another base model: refused on both ranks, and
  rank 1's model is not overwritten (plain DDP's first broadcast writes rank 0's weights into
  it, through the storage the GraphModule shares with it).
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
from fxtune import data_parallel
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


def _adapted(model: nn.Module | torch.fx.GraphModule, adapter: str = "default") -> torch.fx.GraphModule:
    """LoRA in both forms, with non-zero A and B (same on every rank: a fixed seed)."""
    gm = model if isinstance(model, torch.fx.GraphModule) else fxtune.trace(model)
    gm = lora(gm, targets="conv", r=2, form="activation", adapter=adapter)
    gm = lora(gm, targets="fc", r=2, form="weight", adapter=adapter)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in fxtune.trainable_parameters(gm):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return gm


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 4, (4,), generator=g)


def _values(module: nn.Module, trainable: bool) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad == trainable}


def _train(rank: int, gm: torch.fx.GraphModule, wrapped: nn.Module) -> dict:
    """STEPS SGD steps on this rank's batches; the local (no DDP) and DDP gradients of the first."""
    trained = [(n, p) for n, p in gm.named_parameters() if p.requires_grad and p.grad is None]
    x, y = _batch(rank, 0)
    local = torch.autograd.grad(nn.functional.cross_entropy(gm(x), y), [p for _, p in trained], allow_unused=True)
    opt = torch.optim.SGD([p for _, p in trained], lr=0.1)
    start = _values(gm, trainable=True)
    averaged = None
    for step in range(STEPS):
        x, y = _batch(rank, step)
        opt.zero_grad()
        nn.functional.cross_entropy(wrapped(x), y).backward()
        if step == 0:
            averaged = {n: None if p.grad is None else p.grad.detach().clone() for n, p in trained}
        opt.step()
    return {
        "local": {n: g for (n, _), g in zip(trained, local)},
        "averaged": averaged,
        "start": start,
        "adapters": _values(gm, trainable=True),
        "gm_base": {k: v.detach().clone() for k, v in gm.state_dict().items() if not k.startswith("fxtune.")},
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        torch.manual_seed(0)
        model = Net()
        base = {k: v.detach().clone() for k, v in model.state_dict().items()}
        gm = _adapted(model)
        results["plain"] = _train(rank, gm, nn.parallel.DistributedDataParallel(gm))
        results["plain"]["model_after"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        results["plain"]["base_before"] = base

        gm = fxtune.set_active(_adapted(_adapted(model, "idle"), "task"), "task")
        results["helper"] = _train(rank, gm, data_parallel(gm))
        results["helper"]["model_after"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        results["helper"]["base_before"] = base

        torch.manual_seed(rank)  # rank 1 loads another base model
        other = Net()
        before = {k: v.detach().clone() for k, v in other.state_dict().items()}
        try:
            data_parallel(_adapted(other))
            results["refused"] = None
        except fxtune.FxtuneError as exc:
            results["refused"] = str(exc)
        results["other_unchanged"] = all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Runs the ranks once (at most TIMEOUT_S, killed if they hang) and loads what each wrote."""
    out_dir = tmp_path_factory.mktemp("ddp")
    context = mp.start_processes(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=TIMEOUT_S)
    while not context.join(timeout=1):
        if datetime.datetime.now() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the DDP ranks did not finish within {TIMEOUT_S} s")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def _check_training(results: list[dict]) -> None:
    names = [n for n, g in results[0]["local"].items() if g is not None]
    assert names and all(n.startswith("fxtune.") for n in names)  # only adapters train
    for name in names:
        local = [r["local"][name] for r in results]
        assert not torch.allclose(local[0], local[1])  # the ranks saw other data
        mean = (local[0] + local[1]) / 2
        for r in results:
            torch.testing.assert_close(r["averaged"][name], mean, rtol=1e-5, atol=1e-7)
        assert torch.equal(results[0]["adapters"][name], results[1]["adapters"][name])
        assert not torch.equal(results[0]["adapters"][name], results[0]["start"][name])  # they did train
    for r in results:
        for key, value in r["base_before"].items():
            assert torch.equal(r["model_after"][key], value), f"the user's model changed at {key}"
            assert torch.equal(r["gm_base"][key], value), f"the GraphModule's base weight {key} changed"


def test_plain_ddp_averages_adapter_gradients_and_keeps_base_weights(ranks):
    _check_training([r["plain"] for r in ranks])


def test_data_parallel_trains_the_active_adapter_only(ranks):
    results = [r["helper"] for r in ranks]
    _check_training(results)
    for r in results:
        used = sorted(n for n, g in r["local"].items() if g is not None)
        assert used and used == sorted(n for n, g in r["averaged"].items() if g is not None)
        assert all(n.startswith("fxtune.task.") for n in used)
    for r in results:  # the inactive adapter's parameters stay where they started
        for name, value in r["start"].items():
            if name.startswith("fxtune.idle."):
                assert torch.equal(r["adapters"][name], value)


def test_data_parallel_refuses_ranks_with_other_base_weights(ranks):
    for r in ranks:
        assert r["refused"] is not None and "different frozen weights" in r["refused"]
        assert r["other_unchanged"]
