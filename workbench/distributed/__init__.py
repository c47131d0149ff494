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

_LAZY = {
    "WorkerPool": "pool",
    "RunStats": "pool",
    "connect": "pool",
    "RaySettings": "jobs",
    "synthesize_on_ray": "jobs",
    "evaluate_on_ray": "jobs",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'workbench.distributed' has no attribute {name!r}")


__all__ = sorted(_LAZY)
