"""The adapter layer: adapter kinds and slots, and how they become graph code and constant weights.

kinds.py (what an adapter means), slots.py (where its tensors live), emitter.py (the nodes it
emits), forms.py (weight or activation form), composition.py (a weight's adapters applied to it,
written once), realise.py / strip.py (emitting and restoring code), fusion.py, base_weights.py
(replaced base weights kept for exact undo), lifecycle.py (merge, unmerge, set_active...),
batched.py / batch_rows.py (mixed-adapter batches). May import the graph layer, never
frontends, kit, io, compose or cli. It names no particular technique.
"""
