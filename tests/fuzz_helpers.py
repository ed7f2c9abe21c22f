"""The fuzz tests' chain runner: applies drawn operations to a GraphModule and checks every step.

After every operation fxtune accepts: the new GraphModule's output matches the float64 reference
built from its adapter slots, and the GraphModule it was given still computes exactly what it did
(passes and lifecycle calls leave their input usable). An operation fxtune refuses must raise an
`fxtune.FxtuneError`; any other exception escapes and fails the test. At the end, `fuse` must give
the adapted output and the traced code, and the user's models and input must be bit-identical.
"""

from __future__ import annotations

import os
import tempfile
import warnings

import torch
from hypothesis import assume
from hypothesis import strategies as st
from torch import fx, nn

import fxtune
from fxtune import passes
from fuzz_nets import NetSpec, build, example_input
from fuzz_ops import Op, adapter_kinds, draw_adapter_pass, draw_lifecycle, draw_structural
from fuzz_reference import adapter_slots, locate, reference_output, relative_error

# (vs the float64 reference, two computations of one adapted model) relative to the output's max |value|,
# for float32 and float64 models: a float64 model computed in float32 anywhere fails the second.
TOLERANCES = {"float32": (1e-4, 2e-6), "float64": (1e-9, 1e-12)}


def snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    return {k: (v.detach().clone(), v.requires_grad) for k, v in model.state_dict(keep_vars=True).items()}


def assert_unchanged(model: nn.Module, snap: dict, what: str) -> None:
    now = model.state_dict(keep_vars=True)
    assert now.keys() == snap.keys(), f"{what}: its state_dict keys changed"
    for k, (value, grad) in snap.items():
        assert torch.equal(now[k].detach(), value), f"{what}: '{k}' changed"
        assert now[k].requires_grad == grad, f"{what}: requires_grad of '{k}' changed"


def perturb(gm: fx.GraphModule, seed: int) -> None:
    """Moves every adapter parameter away from its (often identity) init with seeded noise, in place."""
    names = {id(p): n for n, p in gm.named_parameters()}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fxtune.trainable_parameters(gm):
            if not names[id(p)].startswith("fxtune."):
                continue  # structural factors stay as the reference's base has them
            rms = float(p.pow(2).mean().sqrt())
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.3 * rms if rms > 1e-3 else 0.2))


