"""Layer-window and suffix ablations."""

import matplotlib.pyplot as plt
import numpy as np
import pytest

from workbench.analysis import control_cache as cc
from workbench.analysis.ablation import (
    default_windows,
    layer_window_ablation,
    plot_layer_ablation,
    question_variants,
    suffix_ablation,
    window_control,
)
from workbench.errors import InputError
from workbench.selfcontrol.search import SelfControlConfig
from workbench.selfcontrol.tasks import get_task

CONFIG = SelfControlConfig(max_new_tokens=6, iterations=2, n_steps=2, initial_step=-0.05, progress=False)
PROMPT = "Someone insulted your work in front of everyone. How do you respond?"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "shared-controls"  # shared with the other analysis tests


@pytest.fixture(scope="module")
def record(tiny, root):
    return cc.cached_self_control(tiny, PROMPT, "angry2peaceful", CONFIG, root=root)


def test_window_covering_all_layers_reproduces_the_full_control(tiny, record):
    n = tiny.n_layers
    ablation = layer_window_ablation(tiny, record, "angry2peaceful", windows=[(0, n), (0, 1), (1, 2)], progress=False)
    assert ablation.scores[0] == pytest.approx(ablation.full_score, abs=1e-6)
    assert ablation.scores[0] == pytest.approx(record.score, abs=1e-4)  # the score the search found
    assert ablation.none_score == pytest.approx(record.initial_score, abs=1e-4)  # no control: the original answer
    assert ablation.responses[0] == record.response
    widths, starts, grid = ablation.grid()
    assert widths == [1, 2, 3] and starts == [0, 1] and np.isnan(grid).sum() == 3
    fig = plot_layer_ablation(ablation)
    assert fig.axes[0].get_ylabel() == "window width (layers)"
    plt.close(fig)
    assert {"start", "width", "score", "gain"} <= set(ablation.rows()[0])
    back = type(ablation).from_dict(ablation.to_dict())
    assert back.windows == ablation.windows and back.scores == ablation.scores and back.full_score == ablation.full_score


def test_window_control_and_windows(record):
    c = window_control(record.control, [1, 2])
    assert c.hook_names == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    assert (c.deltas["blocks.1.hook_resid_post"] == record.control.deltas["blocks.1.hook_resid_post"]).all()
    with pytest.raises(InputError):
        window_control(record.control, [7])
    windows = default_windows(list(range(30)))
    assert (0, 30) in windows and all(s + w <= 30 for s, w in windows)
    for w in {w for _, w in windows}:
        assert max(s for s, ww in windows if ww == w) + w == 30  # every width reaches the last layer


def test_bad_window_is_an_input_error(tiny, record):
    with pytest.raises(InputError):
        layer_window_ablation(tiny, record, "angry2peaceful", windows=[(2, 2)], progress=False)


def test_suffix_ablation(tiny, root, record):
    task = get_task("angry2peaceful")
    variants = question_variants(task)
    assert variants[0] is task and len(variants) == 1 + len(task.paraphrases)
    questions = [task.question, task.paraphrases[0]]
    computed = cc.stats["computed"]
    result = suffix_ablation(tiny, task, prompts=[PROMPT], questions=questions, config=CONFIG, cache_root=root, progress=False)
    assert cc.stats["computed"] == computed + 1  # the main wording's run came from the cache
    assert result.cosines.shape == (1, tiny.n_layers, 2, 2)
    inner = result.cosines[0, :-1]
    assert np.allclose(inner[:, 0, 0], 1.0, atol=1e-5) and np.allclose(inner[:, 0, 1], inner[:, 1, 0])
    assert np.isnan(result.cosines[0, -1]).all()  # zero gradient in the last block
    assert result.final_scores[0, 0] == pytest.approx(record.score)
    assert result.main_scores[0, 0] == pytest.approx(record.score, abs=1e-5)  # scored by the same question
    assert result.informative_layers() == list(range(tiny.n_layers - 1))
    fig = result.plot()
    plt.close(fig)
    assert len(result.rows()) == 2
