"""The graph layer: what fxtune knows about a traced graph before any adapter exists.

Call signatures of weight-consuming functions, sites (every use of a layer weight) and their
discovery, weights read and written by reference, module trees fxtune owns, selection, coverage
(and the channel-dependency analysis of structural pruning). Imports only torch, `fxtune.errors`
and `fxtune.ops`. Everyday task that lands here: a weight the graph uses that is not found as a
site (discovery.py), or a new selector (selection.py).
"""
