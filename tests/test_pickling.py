"""torch.save / torch.load, pickle, copy.deepcopy, copy.copy and mp.spawn on fxtune GraphModules.

Each result is compared with the GraphModule it came from (outputs bit-equal, same code, node.meta,
adapters, flags, ties), then fused and compared again: fxtune still knows its adapters.
"""

from __future__ import annotations

import copy
import io
import pickle
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch import fx

import fxtune
from core_helpers import MLP, small_net
from fxtune.passes import fuse, ia3, lora, low_rank, sp_lopa
from graph_file_helpers import TOKENS, assert_same_graph_module, gradients, tied_net, train, train_worker

pytestmark = pytest.mark.filterwarnings("ignore::fxtune.FxtuneWarning")

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def _torch_round_trip(gm):
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _cases():
    torch.manual_seed(0)
    traced = fxtune.trace(small_net())
    adapted = ia3(lora(traced, r=2, adapter="a"), targets="fc", adapter="b")
    adapted = lora(adapted, targets="stem", r=2, init="pissa", adapter="p")
    merged = fxtune.merge(adapted, ["a", "b", "p"])
    return {"traced": traced, "adapted": adapted, "merged": merged, "low_rank": low_rank(traced, targets=["fc", "stem"], rank=2)}


CASES = _cases()


@pytest.mark.parametrize("copier", ["torch.save", "pickle", "deepcopy"])
@pytest.mark.parametrize("case", list(CASES))
def test_copies_are_exact_and_fuse_the_same(case, copier):
    gm = CASES[case]
    copied = {"torch.save": _torch_round_trip, "pickle": lambda g: pickle.loads(pickle.dumps(g)), "deepcopy": copy.deepcopy}[copier](gm)
    assert_same_graph_module(copied, gm, X)
    assert_same_graph_module(fuse(copied), fuse(gm), X)
    if case == "adapted":
        assert all(torch.equal(a, b) for a, b in zip(gradients(copied, X), gradients(gm, X)))
        assert_same_graph_module(fxtune.merge(copied, "a"), fxtune.merge(gm, "a"), X)


def test_pickle_holds_no_code():
    data = pickle.dumps(CASES["adapted"])
    assert b"def forward" not in data and b"lora" in data  # the graph as data, adapters and all


def test_tied_weights_and_train_modes_survive_pickling():
    gm = lora(fxtune.trace(tied_net()), targets=["proj", "head", "embed"], r=2)
    for copied in (_torch_round_trip(gm), copy.deepcopy(gm)):
        assert_same_graph_module(copied, gm, TOKENS)
        assert copied.head.weight is copied.embed.weight and not copied.norm.training


def test_sp_lopa_prototypes_stay_shared_in_a_deepcopy():
    gm = sp_lopa(fxtune.trace(MLP()), block=(2, 2), r=1, num_prototypes=2)
    copied = copy.deepcopy(gm)
    slots = [m for m in copied.modules() if isinstance(m, fxtune.AdapterSlot)]
    assert slots[0].sp_lopa_c is slots[1].sp_lopa_c and slots[0].sp_lopa_c is not gm.fxtune.default.fc1.sp_lopa_c


def test_deepcopy_is_independent():
    gm = CASES["adapted"]
    copied = copy.deepcopy(gm)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    with torch.no_grad():
        for p in fxtune.trainable_parameters(copied):
            p.add_(1.0)
    next(n for n in copied.graph.nodes if "fxtune" in n.meta).meta["fxtune"]["role"] = "changed"
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in before.items())
    assert all(n.meta.get("fxtune", {}).get("role") != "changed" for n in gm.graph.nodes)


def test_copy_shares_modules_and_copies_the_graph():
    gm = CASES["adapted"]
    shallow = copy.copy(gm)
    assert_same_graph_module(shallow, gm, X)
    assert shallow.fxtune is gm.fxtune and shallow.graph is not gm.graph


def test_plain_graph_module_over_a_traced_graph_unpickles():
    """fx's own pickling re-creates the graph's tracer class with no arguments; fxtune's tracer allows that."""
    gm = CASES["traced"]
    plain = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    again = pickle.loads(pickle.dumps(plain))
    with torch.no_grad():
        assert torch.equal(again(X), gm(X))


def test_spawned_worker_trains_an_adapted_graph_module(tmp_path):
    """An mp.spawn'ed process (CPU, one worker, no network) gets an adapted GraphModule, trains it and fuses it;
    the same steps in this process are the reference."""
    torch.manual_seed(0)
    gm = ia3(lora(fxtune.trace(MLP()), r=2, adapter="a"), targets="fc2", adapter="b")
    x, y = torch.randn(8, 16), torch.randn(8, 8)
    reference = copy.deepcopy(gm)
    initial = {k: v.clone() for k, v in gm.state_dict().items() if k.startswith("fxtune.")}
    train(reference, x, y, steps=3)
    out = tmp_path / "result.pt"
    context = mp.start_processes(train_worker, args=(gm, x, y, 3, str(out)), nprocs=1, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the spawned worker did not finish within 120 s")
    result = torch.load(out)
    assert result["tagged"] == sum("fxtune" in n.meta for n in gm.graph.nodes) > 0
    trained = {k: v for k, v in reference.state_dict().items() if k.startswith("fxtune.")}
    assert result["trained"].keys() == trained.keys()
    for key, value in trained.items():
        torch.testing.assert_close(result["trained"][key], value, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(result["trained"][k], v) for k, v in initial.items())  # the steps changed the adapters
    with torch.no_grad():
        torch.testing.assert_close(result["fused"], fuse(reference)(x), rtol=1e-6, atol=1e-7)