class Chain:
    """One example: a model, its traced GraphModule, and the state the checks need."""

    def __init__(self, spec: NetSpec, seed: int):
        self.spec, self.seed = spec, seed
        self.tol, self.repeat_tol = TOLERANCES[spec.dtype]
        self.model = build(spec, seed)
        self.x = example_input(spec, seed)
        self.x_before = self.x.clone()
        self.models = {"the user's model": self.model}
        self.snapshots = {"the user's model": snapshot(self.model)}
        self.base: nn.Module = self.model  # what the reference runs: the model, a swapped-in one, or the structural gm
        self.structural: fx.GraphModule | None = None
        self.gm = fxtune.trace(self.model)
        self.out = self.gm(self.x)
        self.log: list[str] = []
        self.refused: list[tuple[str, str]] = []
        self.perturbs = 0
        err = relative_error(self.out, self.model(self.x))
        assert err < self.repeat_tol, f"traced output differs from the model's by {err:.1e}"

    # -- running one operation ------------------------------------------------------------------

    def where(self) -> str:
        return "after " + " -> ".join(self.log or ["trace"])

    def attempt(self, label: str, fn) -> fx.GraphModule | None:
        """fn(gm), or None if fxtune refused it with its own error; checks the input gm still works."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                new = fn(self.gm)
        except fxtune.FxtuneError as e:
            self.refused.append((label, f"{type(e).__name__}: {e}"))
            new = None
        except Exception as e:  # a raw exception from inside fxtune: a bug; say where the chain was
            e.add_note(f"raised by {label}, {self.where()}")
            raise
        again = self.gm(self.x)
        assert torch.equal(again, self.out), f"{label} changed the output of the GraphModule it was given ({self.where()})"
        return new

    def accept(self, label: str, new: fx.GraphModule) -> None:
        self.log.append(label)
        self.gm = new
        try:
            self.out = new(self.x)
        except Exception as e:
            e.add_note(f"raised by the forward {self.where()}")
            raise
        self.check_reference()

    def check_reference(self) -> None:
        ref, amplification = reference_output(self.base, self.gm, self.x)
        err = relative_error(self.out, ref)
        assert err < self.tol * amplification, f"adapted output vs float64 reference: relative error {err:.2e} {self.where()}"

    def apply(self, op: Op) -> bool:
        new = self.attempt(op.label, op.run)
        if new is None:
            return False
        if op.effect == "adapter" and self.starts_as_identity(op, new):
            err = relative_error(new(self.x), self.out)
            assert err < self.tol, f"{op.label} changed the output at init by {err:.1e} ({self.where()})"
        if op.effect == "adapter":
            self.perturbs += 1
            perturb(new, self.seed * 1000 + self.perturbs)
        self.accept(op.label, new)
        return True

    def starts_as_identity(self, op: Op, new: fx.GraphModule) -> bool:
        """Whether the adapters `op` added leave the output as it was until trained: every kind but the
        SP ones (their masks prune, their factors start small but non-zero). Kinds that derive tensors from
        the weight (DoRA, PiSSA, SVDiff, train_module) derive them from the weight as it reaches them."""
        return op.kind not in ("sp_lora", "sp_para", "sp_lopa")

    # -- the example ----------------------------------------------------------------------------

    def structural_prefix(self, data) -> None:
        ops = draw_structural(data, self.gm, has_bn=self.spec.has_bn)
        for op in ops:
            new = self.attempt(op.label, op.run)
            if new is None:
                continue
            self.log.append(op.label)
            self.gm, self.out = new, new(self.x)
        if self.log:
            self.structural = self.base = self.gm
            if all(label == "fold_bn()" for label in self.log):  # exact up to rounding: BN folded with its statistics
                err = relative_error(self.out, self.model(self.x))
                assert err < self.tol, f"fold_bn changed the output by {err:.2e}"

    def lifecycle(self, what: str, arg) -> None:
        """Performs one drawn lifecycle call and checks it like any other operation."""
        if what == "fuse_check":
            self.fuse_check(arg)
            return
        if what == "swap_base":
            other = build(self.spec, self.seed + 7919)
            self.models["the swapped-in model"] = other
            self.snapshots["the swapped-in model"] = snapshot(other)
            label, run = "swap_base(<same network, other init>)", lambda g: fxtune.swap_base(g, other)
        elif what == "save_load":
            label, run = f"save_adapters(format={arg[1]!r}) -> load_adapters({arg[0]})", self.save_load(*arg)
        else:
            label, run = {
                "merge": (f"merge({arg})", lambda g: fxtune.merge(g, arg)),
                "unmerge": ("unmerge()", fxtune.unmerge),
                "set_active": (f"set_active({arg})", lambda g: fxtune.set_active(g, arg)),
                "delete": (f"delete_adapter({arg!r})", lambda g: fxtune.delete_adapter(g, arg)),
                "unload": ("unload()", fxtune.unload),
            }[what]
        new = self.attempt(label, run)
        if new is None:
            return
        if what == "swap_base":
            self.base = other
        if what == "save_load":
            self.check_reload(*arg, new)
        slots = adapter_slots(self.gm)
        inactive = {s.adapter for s in slots if not s.active}
        if what == "merge" and not any(s.merged for s in slots) and not inactive & set(arg or ()):
            again = fxtune.unmerge(new)(self.x)  # the kept weights come back: the same bits
            assert torch.equal(again, self.out), f"unmerge right after {label} changed the output ({self.where()})"
        self.accept(label, new)

    def save_load(self, names: list[str], format: str):
        """A call saving the named adapters and loading them (in order) onto a fresh trace of the same base."""
        active = {s.adapter for s in adapter_slots(self.gm) if s.active}

        def run(gm: fx.GraphModule) -> fx.GraphModule:
            with tempfile.TemporaryDirectory() as tmp:
                for name in names:
                    fxtune.save_adapters(gm, os.path.join(tmp, name), adapter=name, format=format)
                fresh = self.structural if self.structural is not None else fxtune.trace(self.base)
                for name in names:
                    fresh = fxtune.load_adapters(fresh, os.path.join(tmp, name), adapter=name)
            if any(n not in active for n in names):
                fresh = fxtune.set_active(fresh, [n for n in names if n in active])
            return fresh

        return run

    def check_reload(self, names: list[str], format: str, new: fx.GraphModule) -> None:
        """Reloading every adapter reproduces the outputs (bit-exactly in fxtune's format when nothing was merged)."""
        slots = adapter_slots(self.gm)
        if names != list(adapter_kinds(self.gm)) or not self._order_kept(slots, names):
            return
        y = new(self.x)
        if not any(s.merged for s in slots) and format == "fxtune":
            assert torch.equal(y, self.out), f"reloaded adapters {names} give other outputs ({self.where()})"
        err = relative_error(y, self.out)
        amplification = reference_output(self.base, self.gm, self.x)[1]
        assert err < self.repeat_tol * amplification, f"reloaded adapters differ by {err:.1e} ({self.where()})"

    @staticmethod
    def _order_kept(slots, names: list[str]) -> bool:
        """Whether loading adapters one by one in `names` order reproduces every weight's composition order."""
        rank = {n: i for i, n in enumerate(names)}
        by_target: dict[str, list[int]] = {}
        for s in slots:
            by_target.setdefault(s.target, []).append(rank[s.adapter])
        return all(order == sorted(order) for order in by_target.values())

    def fuse_check(self, names) -> fx.GraphModule | None:
        """fuse(gm[, names]) matches the unfused output (and the reference) and gives the traced code."""
        fused = self.attempt(f"fuse({names})", lambda g: passes.fuse(g, names))
        if fused is None:
            return None
        chosen = None if names is None else set(names)
        ref, amplification = reference_output(self.base, self.gm, self.x, chosen=chosen)
        y = fused(self.x)
        err = relative_error(y, ref)
        assert err < self.tol * amplification, f"fuse({names}) vs float64 reference: {err:.2e} {self.where()}"
        if names is None:
            err = relative_error(y, self.out)
            assert err < 10 * self.repeat_tol * amplification, f"fused vs unfused output: {err:.2e} {self.where()}"
        assert "fxtune" not in fused._modules, f"fuse left adapters behind {self.where()}"
        expected = self.structural.code if self.structural is not None else fxtune.trace(self.model).code
        assert fused.code == expected, f"fused code is not the traced code {self.where()}:\n{fused.code}"
        return fused

    def finish(self) -> None:
        """The final fuse and the checks on the user's objects."""
        fused = self.fuse_check(None)
        assert fused is not None, f"the final fuse was refused: {self.refused[-1][1]} {self.where()}"
        assert torch.equal(self.x, self.x_before), "the input tensor changed"
        for what, model in self.models.items():
            assert_unchanged(model, self.snapshots[what], what)


def run_chain(data, spec: NetSpec, seed: int, *, max_ops: int = 6) -> Chain:
    """One fuzz example: structural prefix, random adapter passes and lifecycle calls, final fuse."""
    chain = Chain(spec, seed)
    chain.structural_prefix(data)
    for _ in range(data.draw(st.integers(1, max_ops), label="operations")):
        has_adapters = bool(adapter_slots(chain.gm))
        if not has_adapters or data.draw(st.sampled_from([True, True, False]), label="adapter pass"):
            chain.apply(draw_adapter_pass(data, chain.gm))
        else:
            chain.lifecycle(*draw_lifecycle(data, chain.gm, can_swap=chain.structural is None))
    chain.finish()
    return chain
