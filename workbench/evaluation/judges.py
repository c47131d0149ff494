"""Model-independent judges of a response text, for the evaluation runner.

Why separate from the model: a judge that shares weights with the model being
steered can be steered too. These judges are fixed lexicons and plain
statistics, so a score moves only when the text moves. Nothing here downloads
anything: the NRC lexicon ships inside ``nrclex`` and VADER's inside
``vaderSentiment``; tokenisation is a regex, not NLTK/TextBlob (which need
corpus downloads).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

NRC_CATEGORIES: tuple[str, ...] = (
    "anger",
    "anticipation",
    "disgust",
    "fear",
    "joy",
    "negative",
    "positive",
    "sadness",
    "surprise",
    "trust",
)
"""The ten NRC emotion lexicon categories, in alphabetical order."""

JUDGES_VERSION = 2
"""Version of what the judges compute from a text; a resumed evaluation keys on it, so records judged by an
older version are never mixed with new ones. 2: quotes stripped and possessives reduced before NRC lookup."""

# Letters, with apostrophes only *inside* a word ("don't", "friend's"): a quote mark around a word is not part of it.
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})
_LEXICON_KEYS = {"target": "lexicon_target_rate", "opposite": "lexicon_opposite_rate"}


def _require_text(text: Any, name: str = "text") -> str:
    if not isinstance(text, str):
        raise InputError(
            f"{name} must be a str, got {type(text).__name__}; decode token ids first."
        )
    return text


def _finite_array(values: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be numbers: {exc}") from exc
    if arr.ndim != 1:
        raise InputError(f"{name} must be one flat sequence of numbers, got shape {arr.shape}.")
    if arr.size == 0:
        raise InputError(f"{name} is empty; there is nothing to summarise.")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name} contains NaN or infinite values; drop or fix them first.")
    return arr


@lru_cache(maxsize=1)
def _nrc_lexicon() -> dict[str, frozenset[str]]:
    """Word -> NRC categories, read from the JSON bundled with ``nrclex`` (no download).

    Read directly rather than via ``NRCLex``: its ``affect_frequencies`` are
    fractions of *affect hits*, whereas we want fractions of *tokens*, so that a
    longer neutral answer dilutes the rate.
    """
    path = resources.files("nrclex.data").joinpath("nrc_en.json")
    with path.open("r", encoding="utf-8") as fh:
        raw = json.load(fh)
    return {word: frozenset(cats) for word, cats in raw.items()}


def words(text: str) -> list[str]:
    """Lowercase word tokens as the lexicon spells them: quotes stripped, possessive ``'s`` removed.

    Why: answers to "what do you say..." prompts often quote; a token
    ``'calm`` or ``friend's`` matches no lexicon entry yet counts in the
    denominator, so rates would depend on writing style. Typographic
    apostrophes count as ``'``; contractions ("don't") stay one word.
    """
    tokens = _WORD.findall(_require_text(text).lower().translate(_APOSTROPHES))
    return [t[:-2] if t.endswith("'s") else t for t in tokens]


def lexicon_rates(text: str) -> dict[str, float]:
    """Fraction of word tokens carrying each NRC category (0.0 each for text with no words).

    Tokens come from :func:`words` with no lemmatisation, so inflected forms
    missing from the lexicon (e.g. "terrified") count as neutral.
    """
    words_ = words(text)
    rates = dict.fromkeys(NRC_CATEGORIES, 0.0)
    if not words_:
        return rates
    lexicon = _nrc_lexicon()
    counts: Counter[str] = Counter()
    for word in words_:
        counts.update(lexicon.get(word, ()))
    for cat in NRC_CATEGORIES:
        rates[cat] = counts[cat] / len(words_)
    return rates


@lru_cache(maxsize=1)
def _vader() -> SentimentIntensityAnalyzer:
    """One analyzer per process: construction re-reads the lexicon file."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_compound(text: str) -> float:
    """VADER compound sentiment in [-1, 1]; rule-based, so it cannot be steered along with the model."""
    return float(_vader().polarity_scores(_require_text(text))["compound"])


