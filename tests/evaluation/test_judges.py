import math
import subprocess
import sys

import numpy as np
import pytest

from workbench.errors import InputError
from workbench.evaluation.judges import (
    MIN_N_SIGNIFICANCE,
    NRC_CATEGORIES,
    bootstrap_ci,
    judge_text,
    lexicon_rates,
    paired_change,
    roc_auc,
    vader_compound,
    words,
)
from workbench.selfcontrol.fluency import distinct_n, is_degenerate

ANGRY = "I am furious, I hate this, you disgusting liar, I will scream at you"
CALM = "I feel calm and peaceful, thank you for your kind help"
FEARFUL = "I am afraid of the dark, full of dread and panic, every night a nightmare of terror"
HAPPY = "What a wonderful day, I love this and I am so happy and grateful!"


def _ids(text: str) -> list[int]:
    """Word-level token ids from a growing vocabulary, so tests need no tokenizer."""
    vocab: dict[str, int] = {}
    return [vocab.setdefault(w, len(vocab)) for w in text.lower().split()]


# --- NRC lexicon -------------------------------------------------------------


def test_lexicon_rates_has_all_ten_categories_and_zeros_for_empty_text():
    for text in ["", "   ", "123 !!! ..."]:
        rates = lexicon_rates(text)
        assert set(rates) == set(NRC_CATEGORIES) and len(NRC_CATEGORIES) == 10
        assert all(v == 0.0 for v in rates.values())


def test_angry_sentence_has_more_anger_than_calm_one():
    angry, calm = lexicon_rates(ANGRY), lexicon_rates(CALM)
    assert angry["anger"] > calm["anger"]
    assert angry["negative"] > calm["negative"]
    assert calm["positive"] > angry["positive"]
    assert calm["trust"] > angry["trust"]


def test_fearful_sentence_has_more_fear_than_calm_and_happy_ones():
    fear = lexicon_rates(FEARFUL)["fear"]
    assert fear > lexicon_rates(CALM)["fear"]
    assert fear > lexicon_rates(HAPPY)["fear"]
    assert fear > 0.2


def test_lexicon_rates_are_fractions_of_tokens_case_insensitive():
    # "hate": anger, disgust, fear, negative, sadness; "calm": positive; "table": none.
    rates = lexicon_rates("HATE calm table table")
    assert rates["anger"] == pytest.approx(1 / 4)
    assert rates["positive"] == pytest.approx(1 / 4)
    assert rates["joy"] == 0.0
    assert all(0.0 <= v <= 1.0 for v in rates.values())


def test_quoted_words_count_as_the_words_themselves():
    """Issue 11.3: the quoted sentence scored zero everywhere, the unquoted one 0.167 positive."""
    quoted, plain = lexicon_rates("I said 'calm down' and left"), lexicon_rates("I said calm down and left")
    assert plain["positive"] == pytest.approx(1 / 6)
    assert quoted == plain
    assert lexicon_rates('I said \u2018calm down\u2019 and left') == plain  # typographic quotes too
    assert lexicon_rates('I said "calm down" and left') == plain


def test_possessives_keep_the_word_they_belong_to():
    """Issue 11.3: "my friend's trust" lost joy and trust."""
    rates = lexicon_rates("my friend's trust")
    assert rates == lexicon_rates("my friend trust")
    assert rates["joy"] == pytest.approx(1 / 3) and rates["trust"] == pytest.approx(2 / 3)
    assert lexicon_rates("my friend\u2019s trust") == rates
    assert words("the friends' houses aren't 'quiet'") == ["the", "friends", "houses", "aren't", "quiet"]


