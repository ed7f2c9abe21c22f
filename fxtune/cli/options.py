"""Command-line values: typed option values, keyword lists, and the example input a model is run on."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from ..errors import FxtuneError


def parse_value(text: str) -> Any:
    """An option value: int, float, true/false/none, a `;`-separated list, else the string."""
    if ";" in text:
        return [parse_value(t) for t in text.split(";") if t]
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_keywords(text: str | None, what: str) -> dict[str, Any]:
    """`{"n_embd": 32}` (a JSON object) or `n_embd=32,n_layer=2` (typed as parse_value) as a dict."""
    if not text:
        return {}
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FxtuneError(f"{what} {text!r} is not valid JSON ({exc})") from None
        if not isinstance(value, dict):
            raise FxtuneError(f"{what} must be a JSON object, got {text!r}")
        return value
    found = {}
    for item in filter(None, text.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise FxtuneError(f"{what}: {item!r} should be key=value (or give one JSON object)")
        found[key.strip()] = parse_value(value.strip())
    return found


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise FxtuneError(f"--input-shape {text!r} should be sizes separated by commas, e.g. 1,3,224,224 or 2,16") from None
    if not shape or any(d < 1 for d in shape):
        raise FxtuneError(f"--input-shape {text!r} should be positive sizes, e.g. 1,3,224,224 or 2,16")
    return shape


def vocabulary_size(model: nn.Module) -> int | None:
    """How many token ids a model reads: its config's vocab_size, else its first embedding's rows."""
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(size, int) and size > 0:
        return size
    return next((m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)), None)


def input_dtype(name: str, model: nn.Module) -> torch.dtype:
    """--input-dtype: "auto" is int64 token ids for models with a vocabulary in their config, else float32."""
    if name == "auto":
        size = getattr(getattr(model, "config", None), "vocab_size", None)
        return torch.int64 if isinstance(size, int) else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise FxtuneError(f"--input-dtype {name!r} is no torch dtype; use e.g. float32, int64 or auto")
    return dtype


def example_input(model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A reproducible random input: normal values for float dtypes, token ids below the vocabulary size for integer ones."""
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    size = vocabulary_size(model)
    if size is None:
        raise FxtuneError(f"integer inputs ({dtype}) are token ids, but the model has no config.vocab_size and no "
                          "nn.Embedding to say how many; use --input-dtype float32")
    return torch.randint(0, size, shape, generator=g, dtype=dtype)