def bootstrap_ci(
    values: Sequence[float],
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap CI of the mean, seeded so reports are reproducible.

    The bootstrap makes no normality assumption, which matters for bounded,
    skewed judge scores such as lexicon rates. One value has no spread to
    resample: ``low`` and ``high`` are NaN (no interval), never a zero-width
    interval that reads as certainty.
    """
    arr = _finite_array(values, "values")
    if not (isinstance(confidence, int | float) and 0.0 < confidence < 1.0):
        raise InputError(f"confidence must be strictly between 0 and 1, got {confidence!r}.")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise InputError(f"n_resamples must be a positive int, got {n_resamples!r}.")
    mean = float(arr.mean())
    if arr.size < 2:
        return mean, math.nan, math.nan
    rng = np.random.default_rng(seed)
    n = arr.size
    # Chunk the resample matrix so long value lists do not allocate n_resamples * n at once.
    rows = max(1, 2_000_000 // n)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, rows):
        stop = min(start + rows, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = arr[idx].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return mean, float(low), float(high)


MIN_N_SIGNIFICANCE = 6
"""Fewest paired prompts for which a change may be marked significant.

Why 6: with n paired differences all of one sign, the exact two-sided sign
test gives p = 2 / 2**n, which first drops below 0.05 at n = 6 (p = 0.031;
n = 5 gives 0.0625). Below that no distribution-free test on the pairs can
reject "no change", and a percentile bootstrap of so few values is too
narrow (with n = 2 its interval is about [min, max])."""


def paired_change(values: Sequence[float], reference: Sequence[float], *, confidence: float = 0.95,
                  seed: int = 0) -> dict[str, Any]:
    """The change ``values - reference`` over paired items: mean, bootstrap interval, tests, and whether to mark it.

    Returns ``mean``, ``ci`` (``None`` below 2 pairs), ``n``, ``p_t`` (paired
    t-test), ``p_sign`` (exact sign test, zero differences dropped) and
    ``significant``: at least :data:`MIN_N_SIGNIFICANCE` pairs, the bootstrap
    interval of the paired differences excludes 0, *and* the paired t-test
    agrees (p < 1 - confidence). Requiring both keeps the mark off skewed small
    samples where the percentile interval alone is too narrow.
    """
    from scipy import stats

    diff = _finite_array(np.asarray(values, dtype=float) - np.asarray(reference, dtype=float), "paired differences")
    mean, low, high = bootstrap_ci(diff, confidence=confidence, seed=seed)
    n = int(diff.size)
    constant = bool(np.allclose(diff, diff[0], rtol=1e-9, atol=1e-12))
    p_t = math.nan
    if n >= 2:  # identical differences have no spread: the t-test is undefined and the sign is certain
        p_t = (0.0 if diff[0] != 0 else 1.0) if constant else float(stats.ttest_1samp(diff, 0.0).pvalue)
    nonzero = diff[diff != 0]
    p_sign = float(stats.binomtest(int((nonzero > 0).sum()), int(nonzero.size)).pvalue) if nonzero.size else 1.0
    has_ci = n >= 2
    significant = bool(n >= MIN_N_SIGNIFICANCE and has_ci and (low > 0 or high < 0) and p_t < 1 - confidence)
    return {"mean": mean, "ci": [low, high] if has_ci else None, "n": n, "p_t": p_t, "p_sign": p_sign,
            "significant": significant}


def judge_text(text: str, lexicon: Mapping[str, str] | None = None) -> dict[str, float]:
    """All text judges in one dict: VADER always, NRC rates of ``lexicon``'s categories when given.

    ``lexicon`` is e.g. ``{"target": "trust", "opposite": "anger"}``; each key
    present yields ``lexicon_<key>_rate``. Unknown keys or categories raise,
    since a typo would otherwise silently score 0.
    """
    _require_text(text)
    scores = {"vader_compound": vader_compound(text)}
    if lexicon is None:
        return scores
    if not isinstance(lexicon, Mapping) or not lexicon:
        raise InputError(
            f"lexicon must be a non-empty dict like {{'target': 'trust', 'opposite': 'anger'}}, got {lexicon!r}."
        )
    unknown_keys = set(lexicon) - set(_LEXICON_KEYS)
    if unknown_keys:
        raise InputError(
            f"lexicon keys must be among {sorted(_LEXICON_KEYS)}, got {sorted(map(str, unknown_keys))}."
        )
    for key, cat in lexicon.items():
        if cat not in NRC_CATEGORIES:
            raise InputError(
                f"lexicon[{key!r}] = {cat!r} is not an NRC category; use one of {list(NRC_CATEGORIES)}."
            )
    rates = lexicon_rates(text)
    for key, out in _LEXICON_KEYS.items():
        if key in lexicon:
            scores[out] = rates[lexicon[key]]
    return scores


def roc_auc(positive_scores: Sequence[float], negative_scores: Sequence[float]) -> float:
    """P(random positive scores above random negative), ties 1/2: how well a score separates two groups."""
    from sklearn.metrics import roc_auc_score

    pos = _finite_array(positive_scores, "positive_scores")
    neg = _finite_array(negative_scores, "negative_scores")
    labels = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    return float(roc_auc_score(labels, np.concatenate([pos, neg])))
