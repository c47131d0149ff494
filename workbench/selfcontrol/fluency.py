"""Fluency checks on generated token ids: is an answer usable, or did the control break the text?

Why in the SelfControl stage: the search's fluency guard rejects candidates
whose answers loop or collapse (the clean judge rates "Yes Yes Yes" highly),
and the evaluation counts the same failures; both use these functions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from ..errors import InputError


def _as_token_list(tokens: Any, name: str = "tokens") -> list:
    """A plain list of hashable tokens; tensors/arrays hash by identity, so unwrap them."""
    if isinstance(tokens, str | bytes):
        raise InputError(
            f"{name} is a string, which would be judged character by character; "
            "pass token ids or text.split()."
        )
    if hasattr(tokens, "tolist"):
        tokens = tokens.tolist()
    if not isinstance(tokens, Sequence):
        raise InputError(f"{name} must be a sequence of tokens, got {type(tokens).__name__}.")
    out = list(tokens)
    if any(isinstance(t, list) for t in out):
        raise InputError(
            f"{name} must be one flat sequence, not a batch; judge each row separately."
        )
    return out


def distinct_n(tokens: Sequence, n: int = 2) -> float:
    """Unique n-grams over total n-grams (1.0 with no n-grams): low values mean the text loops."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"n must be a positive int, got {n!r}.")
    toks = _as_token_list(tokens)
    total = len(toks) - n + 1
    if total <= 0:
        return 1.0
    grams = {tuple(toks[i : i + n]) for i in range(total)}
    return len(grams) / total


def is_degenerate(tokens: Sequence[int], min_len: int = 8) -> str | None:
    """Why a generation is unusable as a sample ("empty", repetition, one-token dominance), else None.

    Steering too hard collapses outputs into token salad that lexicon judges
    still score; flag it so such samples can be counted rather than averaged.
    Sequences shorter than ``min_len`` (but non-empty) are too short to judge.
    """
    if isinstance(min_len, bool) or not isinstance(min_len, int) or min_len < 1:
        raise InputError(f"min_len must be a positive int, got {min_len!r}.")
    toks = _as_token_list(tokens)
    if not toks:
        return "empty"
    if len(toks) < min_len:
        return None
    d2 = distinct_n(toks, 2)
    if d2 < 0.5:
        return f"repetition: distinct-2 {d2:.2f}"
    top = Counter(toks).most_common(1)[0][1] / len(toks)
    if top > 0.5:
        return f"one token dominates: {top:.0%}"
    return None
