"""fxtune.Strategy: ordered (check, action) rules, first match wins, plans as data (dict / JSON)."""

from __future__ import annotations

import functools
import json
import re

import pytest
import torch
from torch import nn

import fxtune
from fxtune.passes import dora, fuse, ia3, lora




class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3))
        return self.head(torch.relu(self.fc(h)))


def traced(seed: int = 0):
    torch.manual_seed(seed)
    return fxtune.trace(Net().eval())


def x():
    return torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))


def assert_same_module(a, b):
    """Same generated code and bit-identical tensors under the same state_dict keys."""
    assert a.code == b.code
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


PLAN = {
    "rules": [
        {"check": "head", "action": {"pass": "lora", "options": {"r": 2, "alpha": 8, "adapter": "a"}}},
        {"check": {"type": "Linear"}, "action": {"pass": "ia3", "options": {"adapter": "s"}}},
        {"check": {"regex": r"c\d"}, "action": {"pass": "dora", "options": {"r": 2, "adapter": "d"}}},
        {"check": {"names": ["fc"]}, "action": {"pass": "lora", "options": {"r": 8}}},
    ]
}


def test_json_plan_reproduces_the_equivalent_pass_calls(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(PLAN))
    strategy = fxtune.Strategy.from_json(str(path))
    gm = traced()
    torch.manual_seed(123)
    got = strategy.apply(gm)
    torch.manual_seed(123)
    want = lora(gm, targets="head", r=2, alpha=8, adapter="a")
    want = ia3(want, targets=nn.Linear, exclude="head", adapter="s")
    want = dora(want, targets=re.compile(r"c\d"), r=2, adapter="d")
    assert_same_module(got, want)
    assert [a.name for a in fxtune.adapters(got)] == ["a", "s", "d"]  # the 4th rule won nothing: skipped
    assert torch.equal(got(x()), want(x()))
    torch.manual_seed(123)
    assert_same_module(strategy(gm), want)  # a Strategy is a pass


def test_first_match_wins_and_later_rules_never_see_taken_sites():
    gm = traced()
    strategy = fxtune.Strategy([
        ("c*", functools.partial(lora, r=2)),
        ("*", (ia3, {"adapter": "s"})),
        ("c1", functools.partial(lora, r=2, adapter="never")),
    ])
    assert strategy.plan(gm) == [["c1", "c2"], ["fc", "head"], []]
    out = strategy(gm)
    assert {a.name: a.sites for a in fxtune.adapters(out)} == {"default": ("c1", "c2"), "s": ("fc", "head")}
    assert gm.code == traced().code  # the input GraphModule is left as it was


def test_a_strategy_matching_nothing_is_an_error():
    with pytest.raises(fxtune.SelectionError, match=r"no rule of this strategy matches any site.*Available sites: c1, c2, fc, head"):
        fxtune.Strategy([("layer9.*", lora), ({"type": "Conv3d"}, ia3)]).apply(traced())
    with pytest.raises(fxtune.SelectionError, match=r"rule 1 names no site: \['fc2'\]"):
        fxtune.Strategy([("c1", lora), (["fc2"], ia3)]).apply(traced())


def test_to_dict_from_dict_round_trip(tmp_path):
    strategy = fxtune.Strategy([
        (re.compile(r"c1"), functools.partial(dora, r=2, adapter="d")),
        (nn.Conv2d, ("lora", {"r": {"c2": 3}, "alpha": 6.0})),
        (["fc"], (ia3, {"adapter": "s", "position": "input"})),
        (None, functools.partial(ia3, adapter="s")),
    ])
    data = strategy.to_dict()
    assert data["rules"][0] == {"check": {"regex": "c1"}, "action": {"pass": "dora", "options": {"r": 2, "adapter": "d"}}}
    assert [r["check"] for r in data["rules"]][1:] == [{"type": "Conv2d"}, {"names": ["fc"]}, "*"]
    again = fxtune.Strategy.from_dict(json.loads(json.dumps(data)))
    assert again.to_dict() == data
    strategy.to_json(str(tmp_path / "p.json"))
    from_file = fxtune.Strategy.from_json(str(tmp_path / "p.json"))
    assert from_file.to_dict() == data
    gm = traced()
    results = []
    for s in (strategy, again, from_file):
        torch.manual_seed(5)
        results.append(s(gm))
    assert_same_module(results[0], results[1])
    assert_same_module(results[0], results[2])


