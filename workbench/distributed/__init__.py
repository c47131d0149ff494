"""Synthesis and evaluation sharded over a pool of Ray actors (``--ray``).

Why Ray: a search costs seconds per prompt and thousands of prompts want
several GPUs or nodes; Ray starts the workers, places one per GPU, and tells
the driver when one dies. :mod:`.pool` is the generic engine (actors that load
the model once, dynamic hand-out of small chunks, retries of a dead worker's
prompts); :mod:`.jobs` is the thin glue that runs the single-process path's own
per-prompt work on a chunk. The driver stays the single writer of the
resumable store, so a distributed run resumes, refuses other settings and
writes each record once exactly like a local one.

Nothing here is imported by ``import workbench`` or by a command without
``--ray``: Ray is an optional extra (``pip install -e ".[distributed]"``).

May import every stage below cli (model, selfcontrol, prefix, analysis,
preference, evaluation) and the shared ground.
"""

from __future__ import annotations

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "pool": ["WorkerPool", "RunStats", "connect"],
    "jobs": ["RaySettings", "synthesize_on_ray", "evaluate_on_ray"],
})
