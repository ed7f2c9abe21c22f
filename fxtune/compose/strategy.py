"""Strategies (GIFt-style): ordered (check, action) rules; every site goes to the first rule that matches it.

    plan = fxtune.Strategy([
        ("layer4.*", functools.partial(lora, r=16)),            # glob, regex, names, type or predicate
        (nn.Conv2d, (ia3, {"adapter": "scales"})),               # another kind needs another adapter name
        ({"regex": r"fc|head"}, ("lora", {"r": 4})),             # a registered pass's name
    ])
    gm = plan(fxtune.trace(model))                                # or plan.apply(gm); a Strategy is a pass

Each rule's action is called once, as `action(gm, targets=[the sites it won])`. A plan made of
data (glob, {"regex"} (full match), {"names"}, {"type"} checks; {"pass", "options"} actions) converts
to and from a dict or JSON file; nothing is evaluated or unpickled, pass names are looked up in the
pass registry (fxtune's passes and any registered with `fxtune.register_pass`).
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from typing import Any, Callable, Iterable

from torch import fx, nn

from ..errors import AdapterError, FxtuneError, SelectionError
from ..graph.parts import is_parted, parted_sites
from ..graph.selection import Selector, listing, matches, show, sites
from .registry import get_pass, name_of, pass_names

FORMAT, FORMAT_VERSION = "fxtune.strategy", 1
TYPES: dict[str, type] = {
    "Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d, "Embedding": nn.Embedding,
    "MultiheadAttention": nn.MultiheadAttention,
}
_CHECK_KEYS = ("regex", "names", "type")


def _pass_named(name: Any) -> Callable:
    try:
        return get_pass(name)
    except FxtuneError:
        raise AdapterError(f"unknown pass {name!r}; a strategy can name any of: {', '.join(pass_names())} "
                           "(fxtune.passes, and passes registered with fxtune.register_pass)") from None


def _check_from_data(data: Any, where: str) -> Selector:
    """A check from its data form: a glob string, {"regex": ...}, {"names": [...]} or {"type": "Linear"}."""
    if isinstance(data, str):
        return data
    if not isinstance(data, dict) or len(data) != 1 or next(iter(data)) not in _CHECK_KEYS:
        raise SelectionError(f"{where}: a check is a glob string or one of {{'regex': ...}}, {{'names': [...]}}, {{'type': ...}}; got {data!r}")
    key, value = next(iter(data.items()))
    if key == "regex":
        if not isinstance(value, str):
            raise SelectionError(f"{where}: 'regex' must be a string, got {value!r}")
        try:
            return re.compile(value)
        except re.error as e:
            raise SelectionError(f"{where}: invalid regex {value!r}: {e}") from None
    if key == "names":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SelectionError(f"{where}: 'names' must be a list of site names, got {value!r}")
        return list(value)
    if value not in TYPES:
        raise SelectionError(f"{where}: 'type' must be one of {sorted(TYPES)}, got {value!r}")
    return TYPES[value]


def _check_to_data(check: Selector, where: str) -> Any:
    if check is None:
        return "*"
    if isinstance(check, str):
        return check
    if isinstance(check, re.Pattern):
        if check.flags & ~re.UNICODE:
            raise SelectionError(f"{where}: a regex with flags cannot be saved as data; write the flags inline, e.g. '(?i)...'")
        return {"regex": check.pattern}
    if isinstance(check, type):
        if TYPES.get(check.__name__) is not check:
            raise SelectionError(f"{where}: only the module types {sorted(TYPES)} can be saved as data, not {check.__qualname__}")
        return {"type": check.__name__}
    if isinstance(check, (list, tuple)):
        return {"names": list(check)}
    raise SelectionError(
        f"{where}: the check {show(check)} is Python code and cannot be saved as data; use a glob string, "
        "{'regex': ...}, {'names': [...]} or {'type': 'Linear'} instead"
    )


def _plain_data(value: Any) -> bool:
    """Whether a pass option survives JSON as it is: None, bool, numbers, str, lists and str-keyed dicts."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(map(_plain_data, value))
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_data(v) for k, v in value.items())
    return False


