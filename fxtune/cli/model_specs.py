"""Building a model from a CLI spec: `torchvision:NAME` or `package.module:factory`."""

from __future__ import annotations

import importlib

from torch import nn

from ..errors import FxtuneError

DEFAULT_MODEL = "torchvision:resnet18"


def load_model(spec: str = DEFAULT_MODEL) -> nn.Module:
    """Instantiates the model a spec names, with random weights (nothing is downloaded)."""
    source, sep, name = spec.partition(":")
    if not sep or not name:
        raise FxtuneError(f"model spec {spec!r} should be 'torchvision:NAME' or 'package.module:factory'")
    if source == "torchvision":
        import torchvision

        try:
            return torchvision.models.get_model(name, weights=None)
        except ValueError:
            raise FxtuneError(
                f"torchvision has no model {name!r}; see torchvision.models.list_models()"
            ) from None
    try:
        module = importlib.import_module(source)
    except ImportError as exc:
        raise FxtuneError(f"cannot import {source!r} for model spec {spec!r}: {exc}") from None
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        raise FxtuneError(f"{source!r} has no callable {name!r} (model spec {spec!r})")
    model = factory()
    if not isinstance(model, nn.Module):
        raise FxtuneError(f"{spec!r} returned {type(model).__name__}, not an nn.Module")
    return model
