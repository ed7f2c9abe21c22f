"""Composing passes: the pass registry, Pipeline (passes in a row, with a report) and Strategy (rule lists).

Passes are found by name through the registry (registry.py), never by importing `fxtune.passes`
at import time. May import kit, adapter, frontends and graph; never io or cli.
"""