class Rule:
    """One (check, action) pair; the action is kept as a function plus its options when it has that form."""

    def __init__(self, check: Any, action: Any, index: int):
        self.where = f"rule {index}"
        if isinstance(check, (set, frozenset)):
            check = sorted(check)
        self.check = _check_from_data(check, self.where) if isinstance(check, dict) else check
        if not (self.check is None or isinstance(self.check, (str, re.Pattern, type, list, tuple)) or callable(self.check)):
            raise SelectionError(f"{self.where}: cannot use {check!r} as a check (a glob, regex, list of names, module type or predicate)")
        if isinstance(action, functools.partial) and not action.args:
            fn, options = action.func, dict(action.keywords)
        elif isinstance(action, (tuple, list)) and len(action) == 2 and isinstance(action[1], dict):
            fn, options = action[0], dict(action[1])
        else:
            fn, options = action, {}
        self.fn = _pass_named(fn) if isinstance(fn, str) else fn
        self.options = options
        if not callable(self.fn):
            raise AdapterError(f"{self.where}: the action {action!r} is not a pass (a callable, a pass name or a (pass, options) pair)")
        if "targets" in options:
            raise AdapterError(f"{self.where}: drop targets= from the action's options; the strategy gives each rule the sites it won")
        try:
            params = inspect.signature(self.fn).parameters.values()
        except (TypeError, ValueError):
            params = None
        if params is not None and not any(p.name == "targets" or p.kind is p.VAR_KEYWORD for p in params):
            raise AdapterError(f"{self.where}: {_label(self.fn)} takes no targets=, so it cannot act on the sites a rule wins")

    def to_dict(self) -> dict:
        name = name_of(self.fn)
        if name is None:
            raise AdapterError(
                f"{self.where}: the action {_label(self.fn)} is not a pass of fxtune.passes nor one registered with "
                "fxtune.register_pass(fn), so it cannot be saved as data; register it, or use functools.partial(<pass>, ...)"
            )
        bad = sorted(k for k, v in self.options.items() if not _plain_data(v))
        if bad:
            raise AdapterError(f"{self.where}: options {bad} of {name} are not plain data (numbers, strings, lists, dicts); they cannot be saved")
        return {"check": _check_to_data(self.check, self.where), "action": {"pass": name, "options": self.options}}

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"({show(self.check)}, {_label(self.fn)}({options}))"


def _label(fn: Callable) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


class Strategy:
    """Ordered (check, action) rules; first match wins per site; usable as a pass: `strategy(gm)`.

    One named adapter is one kind: rules that add different kinds need different `adapter=` names,
    e.g. `[("layer4.*", partial(lora, r=8)), (nn.Conv2d, partial(ia3, adapter="scales"))]`.
    """

    def __init__(self, rules: Iterable[tuple[Any, Any]]):
        rules = list(rules)
        if not rules:
            raise FxtuneError("a Strategy needs at least one (check, action) rule")
        for i, rule in enumerate(rules):
            if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
                raise FxtuneError(f"rule {i} should be a (check, action) pair, got {rule!r}")
        self.rules = [Rule(check, action, i) for i, (check, action) in enumerate(rules)]

    def plan(self, gm: fx.GraphModule) -> list[list[str]]:
        """The site names each rule wins on gm (first match wins; a later rule never sees a taken site)."""
        found = parted_sites(gm) if is_parted(gm) else sites(gm)
        names = {s.name for s in found}
        won, taken = [], set()
        for rule in self.rules:
            if isinstance(rule.check, (list, tuple)):
                unknown = [n for n in rule.check if n not in names]
                if unknown:
                    raise SelectionError(f"{rule.where} names no site: {unknown}. Available sites: {listing(sorted(names))}")
            mine = [s.name for s in found if s.name not in taken and matches(s, rule.check)]
            taken.update(mine)
            won.append(mine)
        if not taken:
            checks = ", ".join(show(r.check) for r in self.rules)
            raise SelectionError(f"no rule of this strategy matches any site (checks: {checks}). Available sites: {listing([s.name for s in found])}")
        return won

    def apply(self, gm: fx.GraphModule) -> fx.GraphModule:
        """Calls each rule's action once with `targets=` the sites it won; returns the new GraphModule."""
        for rule, names in zip(self.rules, self.plan(gm)):
            if names:
                gm = rule.fn(gm, targets=names, **rule.options)
        return gm

    __call__ = apply

    def to_dict(self) -> dict:
        """The plan as JSON-able data; raises for a check or action that is Python code (e.g. a lambda)."""
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "rules": [r.to_dict() for r in self.rules]}

    @classmethod
    def from_dict(cls, data: dict) -> "Strategy":
        """A Strategy from `to_dict`'s form; pass names must be registered (fxtune's passes or `register_pass`)."""
        if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
            raise FxtuneError("a strategy dict needs a 'rules' list of {'check': ..., 'action': {'pass': ..., 'options': {...}}}")
        if data.get("format", FORMAT) != FORMAT or data.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise FxtuneError(f"not an fxtune strategy (format {data.get('format')!r} v{data.get('format_version')!r})")
        rules = []
        for i, rule in enumerate(data["rules"]):
            action = rule.get("action") if isinstance(rule, dict) else None
            if not isinstance(action, dict) or set(rule) != {"check", "action"} or not set(action) <= {"pass", "options"}:
                raise FxtuneError(f"rule {i}: expected {{'check': ..., 'action': {{'pass': name, 'options': {{...}}}}}}, got {rule!r}")
            options = action.get("options", {})
            if not isinstance(options, dict):
                raise FxtuneError(f"rule {i}: 'options' must be a dict, got {options!r}")
            rules.append((_check_from_data(rule["check"], f"rule {i}"), (_pass_named(action.get("pass")), options)))
        return cls(rules)

    def to_json(self, path: str) -> None:
        """Writes `to_dict()` as JSON (nothing is written if the plan cannot be expressed as data)."""
        text = json.dumps(self.to_dict(), indent=2)
        with open(path, "w") as f:
            f.write(text + "\n")

    @classmethod
    def from_json(cls, path: str) -> "Strategy":
        """Reads a plan written by `to_json` (or by hand)."""
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise FxtuneError(f"{path!r} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def __repr__(self) -> str:
        return "Strategy([" + ", ".join(map(repr, self.rules)) + "])"
