"""The module tree a front end traces: fxtune's own copy of the model, with forwards picked per instance rebound.

Some models choose their forward in `__init__` (`self.forward = self.forward_slicing`, timm's
FasterNet). That bound method lives in the instance's `__dict__`, so a copy of the module still
calls the *original* module, with the user's submodules and parameters: symbolic tracing stops
("module is not installed as a submodule") and torch.export bakes the weights in as constants.
"""

from __future__ import annotations

import types

from torch import nn

from ..graph.ownership import own_module_tree


def owned_copy(model: nn.Module) -> nn.Module:
    """`own_module_tree(model, freeze=True)`, whose modules' own bound methods are bound to the copies."""
    owned = own_module_tree(model, freeze=True)
    originals = dict(model.named_modules(remove_duplicate=False))
    for name, copy in owned.named_modules(remove_duplicate=False):
        original = originals.get(name)
        for key, value in list(vars(copy).items()):
            if isinstance(value, types.MethodType) and original is not None and value.__self__ is original:
                vars(copy)[key] = types.MethodType(value.__func__, copy)
    return owned
