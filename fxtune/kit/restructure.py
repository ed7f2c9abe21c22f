"""Structural edits: replace a call site's module by a chain of new modules, and its call by a chain of calls.

Structural passes (low-rank factorization, channel pruning) change which modules a graph calls
rather than adding adapters. They work on their own copy of `gm`, as adapter passes do:

    rs = Restructure(gm, name="low_rank")
    for target, sites in rs.select(targets, exclude=exclude).items():
        rs.replace(target, [first, second], trainable=["0.weight", "1.weight"])
    return rs.finish()

`fc = self.fc(x)` then reads `fc_0 = getattr(self.fc, "0")(x); fc = getattr(self.fc, "1")(fc_0)`
(the last call keeps the node's name, so a diff shows exactly the new calls): `fc` is an
`nn.Sequential` of the new modules, which are ordinary modules (and call sites) again.
Every new call node carries `node.meta["fxtune_structure"]` (pass, site, index, and the pass's
own notes). Parameters a structural pass makes trainable are listed by qualified name in
`gm.meta["fxtune_trainable"]`, which `fxtune.trainable_parameters` reads; a later structural pass
keeps them trainable, on copies, so training its result leaves its input's tensors as they were.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

from torch import fx, nn

from ..adapter.forms import opaque_reason
from ..adapter.slots import slots_on
from ..errors import StructureError, warn
from ..graph.ownership import TRAINABLE, replace_submodule, trainable_names
from ..graph.selection import Selector
from ..graph.sites import Site
from .working_copy import WorkingCopy

STRUCTURE_META = "fxtune_structure"


def _why_not(group: list[Site], kinds: tuple[str, ...], path: str) -> str | None:
    """Why a structural pass cannot replace the module (at `path`) behind these sites, if so."""
    site = group[0]
    if site.layer not in kinds:
        return f"a {site.layer} site; this pass rebuilds {', '.join(kinds)} sites only"
    if site.call == "mha":
        return "a projection inside nn.MultiheadAttention, not a module call"
    if site.call == "opaque":
        return f"its module is called as a whole and not as the plain op ({opaque_reason(site)})"
    direct = sorted({s.use_ref.path for s in group if s.call != "module" or s.use_ref.owner != path})
    if direct:
        return (f"the graph reads {direct} directly, not only through calls of '{site.weight_name}'; replacing the "
                "module would break those reads")
    return None


class Restructure(WorkingCopy):
    """A pass's own copy of `gm` (input untouched, base frozen) on which modules are replaced by chains."""

    error = StructureError

    def __init__(self, gm: fx.GraphModule, *, name: str):
        super().__init__(gm)
        self._keep_trainable(gm)
        self.name = name
        self.replaced: list[str] = []

    def select(
        self,
        targets: Selector = None,
        *,
        exclude: Selector = None,
        kinds: Iterable[str] = ("linear", "conv1d", "conv2d", "conv3d"),
        where: Callable[[list[Site]], bool] | None = None,
    ) -> dict[str, list[Site]]:
        """Chosen sites grouped by module path; a module called several times comes whole or not at all.

        `where(group)` narrows the candidates (e.g. "followed by a BatchNorm"): groups it rejects
        are left out silently. A chosen site carrying adapters is a StructureError either way.

        Only modules whose weight the graph uses through calls of the module, of the site `kinds`
        the pass can rebuild, can be replaced; naming another site is a StructureError naming it.
        With targets=None ("every site") such sites are left as they are, with a FxtuneWarning.
        """
        chosen = super().select(targets, exclude=exclude)
        for target in chosen:
            self._check_adapters(target)
        if where is not None:
            chosen = {t: group for t, group in chosen.items() if where(group)}
        refused = {t: _why_not(group, tuple(kinds), self.module_path(t)) for t, group in chosen.items()}
        refused = {t: why for t, why in refused.items() if why}
        listing = "\n  ".join(f"'{t}': {why}" for t, why in refused.items())
        if refused and targets is None and len(refused) < len(chosen):
            warn(f"{self.name} leaves {len(refused)} site(s) it cannot replace as they are:\n  {listing}")
            return {t: group for t, group in chosen.items() if t not in refused}
        if refused:
            raise StructureError(
                f"{self.name} cannot replace these selected sites:\n  {listing}\nExclude them, e.g. "
                f"exclude={sorted(refused)[:3]!r} (or exclude=nn.MultiheadAttention for attention projections)"
            )
        return chosen

    def replace(
        self,
        target: str,
        modules: Sequence[nn.Module],
        *,
        trainable: Iterable[str] = (),
        meta: dict[str, Any] | None = None,
    ) -> list[fx.Node]:
        """Puts `nn.Sequential(*modules)` at `target` and turns every call of it into a chain of calls.

        `trainable` names parameters relative to the sequence (`"0.weight"`); they get
        requires_grad=True and are listed for `trainable_parameters`, all other new ones are frozen.
        Returns the new call nodes (every call's chain, in graph order).
        """
        weight, target = target, self.module_path(target)
        self._check(weight, target)
        if not modules:
            raise StructureError(f"replacing '{weight}' needs at least one module, got none")
        sequence, trainable = nn.Sequential(*modules), set(trainable)
        self._freeze_except(target, sequence, trainable)
        graph = self.gm.graph
        created = []
        for node in [n for n in graph.nodes if n.op == "call_module" and n.target == target]:
            args, kwargs = node.args, node.kwargs
            with graph.inserting_before(node):
                for index in range(len(modules) - 1):
                    new = graph.create_node("call_module", f"{target}.{index}", args, kwargs, name=f"{node.name}_{index}")
                    new.meta[STRUCTURE_META] = {"pass": self.name, "site": target, "index": index, **(meta or {})}
                    args, kwargs = (new,), {}
                    created.append(new)
            node.target, node.args, node.kwargs = f"{target}.{len(modules) - 1}", args, kwargs
            node.meta[STRUCTURE_META] = {"pass": self.name, "site": target, "index": len(modules) - 1, **(meta or {})}
            created.append(node)
        self._install(target, sequence, trainable)
        return created

    def swap(self, target: str, module: nn.Module, *, trainable: Iterable[str] = (), meta: dict[str, Any] | None = None) -> list[fx.Node]:
        """Puts `module` at `target` in place of the site's module; every call keeps its inputs and its name.

        `module` must take the same inputs (e.g. the same conv with a new weight and bias).
        `trainable` names its parameters as in `replace`; returns the call nodes.
        """
        weight, target = target, self.module_path(target)
        self._check(weight, target)
        trainable = set(trainable)
        self._freeze_except(target, module, trainable)
        calls = [n for n in self.gm.graph.nodes if n.op == "call_module" and n.target == target]
        for node in calls:
            node.meta[STRUCTURE_META] = {"pass": self.name, "site": target, "index": 0, **(meta or {})}
        self._install(target, module, trainable)
        return calls

    def bypass(self, node: fx.Node) -> None:
        """Erases `node`, whose users read its first input instead (e.g. a BatchNorm folded into the
        layer before it); a module nothing calls any more leaves the tree."""
        if not node.args or not isinstance(node.args[0], fx.Node):
            raise StructureError(f"cannot bypass '{node.name}': its first input is not a graph value")
        node.replace_all_uses_with(node.args[0])
        self.gm.graph.erase_node(node)
        if node.op == "call_module" and not any(n.op == "call_module" and n.target == node.target for n in self.gm.graph.nodes):
            parent, _, name = node.target.rpartition(".")
            del (self.gm.get_submodule(parent) if parent else self.gm)._modules[name]
        self.forget_sites()

    def _freeze_except(self, target: str, module: nn.Module, trainable: set[str]) -> None:
        unknown = trainable - {name for name, _ in module.named_parameters()}
        if unknown:
            raise StructureError(f"replacing '{target}': trainable names {sorted(unknown)} are not parameters of the new modules")
        for name, param in module.named_parameters():
            param.requires_grad_(name in trainable)

    def _install(self, target: str, module: nn.Module, trainable: set[str]) -> None:
        replace_submodule(self.gm, target, module)
        kept = [n for n in trainable_names(self.gm) if n != target and not n.startswith(target + ".")]
        self.gm.meta[TRAINABLE] = tuple(kept + sorted(f"{target}.{n}" for n in trainable))
        self.replaced.append(target)
        self.forget_sites()

    def _keep_trainable(self, source: fx.GraphModule) -> None:
        """Earlier structural passes' trainable parameters (the clone froze them) train on, as copies."""
        training = {name for name, p in source.named_parameters() if p.requires_grad}
        kept = [name for name in trainable_names(self.gm) if name in training]
        for name in kept:
            owner, _, attr = name.rpartition(".")
            module = self.gm.get_submodule(owner) if owner else self.gm
            module._parameters[attr] = nn.Parameter(module._parameters[attr].detach().clone())
        self.gm.meta[TRAINABLE] = tuple(kept)

    def _check_adapters(self, target: str) -> None:
        if slots_on(self.gm, target, active_only=False):
            raise StructureError(
                f"'{target}' carries adapters {[s.adapter for s in slots_on(self.gm, target, active_only=False)]}; "
                f"{self.name} would orphan them. Run fuse(gm) first, or exclude this site"
            )

    def _check(self, weight: str, target: str) -> None:
        """Refuses modules (at module path `target`, of weight `weight`) whose meaning other parts of the graph depend on."""
        self._check_adapters(weight)
        nodes = self.gm.graph.nodes
        if not any(n.op == "call_module" and n.target == target for n in nodes):
            raise StructureError(f"'{target}' is not called as a module in the graph, so its calls cannot be replaced")
        direct = sorted({n.target for n in nodes if n.op == "get_attr" and n.target.startswith(target + ".")})
        if direct:
            raise StructureError(
                f"the graph reads {direct} directly, not only through calls of '{target}'; replacing the "
                "module would break those reads. Exclude this site"
            )
