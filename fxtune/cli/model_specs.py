"""Building a model from a CLI spec, with random weights (nothing is downloaded).

    torchvision:NAME              torchvision.models.get_model(NAME, weights=None, **kwargs)
    timm:NAME                     timm.create_model(NAME, pretrained=False, **kwargs)
    transformers:CONFIG_CLASS     AutoModel.from_config(CONFIG_CLASS(**kwargs)), e.g. transformers:GPT2Config
    transformers:MODEL_CLASS      MODEL_CLASS(its config class(**kwargs)), e.g. transformers:GPT2LMHeadModel
    package.module:factory        factory(**kwargs)
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from ..errors import FxtuneError

DEFAULT_MODEL = "torchvision:resnet18"
FORMS = "torchvision:NAME, timm:NAME, transformers:CONFIG_CLASS (or MODEL_CLASS) or package.module:factory"


def default_frontend(spec: str) -> str:
    """The front end `--frontend auto` picks: torch.export for Hugging Face models (they do not
    trace symbolically), symbolic tracing otherwise."""
    return "export" if spec.partition(":")[0] == "transformers" else "fx"


def _build(spec: str, what: str, factory: Any, kwargs: dict) -> nn.Module:
    try:
        model = factory(**kwargs)
    except (TypeError, ValueError) as exc:
        raise FxtuneError(f"cannot build {what} for model spec {spec!r} with --model-kwargs {kwargs}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise FxtuneError(f"{spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _torchvision(spec: str, name: str, kwargs: dict) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models():
        raise FxtuneError(f"torchvision has no model {name!r}; see torchvision.models.list_models()")
    return _build(spec, f"torchvision's {name}", lambda **kw: torchvision.models.get_model(name, weights=None, **kw), kwargs)


def _timm(spec: str, name: str, kwargs: dict) -> nn.Module:
    timm = _import("timm", spec)
    if not timm.is_model(name):
        raise FxtuneError(f"timm has no model {name!r}; see timm.list_models('*{name[:6]}*')")
    return _build(spec, f"timm's {name}", lambda **kw: timm.create_model(name, pretrained=False, **kw), kwargs)


def _transformers(spec: str, name: str, kwargs: dict) -> nn.Module:
    transformers = _import("transformers", spec)
    cls = getattr(transformers, name, None)
    if isinstance(cls, type) and issubclass(cls, transformers.PretrainedConfig):
        config = _build_config(spec, cls, kwargs)
        model = _build(spec, f"AutoModel for {name}", transformers.AutoModel.from_config, {"config": config})
    elif isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        config = _build_config(spec, cls.config_class, kwargs)
        model = _build(spec, name, cls, {"config": config})
    else:
        raise FxtuneError(f"transformers has no config or model class {name!r}; use e.g. transformers:GPT2Config "
                          "(a small model from keyword arguments: --model-kwargs n_layer=2,n_embd=64)")
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # a cache is an extra output torch.export would have to trace
    return model


def _build_config(spec: str, cls: type, kwargs: dict) -> Any:
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise FxtuneError(f"cannot build {cls.__name__}({kwargs}) for model spec {spec!r}: {exc}") from None


def _import(name: str, spec: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise FxtuneError(f"model spec {spec!r} needs the package {name!r} ({exc}); pip install {name}") from None


def load_model(spec: str = DEFAULT_MODEL, kwargs: dict | None = None) -> nn.Module:
    """Instantiates the model a spec names with random weights; `kwargs` go to its constructor or config."""
    kwargs = dict(kwargs or {})
    source, sep, name = spec.partition(":")
    if not sep or not name or not source:
        raise FxtuneError(f"model spec {spec!r} should be {FORMS}")
    if source == "torchvision":
        return _torchvision(spec, name, kwargs)
    if source == "timm":
        return _timm(spec, name, kwargs)
    if source == "transformers":
        return _transformers(spec, name, kwargs)
    try:
        module = importlib.import_module(source)
    except ImportError as exc:
        raise FxtuneError(f"cannot import {source!r} for model spec {spec!r}: {exc}. Model specs: {FORMS}") from None
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        raise FxtuneError(f"{source!r} has no callable {name!r} (model spec {spec!r}); model specs: {FORMS}")
    return _build(spec, f"{source}.{name}", factory, kwargs)
