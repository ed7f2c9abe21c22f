"""Reading and writing a GraphModule's weights by their WeightRef, never in place.

Adapter kinds see every weight as (out, in/groups, *kernel): a linear's or conv's own weight, the
q/k/v rows of an attention's packed in_proj_weight, the transpose of an embedding's (num, dim)
table or of a transformers Conv1D's (in, out) weight. Writing never touches a tensor in place:
it makes new frozen tensors and gives them to every module that held the old one (tied weights
stay tied).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..ops import with_rows
from .sites import WeightRef


def frozen_parameter(t: Tensor) -> nn.Parameter:
    """A new Parameter on `t`'s data that does not require grad (base weights are read-only)."""
    return nn.Parameter(t.detach(), requires_grad=False)


class Weights:
    """Reads and writes weights of one GraphModule by their WeightRef (canonical view, bias rows)."""

    def __init__(self, gm: nn.Module):
        self.gm = gm
        self._holders: dict[int, list[tuple[nn.Module, str]]] | None = None

    def module(self, path: str) -> nn.Module:
        return self.gm.get_submodule(path) if path else self.gm

    def owner(self, ref: WeightRef) -> nn.Module:
        return self.module(ref.owner)

    def tensor(self, path: str) -> Tensor:
        owner, _, name = path.rpartition(".")
        return self.module(owner)._parameters[name]

    def read(self, ref: WeightRef) -> tuple[Tensor, Tensor | None]:
        """(W, b) in the canonical view, detached (read them, never write them)."""
        return ref.canonical(self.tensor(ref.path).detach()), self._bias_rows(ref)

    def _bias_rows(self, ref: WeightRef) -> Tensor | None:
        if ref.bias is None:
            return None
        bias = self.tensor(ref.bias).detach()
        return bias if ref.bias_rows is None else bias[ref.bias_rows[0]:ref.bias_rows[1]]

    def pieces(self, ref: WeightRef) -> tuple[Tensor, Tensor | None]:
        """The weight's and bias's current raw-layout pieces: the Parameters themselves for whole tensors."""
        weight = self.tensor(ref.path)
        if ref.rows is not None:
            weight = weight.detach()[ref.rows[0]:ref.rows[1]]
        bias = self.tensor(ref.bias) if ref.bias is not None and ref.bias_rows is None else self._bias_rows(ref)
        return weight, bias

    def write(self, ref: WeightRef, weight: Tensor, bias: Tensor | None = None) -> None:
        """Gives the weight (and bias) new frozen tensors from canonical `weight` (and `bias` rows)."""
        self.write_pieces(ref, ref.raw_rows(weight.detach()), None if bias is None else bias.detach())

    def write_pieces(self, ref: WeightRef, weight: Tensor | None, bias: Tensor | None = None) -> None:
        """Puts raw-layout pieces back: a whole tensor becomes a frozen Parameter on its storage, rows are
        spliced into a new tensor."""
        if weight is not None:
            self._put(ref.path, ref.rows, weight)
        if bias is not None and ref.bias is not None:
            self._put(ref.bias, ref.bias_rows, bias)

    def _put(self, path: str, rows: tuple[int, int] | None, piece: Tensor) -> None:
        old = self.tensor(path)
        new = piece.detach() if rows is None else with_rows(old.detach(), rows[0], rows[1], piece.detach())
        param = frozen_parameter(new)
        for module, name in self._holders_of(old, path):
            module._parameters[name] = param
        self._holders[id(param)] = self._holders.pop(id(old))

    def _holders_of(self, tensor: Tensor, path: str) -> list[tuple[nn.Module, str]]:
        if self._holders is None:
            self._holders = {}
            for _, module in self.gm.named_modules():
                for name, p in module._parameters.items():
                    if p is not None:
                        self._holders.setdefault(id(p), []).append((module, name))
        if id(tensor) not in self._holders:
            owner, _, name = path.rpartition(".")
            self._holders[id(tensor)] = [(self.module(owner), name)]
        return self._holders[id(tensor)]