def test_judges_need_no_nltk_textblob_or_network():
    code = (
        "import sys, socket\n"
        "sys.modules['nltk'] = None\n"
        "sys.modules['textblob'] = None\n"
        "def no_net(*a, **k): raise RuntimeError('network used')\n"
        "socket.socket.connect = socket.socket.connect_ex = no_net\n"
        "socket.create_connection = socket.getaddrinfo = no_net\n"
        "from workbench.evaluation.judges import lexicon_rates, vader_compound\n"
        f"assert lexicon_rates({ANGRY!r})['anger'] > 0\n"
        f"assert vader_compound({HAPPY!r}) > 0\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


# --- VADER -------------------------------------------------------------------


def test_vader_compound_sign_follows_sentiment():
    happy, angry = vader_compound(HAPPY), vader_compound(ANGRY)
    assert happy > 0 > angry
    assert -1.0 <= angry and happy <= 1.0
    assert vader_compound("") == 0.0


# --- distinct-n and degeneracy -------------------------------------------------


def test_distinct_n_on_known_lists():
    assert distinct_n([1, 2, 1, 2, 1, 2], 2) == pytest.approx(2 / 5)
    assert distinct_n([1, 2, 1, 2, 1, 2], 1) == pytest.approx(2 / 6)
    assert distinct_n([1, 2, 3, 4], 2) == 1.0
    assert distinct_n([5, 5, 5, 5], 3) == pytest.approx(1 / 2)
    assert distinct_n("the cat saw the cat".split(), 2) == pytest.approx(3 / 4)
    assert distinct_n(np.array([1, 1, 1]), 1) == pytest.approx(1 / 3)


def test_distinct_n_without_ngrams_is_one():
    assert distinct_n([], 2) == 1.0
    assert distinct_n([7], 2) == 1.0


def test_is_degenerate_flags_token_salad_and_passes_a_sentence():
    salad = _ids(" ".join(["Yes"] * 20))
    reason = is_degenerate(salad)
    assert reason is not None and reason.startswith("repetition: distinct-2 ")
    assert float(reason.split()[-1]) == pytest.approx(1 / 19, abs=0.005)

    sentence = _ids("The quick brown fox jumps over the lazy dog near the quiet river bank today")
    assert is_degenerate(sentence) is None


def test_is_degenerate_empty_short_and_dominance():
    assert is_degenerate([]) == "empty"
    assert is_degenerate([3, 3, 3]) is None  # shorter than min_len: not judged
    assert is_degenerate([3, 3, 3], min_len=3) is not None
    # Every bigram distinct, but token 7 is 7 of 13 tokens.
    dominated = [7, 1, 7, 2, 7, 3, 7, 4, 7, 5, 7, 6, 7]
    assert distinct_n(dominated) == 1.0
    assert is_degenerate(dominated) == "one token dominates: 54%"


# --- bootstrap ---------------------------------------------------------------


def test_bootstrap_ci_constant_and_single_value():
    assert bootstrap_ci([3.0] * 10) == (3.0, 3.0, 3.0)
    mean, low, high = bootstrap_ci([0.003])  # issue 11.2: one value is no evidence, not a zero-width interval
    assert mean == 0.003 and math.isnan(low) and math.isnan(high)


# --- paired changes and the significance mark ------------------------------------------------------


def _classical(diff):
    from scipy import stats

    nonzero = [d for d in diff if d != 0]
    return (stats.ttest_1samp(diff, 0.0).pvalue,
            stats.binomtest(sum(d > 0 for d in nonzero), len(nonzero)).pvalue if nonzero else 1.0)


def test_paired_change_is_computed_on_the_paired_differences():
    rng = np.random.default_rng(1)
    reference = rng.normal(0, 5, 20)  # large prompt-to-prompt spread, small consistent change
    values = reference + 0.5 + rng.normal(0, 0.1, 20)
    change = paired_change(values, reference)
    assert change["mean"] == pytest.approx(float(np.mean(values - reference)))
    low, high = change["ci"]
    assert 0.3 < low < 0.5 < high < 0.7  # the interval of the differences, far narrower than either group's
    assert change["significant"] and change["n"] == 20
    _, unpaired_low, _ = bootstrap_ci(values)
    assert unpaired_low < 0  # unpaired, the same change would be lost in the spread


@pytest.mark.parametrize("seed", range(12))
def test_significance_mark_agrees_with_a_paired_t_test_and_sign_test(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(MIN_N_SIGNIFICANCE, 40))
    shift = [0.0, 0.2, 1.0][seed % 3]
    reference = rng.normal(0, 1, n)
    values = reference + shift + rng.normal(0, 1, n)
    change = paired_change(values, reference)
    p_t, p_sign = _classical(values - reference)
    assert change["p_t"] == pytest.approx(p_t) and change["p_sign"] == pytest.approx(p_sign)
    if change["significant"]:
        assert p_t < 0.05  # a mark is never placed where the paired t-test disagrees
        low, high = change["ci"]
        assert low > 0 or high < 0
    elif p_t < 0.01:  # clearly significant by the t-test: the bootstrap interval agrees and the mark appears
        pytest.fail(f"t-test p={p_t:.4f} on n={n} pairs but no mark")


def test_no_mark_below_the_minimum_n_even_when_every_change_has_one_sign():
    for n in range(1, MIN_N_SIGNIFICANCE):
        diff = [0.5 + 0.01 * i for i in range(n)]
        change = paired_change(diff, [0.0] * n)
        assert not change["significant"], n
        assert (change["ci"] is None) == (n < 2)
        assert change["p_sign"] > 0.05  # the exact sign test agrees: n < 6 same-sign pairs are not significant
    diff = [0.5 + 0.01 * i for i in range(MIN_N_SIGNIFICANCE)]
    change = paired_change(diff, [0.0] * MIN_N_SIGNIFICANCE)
    assert change["significant"] and change["p_sign"] < 0.05 and change["p_t"] < 0.05


def test_skewed_small_sample_is_not_marked_where_the_tests_disagree():
    diff = [5.0, 0.1, 0.1, 0.1, 0.1, -0.1]  # one large outlier: percentile interval excludes 0, the tests do not
    change = paired_change(diff, [0.0] * 6)
    p_t, p_sign = _classical(np.array(diff))
    assert p_t > 0.05 and p_sign > 0.05
    assert not change["significant"]


def test_bootstrap_ci_of_standard_normal_sample():
    values = np.random.default_rng(1234).standard_normal(1000)
    mean, low, high = bootstrap_ci(values, seed=0)
    assert mean == pytest.approx(values.mean())
    assert low < 0 < high
    assert low < mean < high
    expected = 2 * 1.96 / math.sqrt(1000)
    assert expected / 1.5 < high - low < expected * 1.5


def test_bootstrap_ci_wider_confidence_is_wider_and_seed_is_reproducible():
    values = list(np.random.default_rng(7).exponential(size=200))
    _, lo90, hi90 = bootstrap_ci(values, confidence=0.90)
    _, lo99, hi99 = bootstrap_ci(values, confidence=0.99)
    assert lo99 < lo90 and hi90 < hi99
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)