def test_python_only_checks_and_actions_work_but_refuse_to_dict(tmp_path):
    gm = traced()
    by_predicate = fxtune.Strategy([(lambda site: site.is_conv, functools.partial(lora, r=2))])
    out = by_predicate(gm)
    assert fxtune.adapters(out)[0].sites == ("c1", "c2")
    with pytest.raises(fxtune.SelectionError, match="rule 0: the check <lambda> is Python code"):
        by_predicate.to_dict()
    with pytest.raises(fxtune.SelectionError):
        by_predicate.to_json(str(tmp_path / "p.json"))
    assert not (tmp_path / "p.json").exists()
    by_lambda = fxtune.Strategy([("fc", lambda g, targets: ia3(g, targets=targets))])
    assert fxtune.adapters(by_lambda(gm))[0].sites == ("fc",)
    with pytest.raises(fxtune.AdapterError, match="not a pass of fxtune.passes"):
        by_lambda.to_dict()
    with pytest.raises(fxtune.AdapterError, match=r"options \['r'\] of lora are not plain data"):
        fxtune.Strategy([("fc", functools.partial(lora, r=lambda s: 2))]).to_dict()
    with pytest.raises(fxtune.SelectionError, match="only the module types"):
        fxtune.Strategy([(nn.modules.linear.NonDynamicallyQuantizableLinear, lora)]).to_dict()


def test_mixing_kinds_under_one_adapter_name_lets_the_pass_explain():
    strategy = fxtune.Strategy([("c*", functools.partial(lora, r=2)), ("*", ia3)])
    with pytest.raises(fxtune.AdapterError, match="Give the ia3 adapter another name"):
        strategy(traced())


@pytest.mark.parametrize(
    "plan, error, message",
    [
        ({"rules": [{"check": "fc", "action": {"pass": "os.system"}}]}, fxtune.AdapterError, "unknown pass 'os.system'"),
        ({"rules": [{"check": "fc", "action": {"pass": "__import__"}}]}, fxtune.AdapterError, "a strategy can name any of"),
        ({"rules": [{"check": {"type": "BatchNorm2d"}, "action": {"pass": "lora"}}]}, fxtune.SelectionError, "'type' must be one of"),
        ({"rules": [{"check": {"regex": "("}, "action": {"pass": "lora"}}]}, fxtune.SelectionError, "invalid regex"),
        ({"rules": [{"check": "fc", "action": {"pass": "lora", "options": {"targets": "x"}}}]}, fxtune.AdapterError, "drop targets="),
        ({"rules": [{"check": "fc", "action": {"pass": "fuse"}}]}, fxtune.AdapterError, "fuse takes no targets="),
        ({"rules": [{"check": "fc", "action": {"pass": "lora", "option": {}}}]}, fxtune.FxtuneError, "rule 0: expected"),
        ({"rules": [7]}, fxtune.FxtuneError, "rule 0: expected"),
        ({"rule": []}, fxtune.FxtuneError, "needs a 'rules' list"),
        ({"format": "other", "rules": []}, fxtune.FxtuneError, "not an fxtune strategy"),
    ],
)
def test_bad_plans_are_refused_with_fxtune_errors(plan, error, message):
    with pytest.raises(error, match=re.escape(message)):
        fxtune.Strategy.from_dict(plan)


def test_bad_json_file_and_strategy_in_a_pipeline(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{rules: ")
    with pytest.raises(fxtune.FxtuneError, match="is not valid JSON"):
        fxtune.Strategy.from_json(str(bad))
    gm = traced()
    fused = fxtune.Pipeline([fxtune.Strategy([("fc", functools.partial(lora, r=2))]), fuse]).run(gm)
    assert fused.code == gm.code
