"""`fxtune demo`: the main job end to end on resnet18, with labels that say what each step shows.

Trace, add LoRA, train a few steps, fuse, verify fused == unfused, show the code diff.
The model has random weights and the data is one synthetic batch: it shows the mechanics
(and that the model can fit), not accuracy on a real task.
"""

from __future__ import annotations

import time

import torch
import torchvision

from ..compose.registry import get_pass
from ..frontends.trace import trace
from ..inspection import diff, summary, trainable_parameters


def _step(title: str) -> None:
    print(f"\n== {title}")


def run_demo(steps: int = 8, seed: int = 0) -> None:
    """Runs the demo and raises if fusion does not reproduce the adapted model."""
    lora, fuse = get_pass("lora"), get_pass("fuse")
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(16, 3, 64, 64)
    labels = torch.randint(0, 10, (16,))

    _step("1. trace: resnet18 (random weights, nothing downloaded) -> GraphModule")
    traced = trace(model)
    print(f"{len(traced.graph.nodes)} graph nodes; output equals the model's: "
          f"{torch.equal(traced.eval()(images), model.eval()(images))}")

    _step("2. lora(r=8) on layer3, layer4 and fc; the table is fxtune.summary(gm)")
    start = time.perf_counter()
    gm = lora(traced, targets=lambda s: s.name.startswith(("layer3", "layer4", "fc")), r=8)
    print(summary(gm))
    print(f"(pass took {time.perf_counter() - start:.2f} s)")

    _step("3. the generated code of one adapted site (fxtune.diff of traced -> adapted, first hunk)")
    print("\n".join(diff(traced, gm).splitlines()[:14]))

    _step(f"4. {steps} AdamW steps on one fixed synthetic batch (shows the adapters learn; not accuracy)")
    gm.train()
    opt = torch.optim.AdamW(trainable_parameters(gm), lr=3e-3)
    for i in range(steps):
        loss = torch.nn.functional.cross_entropy(gm(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {i + 1}: loss {loss.item():.4f}")

    _step("5. fuse: fold adapters into new constant weights; compare on the batch (eval mode)")
    gm.eval()
    fused = fuse(gm)
    with torch.no_grad():
        unfused_out, fused_out = gm(images), fused(images)
    err = (fused_out - unfused_out).abs().max().item()
    scale = unfused_out.abs().max().item()
    print(f"max |fused - unfused| = {err:.3g} (outputs up to {scale:.3g}); float32 round-off, not a difference in math")
    if err > 1e-4 * max(scale, 1.0):
        raise RuntimeError(f"fused model differs from the adapted one by {err}")

    _step("6. fxtune.diff(traced, fused): the fused code is the traced code")
    print(diff(traced, fused) or "(no difference: same code, only weight values changed)")
    changed = [k for k, v in fused.state_dict().items() if not torch.equal(v, before[k])]
    weights = [k for k in changed if k.endswith(".weight")]
    print(f"new values in {len(weights)} weights (the adapted sites: {', '.join(weights[:2])}, ...) and "
          f"{len(changed) - len(weights)} BatchNorm buffers (running statistics updated by training in train mode)")
    print(f"state_dict keys and shapes equal the model's: {set(fused.state_dict()) == set(before)}")

    _step("7. the user's model was never written")
    untouched = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    print(f"every parameter and buffer of `model` bit-identical to before: {untouched}")
    if not untouched:
        raise RuntimeError("the user's model was modified")
    model.load_state_dict(fused.state_dict())
    with torch.no_grad():
        same = torch.allclose(model.eval()(images), fused_out, atol=1e-5)
    print(f"model.load_state_dict(fused.state_dict()) gives the fused outputs in the user's own class: {same}")