# --- ROC AUC -----------------------------------------------------------------


def test_roc_auc_known_values():
    assert roc_auc([0.9, 0.8, 0.7], [0.1, 0.2]) == 1.0
    assert roc_auc([0.1, 0.2], [0.9, 0.8, 0.7]) == 0.0
    assert roc_auc([0.5, 0.5], [0.5, 0.5, 0.5]) == 0.5
    # Pairs (pos, neg): (1,0)>,(1,2)<,(2,0)>,(2,2)=,(3,0)>,(3,2)> -> 4.5 / 6.
    assert roc_auc([1, 2, 3], [0, 2]) == pytest.approx(0.75)


# --- judge_text --------------------------------------------------------------


def test_judge_text_keys_and_values():
    assert set(judge_text(CALM)) == {"vader_compound"}
    scores = judge_text(ANGRY, {"target": "trust", "opposite": "anger"})
    assert set(scores) == {"vader_compound", "lexicon_target_rate", "lexicon_opposite_rate"}
    assert scores["vader_compound"] == vader_compound(ANGRY)
    assert scores["lexicon_opposite_rate"] == lexicon_rates(ANGRY)["anger"]
    assert scores["lexicon_opposite_rate"] > scores["lexicon_target_rate"]


# --- bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda: lexicon_rates(None),
        lambda: lexicon_rates([1, 2]),
        lambda: vader_compound(b"bytes"),
        lambda: distinct_n([1, 2, 3], 0),
        lambda: distinct_n("a string", 2),
        lambda: distinct_n([[1, 2], [3]], 1),
        lambda: is_degenerate([1, 2], min_len=0),
        lambda: bootstrap_ci([]),
        lambda: bootstrap_ci([1.0, float("nan")]),
        lambda: bootstrap_ci([1.0, 2.0], confidence=1.0),
        lambda: bootstrap_ci([1.0, 2.0], n_resamples=0),
        lambda: roc_auc([], [0.1]),
        lambda: roc_auc([0.2], []),
        lambda: judge_text(CALM, {"target": "happiness"}),
        lambda: judge_text(CALM, {"goal": "trust"}),
        lambda: judge_text(CALM, {}),
    ],
)
def test_bad_input_raises_input_error(call):
    with pytest.raises(InputError):
        call()
