"""SVDiff: a spectral shift. With W = U·diag(σ)·Vᵀ (per group on a grouped conv), only δ trains:

    W' = U·diag(relu(σ + δ))·Vᵀ,   computed as   W' = W + U·diag(relu(σ + δ) − σ)·Vᵀ.

Both are equal in exact arithmetic; the second keeps the SVD's round-off (W − UΣVᵀ) in W', so
δ = 0 is exactly W (relu(σ) − σ is exactly 0), and an adapter before this one on the same weight
keeps its effect. Measured: with U, σ, Vᵀ from a float64 SVD stored in float32, the two differ
by ‖W − UΣVᵀ‖/‖W‖ = 0.8e-7 to 2.8e-7 (a 10×256 and a 768×768 linear, a 256×256×3×3 and a
grouped 128×16×3×3 conv; max |entry| error ≤ 1.5e-6 of max |W|), a constant shift far below
training noise. The test checks δ = 0 gives exactly the base output.

The matrix is the weight's (out, in/groups·kernel) view; group g is its rows g·out/G to
(g+1)·out/G, with its own SVD and δ: δ is (G, min(out/G, in/G·kernel)). U, σ, Vᵀ are derived
from the weight as traced (before merges; the same on any reload): non-persistent buffers, not
trainable and not in the state_dict. δ = 0 is the identity on whatever the adapters before it make.

After `svdiff(gm, targets="layer4.*")` a site reads:

    layer4_0_conv1_weight = getattr(self.layer4, "0").conv1.weight
    layer4_0_conv1_delta = self.fxtune.default.layer4_0_conv1.delta
    layer4_0_conv1_u = self.fxtune.default.layer4_0_conv1.u
    layer4_0_conv1_sigma = self.fxtune.default.layer4_0_conv1.sigma
    layer4_0_conv1_vh = self.fxtune.default.layer4_0_conv1.vh
    layer4_0_conv1_svdiff_weight = fxtune_passes_svdiff_svdiff_weight(layer4_0_conv1_weight, delta = layer4_0_conv1_delta, u = layer4_0_conv1_u, sigma = layer4_0_conv1_sigma, vh = layer4_0_conv1_vh);  layer4_0_conv1_weight = layer4_0_conv1_delta = layer4_0_conv1_u = layer4_0_conv1_sigma = layer4_0_conv1_vh = None
    layer4_0_conv1 = torch.conv2d(x, layer4_0_conv1_svdiff_weight, None, (1, 1), (1, 1), (1, 1), 1);  x = layer4_0_conv1_svdiff_weight = None
"""

from __future__ import annotations

import torch
from torch import fx

import fxtune
from fxtune import AdapterError, AdapterKind


def svdiff_weight(
    w: torch.Tensor, *, u: torch.Tensor, sigma: torch.Tensor, vh: torch.Tensor, delta: torch.Tensor
) -> torch.Tensor:
    """The meaning: W + U·diag(relu(σ + δ) − σ)·Vᵀ per group, reshaped to W's shape."""
    shift = torch.relu(sigma + delta) - sigma
    return w + ((u * shift.unsqueeze(1)) @ vh).reshape(w.shape)


def _factors(weight: torch.Tensor, groups: int) -> dict[str, torch.Tensor]:
    """U (G, m, r), σ (G, r), Vᵀ (G, r, n) of each group's matrix, from a float64 SVD."""
    matrices = weight.reshape(groups, weight.shape[0] // groups, -1).double()
    u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
    return {"u": u.to(weight.dtype), "sigma": s.to(weight.dtype), "vh": vh.to(weight.dtype)}


def _restore(site: fxtune.Site, weight: torch.Tensor, config: dict, tensors: dict, *, base: torch.Tensor) -> dict:
    """A reloaded adapter's U, σ, Vᵀ: not saved, derived again from the weight as traced (as when made)."""
    return {"buffers": _factors(base, site.groups)}


KIND = fxtune.register_kind(AdapterKind("svdiff", weight=svdiff_weight, restore=_restore))


@fxtune.register_pass
def svdiff(
    gm: fx.GraphModule,
    targets: fxtune.Selector = None,
    *,
    adapter: str = "default",
    exclude: fxtune.Selector = None,
) -> fx.GraphModule:
    """Adds a trainable shift δ (zeros) of the singular values of every selected weight (per
    group on grouped convs); returns a new GraphModule. Weight form only."""
    rw = fxtune.Rewrite(gm, kind="svdiff", adapter=adapter)
    for target, found in rw.select(targets, exclude=exclude).items():
        weight = rw.traced_weight(target)  # the pretrained weight's spectrum: the same on any reload
        if weight.is_meta:
            raise AdapterError(
                f"svdiff needs the values of '{target}' (for its SVD) but it is on the meta device; load the weights first"
            )
        factors = _factors(weight, found[0].groups)
        rw.attach(target, params={"delta": torch.zeros_like(factors["sigma"])}, derived=factors)
    return rw.finish()
