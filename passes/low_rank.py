"""Low-rank factorization (ShRank/Greenformer) as a structural pass: each site becomes two layers.

A Linear in→out becomes Linear in→r, then Linear r→out carrying the bias; a conv becomes a conv
in→G·r with the site's kernel, stride, padding, dilation, padding_mode and groups=G, then a 1×1
conv G·r→out with groups=G carrying the bias. Each group's factors come from the truncated SVD
of its own (out/G, in/G·k) weight matrix, √S on both sides. After `low_rank(gm, "fc")`:
    fc_0 = getattr(self.fc, "0")(x)
    fc = getattr(self.fc, "1")(fc_0)
The factor weights are trainable (listed for `fxtune.trainable_parameters`); all else is frozen.
"""

from __future__ import annotations

import math

import torch
from torch import fx, nn

import fxtune
from fxtune import StructureError

OVERSAMPLE = 10  # randomized solver: directions sampled beyond the rank
POWER_ITERATIONS = 4  # randomized solver: power iterations (sharpen a slowly decaying spectrum)
TOLERANCE = 0.02  # "auto" keeps a randomized result only if its error² ≤ (1 + TOLERANCE) · optimum

_LAYERS = {"linear": nn.Linear, "conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}


def matrix_shape(site: fxtune.Site) -> tuple[int, int]:
    """(m, n) of one group's weight matrix: out/G rows, in/G·kernel-volume columns."""
    return site.out_features // site.groups, site.weight_shape[1] * site.kernel_volume


def break_even_rank(site: fxtune.Site) -> float:
    """The rank per group at which the factors r·(m + n) hold as many weights as the site's m·n."""
    m, n = matrix_shape(site)
    return m * n / (m + n)


def randomized_pays(m: int, n: int, r: int) -> bool:
    """The size rule of solver="auto": try the randomized solver when min(m, n) ≥ 256 and
    r + OVERSAMPLE ≤ min(m, n)/8. Measured on resnet50/vit shapes (CPU, one thread), the
    float32 randomized SVD plus its float64 check then costs 1/2–1/7 of a float64 SVD."""
    k = min(m, n)
    return k >= 256 and r + OVERSAMPLE <= k // 8


def truncated_svd(matrices: torch.Tensor, r: int, solver: str = "auto") -> tuple[torch.Tensor, torch.Tensor, str]:
    """Factors b (G, m, r), a (G, r, n) with b @ a the best rank-r approximation of each (m, n)
    matrix, √S on both sides, in the input's dtype; and the solver that produced them."""
    dtype = matrices.dtype
    if solver == "randomized" or (solver == "auto" and randomized_pays(*matrices.shape[-2:], r)):
        b, a = _randomized(matrices.to(torch.promote_types(dtype, torch.float32)), r)
        if solver == "randomized" or near_optimal(matrices, b, a, r):
            return b.to(dtype), a.to(dtype), "randomized"
    u, s, vh = torch.linalg.svd(matrices.double(), full_matrices=False)
    root = s[..., :r].sqrt()
    return (u[..., :r] * root[..., None, :]).to(dtype), (root[..., :, None] * vh[..., :r, :]).to(dtype), "exact"


def _randomized(matrices: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.svd_lowrank with OVERSAMPLE extra directions and POWER_ITERATIONS, truncated to r."""
    u, s, v = torch.svd_lowrank(matrices, q=min(r + OVERSAMPLE, *matrices.shape[-2:]), niter=POWER_ITERATIONS)
    root = s[..., :r].sqrt()
    return u[..., :r] * root[..., None, :], root[..., :, None] * v[..., :r].mT


def near_optimal(matrices: torch.Tensor, b: torch.Tensor, a: torch.Tensor, r: int) -> bool:
    """Whether every group's error² is within TOLERANCE of the Eckart–Young optimum, the sum of its
    discarded σ², taken from the eigenvalues of the float64 Gram matrix (far cheaper than an SVD)."""
    w = matrices.double()
    gram = w @ w.mT if w.shape[-2] <= w.shape[-1] else w.mT @ w
    eigenvalues = torch.linalg.eigvalsh(gram).clamp_min(0)  # ascending: σ² from the smallest up
    optimum = eigenvalues[..., : eigenvalues.shape[-1] - r].sum(-1)
    error = (w - b.double() @ a.double()).square().sum((-2, -1))
    floor = 1e-10 * w.square().sum((-2, -1))  # float32 rounding of factors of a weight of rank ≤ r
    return bool((error <= (1 + TOLERANCE) * optimum + floor).all())


def _layers(site: fxtune.Site, a: torch.Tensor, b: torch.Tensor) -> list[nn.Module]:
    """The two modules replacing a site, from factors a (G, r, n), b (G, m, r); the site's bias on the second."""
    mod, cls, width = site.module, _LAYERS[site.layer], a.shape[0] * a.shape[1]
    options = {"device": "meta", "dtype": a.dtype}  # no init work: every parameter is set below
    if site.is_conv:
        geometry = (mod.kernel_size, mod.stride, mod.padding, mod.dilation)
        first = cls(site.in_features, width, *geometry, groups=site.groups, bias=False, padding_mode=mod.padding_mode, **options)
        second = cls(width, site.out_features, 1, groups=site.groups, bias=site.has_bias, **options)
    else:
        first = cls(site.in_features, width, bias=False, **options)
        second = cls(width, site.out_features, bias=site.has_bias, **options)
    first.weight = nn.Parameter(a.reshape(first.weight.shape).contiguous())
    second.weight = nn.Parameter(b.reshape(second.weight.shape).contiguous())
    if site.has_bias:
        second.bias = nn.Parameter(mod.bias.detach(), requires_grad=False)  # shared read-only, like every base parameter
    return [first, second]


def _rank(rank: int | float, site: fxtune.Site, round_to: int = 1) -> int:
    """The rank per group: an int as given, a float as that fraction of break-even (at least 1), rounded to
    the nearest multiple of `round_to` (at least one multiple); at most full rank."""
    r = rank if isinstance(rank, int) else max(1, math.floor(rank * break_even_rank(site)))
    r = max(round_to, round_to * math.floor(r / round_to + 0.5))
    return min(r, *matrix_shape(site))


@fxtune.register_pass
def low_rank(
    gm: fx.GraphModule,
    targets: fxtune.Selector = None,
    *,
    rank: int | float = 0.5,
    solver: str = "auto",
    force: bool = False,
    round_to: int = 1,
    exclude: fxtune.Selector = None,
) -> fx.GraphModule:
    """Factorizes every selected Linear/conv into two layers; returns a new GraphModule (input untouched).

    rank: int (per group), or a float fraction of the break-even rank; rounded to a multiple of
    `round_to` (CPU/GPU kernels run channel counts like 16 much faster than 27); capped at full rank. Sites
    whose factors would not hold fewer weights are skipped with a FxtuneWarning (force=True
    factorizes them anyway); if all are skipped, StructureError. solver: "exact" (float64 SVD),
    "randomized" (torch.svd_lowrank) or "auto" (randomized when `randomized_pays` and `near_optimal`).
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, float)) or not rank > 0 or not math.isfinite(rank):
        raise StructureError(f"rank must be a positive int (per group) or a positive float (fraction of break-even), got {rank!r}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise StructureError(f"round_to must be a positive int, got {round_to!r}")
    if solver not in ("auto", "exact", "randomized"):
        raise StructureError(f"solver must be 'auto', 'exact' or 'randomized', got {solver!r}")
    rs = fxtune.Restructure(gm, name="low_rank")
    skipped = []
    for target, found in rs.select(targets, exclude=exclude).items():
        site, (m, n), groups = found[0], matrix_shape(found[0]), found[0].groups
        r = _rank(rank, site, round_to)
        if r * (m + n) >= m * n and not force:
            skipped.append(
                f"'{target}': rank {r} × {groups} group(s) needs {groups * r * (m + n):,} weights, not fewer than "
                f"{groups * m * n:,} (break-even rank {break_even_rank(site):.2f})"
            )
            continue
        b, a, used = truncated_svd(rs.weight(target).reshape(groups, m, n), r, solver)
        rs.replace(target, _layers(site, a, b), trainable=("0.weight", "1.weight"), meta={"rank": r, "solver": used})
    if skipped:
        listing = "\n  ".join(skipped)
        if not rs.replaced:
            raise StructureError(f"low_rank(rank={rank!r}) would save parameters at no selected site:\n  {listing}\nLower rank, select other sites, or pass force=True")
        fxtune.warn(f"low_rank skipped {len(skipped)} site(s) where factorizing saves no parameters (force=True factorizes them):\n  {listing}", )
    return rs.finish()
