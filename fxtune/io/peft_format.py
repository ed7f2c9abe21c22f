"""PEFT's adapter format: the rules every PEFT tuner shares, and `PeftFormat`, which a kind extends.

A PEFT directory holds adapter_config.json and adapter_model.safetensors, tensors keyed
`base_model.model.<module path>.<tensor name>`. Which modules an adapter covers follows PEFT's
target_modules / exclude_modules rules; per-module values (rank_pattern-style dicts) follow its
pattern rule. What a technique's tensors and settings are it declares itself, with a subclass of
`PeftFormat` given to its kind: `AdapterKind(..., peft=MyPeft())`. Nothing here names a technique.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapter.slots import AdapterSlot
from ..errors import AdapterError
from ..graph.sites import Site

CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
PREFIX = "base_model.model."
FORMS_KEY = "fxtune.forms"  # safetensors metadata PEFT ignores: each site's graph form, so a reload rebuilds the same graph

GENERIC_KEYS = frozenset({"peft_type", "target_modules", "exclude_modules"})  # read here, for every kind
INERT_KEYS = frozenset({  # PeftConfig's bookkeeping: no effect on what an adapter computes
    "auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version",
})
GENERIC_FEATURES = {  # options of many PEFT tuners that no fxtune mapping carries: refused when set
    "modules_to_save": "modules_to_save (full trainable copies of layers)",
    "layers_to_transform": "layers_to_transform", "layers_pattern": "layers_pattern",
}


@dataclass
class PeftModule:
    """One adapted module in PEFT's terms: its tensors by PEFT's name and its own settings (e.g. a rank)."""

    tensors: dict[str, torch.Tensor]
    settings: dict[str, Any] = field(default_factory=dict)


class PeftFormat:
    """How one adapter kind reads and writes PEFT's adapter directories.

    The base class holds PEFT's generic rules (file layout, module matching, per-module patterns,
    refusing what it cannot carry); a kind subclasses it for its own tensors and settings and
    declares an instance on its kind. docs/custom_kinds.md ("PEFT's format") shows a complete one.
    """

    peft_type: str = ""  # adapter_config.json's "peft_type" this kind reads and writes (PEFT's tuner name)
    tensor_names: tuple[str, ...] = ()  # the tensors of one module, as named after `<module path>.` in the file
    config_keys: frozenset[str] = frozenset()  # the kind's own config keys that from_peft interprets
    inert_keys: frozenset[str] = frozenset()  # its config keys that do not change what the adapter computes
    feature_names: dict[str, str] = {}  # readable names of its options that fxtune cannot carry (refused when set)

    # ------------------------------------------------------------------ what a kind declares

    def site_problem(self, site: Site) -> str | None:
        """Why this kind's PEFT layer on the module of `site` would compute something else, if it would."""
        return None

    def config_problems(self, config: dict) -> list[str]:
        """Values of the kind's own config keys that fxtune cannot load (each a readable phrase)."""
        return []

    def to_peft(self, slot: AdapterSlot, site: Site) -> PeftModule:
        """One slot as PEFT's tensors (named as in `tensor_names`) and its per-module settings."""
        raise AdapterError(f"{type(self).__name__} (the PEFT mapping of '{slot.kind}') writes no PEFT files; save with format='fxtune'")

    def adapter_config(self, modules: dict[str, PeftModule], module_names: list[str]) -> dict:
        """The kind's own adapter_config.json keys for these modules (`module_names`: every module
        path of the model, for pattern keys). Raise AdapterError for what one config cannot hold."""
        return {}

    def from_peft(self, module: str, site: Site, tensors: dict[str, torch.Tensor], config: dict) -> dict | str:
        """The `Rewrite.attach` arguments (params, buffers, config) re-creating PEFT's layer at
        `module`, whose tensors are `tensors` (every name in `tensor_names`); or why it cannot."""
        raise AdapterError(f"{type(self).__name__} reads no PEFT {self.peft_type} files (its from_peft is not defined)")

    def keeps_replaced_base(self, slot: AdapterSlot) -> bool:
        """Whether `to_peft` accounts for this slot having replaced its base weight (PEFT never does)."""
        return False

    # ------------------------------------------------------------------ PEFT's rules, for kinds to use

    @staticmethod
    def pattern_value(patterns: dict | None, module: str, default: Any) -> Any:
        """The value of the first key of a rank_pattern-style dict that hits `module` (PEFT's order:
        the key as a regex matching a whole trailing part of the path), else `default`."""
        for key, value in (patterns or {}).items():
            if _pattern_hits(key, module):
                return value
        return default

    @staticmethod
    def per_module(values: dict[str, Any], module_names: list[str]) -> tuple[Any, dict[str, Any]]:
        """(the most common value, {pattern key: value} for the modules that differ from it): how
        PEFT writes a per-module setting as a default plus a rank_pattern-style dict."""
        default = Counter(values.values()).most_common(1)[0][0]
        return default, {_unique_key(m, module_names): v for m, v in values.items() if v != default}

    @staticmethod
    def one_value(modules: dict[str, PeftModule], key: str) -> Any:
        """The setting `key` that every module shares (PEFT has one per adapter); AdapterError if they differ."""
        values = {repr(m.settings[key]): m.settings[key] for m in modules.values()}
        if len(values) > 1:
            raise AdapterError(f"{key} differs between sites ({sorted(values)}); PEFT has one {key} per adapter")
        return next(iter(values.values()))


# ----------------------------------------------------------------------------- module matching


def _pattern_hits(key: str, name: str) -> bool:
    """PEFT's get_pattern_key test: `(.*\\.)?(key)$` matched at the start of the module path."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def _unique_key(name: str, names: list[str]) -> str:
    """`name` itself as a pattern key if it hits only that module; else an anchored regex."""
    if not any(_pattern_hits(name, other) for other in names if other != name):
        return name
    return "^" + re.escape(name)


def peft_selects(config: dict, name: str) -> bool:
    """Whether PEFT would adapt the module at `name`: its check_target_module_exists rules (exclude
    first; a string is a regex full match, a list matches exactly or as a '.'-suffix)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, name):
                return False
        elif name in exclude or any(name.endswith(f".{e}") for e in exclude):
            return False
    targets = config["target_modules"]
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith(f".{t}") for t in targets)


def is_linear_module(module: nn.Module) -> bool:
    """What PEFT's "all-linear" counts: nn.Linear and transformers' Conv1D (recognised by name)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def target_modules(chosen: list[str], names: list[str]) -> list[str] | str:
    """target_modules for exactly `chosen`: the paths as a list, or one full-match regex if a path
    is also a '.'-suffix of a module that is not chosen."""
    wanted = set(chosen)
    if not any(other.endswith(f".{t}") for t in chosen for other in names if other not in wanted):
        return list(chosen)
    return "(?:" + "|".join(re.escape(t) for t in chosen) + ")"
