"""The version of fxtune, in one place (files it writes record it)."""

__version__ = "0.1.0"
