"""slice-delta (slicetune as a pass): a trainable tuner T on one rectangular slice S of a weight.

op="add": W'[S] = W[S] + T (T starts at 0); op="mul": W'[S] = W[S]·T (T starts at 1). The slice
is taken in the weight's matrix view (out, in/groups·kernel), so it works on linears and on
every conv. Its position and size are the slot's config (JSON ints), part of the adapter's
state: loading the adapter puts T back on the same slice. Weight form only.

After `slice_delta(gm, targets="layer4.*")` a site reads (a 256×256×3×3 conv: 81×728 of 256×2304):

    layer4_0_conv1_weight = getattr(self.layer4, "0").conv1.weight
    layer4_0_conv1_tuner = self.fxtune.default.layer4_0_conv1.tuner
    layer4_0_conv1_slice_delta_weight = fxtune_passes_slice_delta_slice_delta_weight(layer4_0_conv1_weight, tuner = layer4_0_conv1_tuner, op = 'add', row = 126, col = 983, rows = 81, cols = 728);  layer4_0_conv1_weight = layer4_0_conv1_tuner = None
    layer4_0_conv1 = torch.conv2d(x, layer4_0_conv1_slice_delta_weight, None, (1, 1), (1, 1), (1, 1), 1);  x = layer4_0_conv1_slice_delta_weight = None
"""

from __future__ import annotations

import math
import random
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import fx

import fxtune
from fxtune import AdapterError, AdapterKind


def slice_delta_weight(
    w: torch.Tensor, *, tuner: torch.Tensor, op: str, row: int, col: int, rows: int, cols: int
) -> torch.Tensor:
    """The meaning: T padded to the matrix view (0 or 1 outside S), then added or multiplied in."""
    n_rows, n_cols = w.shape[0], w[0].numel()
    pad = (col, n_cols - col - cols, row, n_rows - row - rows)
    if op == "add":
        return w + F.pad(tuner, pad).reshape(w.shape)
    return w * F.pad(tuner, pad, value=1.0).reshape(w.shape)


KIND = fxtune.register_kind(AdapterKind("slice_delta", weight=slice_delta_weight))


def _shape(site: fxtune.Site, size: float | tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of the slice: explicit, or ≈ size·numel with the matrix's aspect ratio."""
    n_rows, n_cols = site.out_features, site.weight_numel // site.out_features
    if isinstance(size, (tuple, list)):
        rows, cols = size
        if not 1 <= rows <= n_rows or not 1 <= cols <= n_cols:
            raise AdapterError(
                f"size={tuple(size)} does not fit '{site.weight_name}', whose weight is {n_rows}×{n_cols} as a "
                "matrix (out, in/groups·kernel); pass a smaller (rows, cols) or a fraction, or exclude it"
            )
        return rows, cols
    rows = min(max(round(n_rows * math.sqrt(size)), 1), n_rows)
    cols = min(max(round(size * n_rows * n_cols / rows), 1), n_cols)
    return rows, cols


def _position(site: fxtune.Site, where, shape: tuple[int, int], seed: int) -> tuple[int, int]:
    """(row, col) of the slice's top-left corner."""
    n_rows, n_cols = site.out_features, site.weight_numel // site.out_features
    rows, cols = shape
    if where == "random":
        rng = random.Random(f"slice_delta/{seed}/{site.weight_name}")  # str seeds hash with sha512: stable
        return rng.randint(0, n_rows - rows), rng.randint(0, n_cols - cols)
    if where == "top-left":
        return 0, 0
    corner = where.get(site.weight_name) if isinstance(where, Mapping) else where
    if corner is None:
        raise AdapterError(f"where= has no (row_start, col_start) for '{site.weight_name}'; add it to the dict or exclude that site")
    row, col = corner
    if not (0 <= row <= n_rows - rows and 0 <= col <= n_cols - cols):
        raise AdapterError(
            f"a {rows}×{cols} slice at ({row}, {col}) does not fit '{site.weight_name}', whose weight is "
            f"{n_rows}×{n_cols} as a matrix (out, in/groups·kernel); move it or make size smaller"
        )
    return row, col


def _check(size, op: str, where) -> None:
    if op not in ("add", "mul"):
        raise AdapterError(f"op must be 'add' (W[S] += T) or 'mul' (W[S] *= T), got {op!r}")
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
            raise AdapterError(f"size as a shape must be (rows, cols) of ints, got {size!r}")
    elif isinstance(size, bool) or not isinstance(size, (int, float)) or not 0 < size <= 1:
        raise AdapterError(f"size must be a fraction of the weight in (0, 1] or (rows, cols), got {size!r}")
    if isinstance(where, str):
        if where not in ("random", "top-left"):
            raise AdapterError(
                f"where must be 'random', 'top-left', (row_start, col_start) or a dict site -> corner, got {where!r}"
            )
        return
    corners = where.values() if isinstance(where, Mapping) else [where]
    for corner in corners:
        if not isinstance(corner, (tuple, list)) or len(corner) != 2 or not all(isinstance(v, int) for v in corner):
            raise AdapterError(f"where= corners must be (row_start, col_start) pairs of ints, got {corner!r}")


@fxtune.register_pass
def slice_delta(
    gm: fx.GraphModule,
    targets: fxtune.Selector = None,
    *,
    size: float | tuple[int, int] = 0.1,
    op: str = "add",
    seed: int = 0,
    where: str | tuple[int, int] | Mapping[str, tuple[int, int]] = "random",
    adapter: str = "default",
    exclude: fxtune.Selector = None,
) -> fx.GraphModule:
    """Adds a tuner on one slice of every selected weight; returns a new GraphModule.

    size: fraction of the weight's elements (a rectangle shaped like the weight matrix) or
    (rows, cols). where: "random" (reproducible from `seed` and the site name), "top-left",
    a (row_start, col_start) pair for every site, or a dict site -> (row_start, col_start).
    """
    _check(size, op, where)
    rw = fxtune.Rewrite(gm, kind="slice_delta", adapter=adapter)
    chosen = rw.select(targets, exclude=exclude)
    if isinstance(where, Mapping):
        unknown = sorted(set(where) - set(chosen))
        if unknown:
            raise AdapterError(f"where= names {unknown}, which are not selected weights; selected: {sorted(chosen)}")
    for target, found in chosen.items():
        site = found[0]
        weight = rw.weight(target)
        rows, cols = _shape(site, size)
        row, col = _position(site, where, (rows, cols), seed)
        init = torch.zeros if op == "add" else torch.ones
        rw.attach(
            target,
            params={"tuner": init(rows, cols, dtype=weight.dtype, device=weight.device)},
            config={"op": op, "row": row, "col": col, "rows": rows, "cols": cols},
        )
    return rw.finish()
