"""Results show themselves as HTML in Jupyter, with model output escaped."""

import base64
import dataclasses
import re

import numpy as np

from workbench import display
from workbench.analysis.norms import NormPattern
from workbench.evaluation.judge_check import JudgeCheck, TaskCheck
from workbench.evaluation.runner import evaluate
from workbench.selfcontrol.search import self_control
from workbench.selfcontrol.tasks import Task, get_task

HOSTILE = "<script>alert('x')</script> & <b>bold</b>"


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_building_blocks_escape_everything_but_their_own_markup():
    table = display.table([{"answer": HOSTILE, "score": 0.123456, "nll": float("nan")}, {"answer": display.text("ok")}])
    assert "<script>" not in table and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp;" in table
    assert "<th" in table and ">0.1235<" in table and "<div style" in table  # text() markup kept inside a cell
    assert "<script>" not in display.card(HOSTILE, HOSTILE, display.details(HOSTILE, HOSTILE))
    md = display.markdown_table("| task | method |\n|---|---|\n| **pooled** (n=2) | +0.01\\* |\n| x | " + HOSTILE + " |")
    assert "<b>pooled</b> (n=2)" in md and "+0.01*" in md and "<script>" not in md and md.count("<tr>") == 3

    from workbench import plotting

    fig, axes = plotting.figure()
    axes[0, 0].plot([0, 1], [1, 0])
    (png,) = _images(display.figure(fig))
    assert png.startswith(b"\x89PNG")


def test_selfcontrol_result_shows_prompt_answers_scores_and_trajectory(tiny):
    result = self_control(tiny, "What is love?", Task(question="Was your answer calm?", target="No"),
                          fluency_guard=False, initial_step=-0.1, max_new_tokens=6, iterations=2, n_steps=2, progress=False)
    html = result._repr_html_()
    for part in (result.prompt, result.original_response, result.response):
        assert display.escape(part) in html
    assert f"{result.initial_score:.4f}" in html and f"{result.score:.4f}" in html
    candidates = [c for it in result.iterations for c in it.candidates]
    assert candidates and html.count("<details") == len(result.iterations)
    for c in candidates:
        assert display.escape(c.response) in html and display.escape(c.status) in html and f"{c.step:g}" in html

    hostile = dataclasses.replace(result, response=HOSTILE, prompt=HOSTILE)
    html = hostile._repr_html_()
    assert "<script>" not in html and "<b>bold</b>" not in html
    assert html.count("&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;") == 2


def test_evaluation_shows_its_table_and_figure(tiny, tmp_path):
    task = get_task("angry2peaceful")
    result = evaluate(tiny, [task], "none,prompt", task.split("test")[:1], tmp_path, max_new_tokens=4, progress=False)
    html = result._repr_html_()
    assert "<table" in html and ">none<" in html and ">prompt<" in html and task.id in html
    assert "**" not in html and _images(html)[0].startswith(b"\x89PNG")


def test_norm_pattern_shows_mean_layers_table_and_figure():
    rng = np.random.default_rng(0)
    measures = {m: rng.random((2, 3)) for m in ("grad", "sensitivity", "shift", "cumulative")}
    pattern = NormPattern("tiny<model>", "angry2peaceful", [0, 1, 2], ["p1", "p2"], measures,
                          [rng.random((3, 5)) for _ in range(2)], [0.4, 0.5], [0.45, 0.5])
    html = pattern._repr_html_()
    assert "tiny&lt;model&gt;" in html and "mean layer (grad)" in html and f"{pattern.mean_layer('shift'):.1f}" in html
    assert "<b>mean score gain</b>: 0.0250" in html
    assert html.count("<tr>") == 1 + 3 and _images(html)[0].startswith(b"\x89PNG")


def test_judge_check_shows_its_table_and_figure():
    rng = np.random.default_rng(0)

    def check(task, auc):
        t, o = list(rng.random(8)), list(rng.random(8))
        return TaskCheck(task, 8, auc, auc - 0.1, min(1.0, auc + 0.1), 0.01, 0.75, float(np.mean(t)), float(np.mean(o)), t, o)

    html = JudgeCheck("tiny", [check("calm<2>", 0.9), check("other", 0.4)])._repr_html_()
    assert "calm&lt;2&gt;" in html and "0.90 [0.80, 1.00]" in html and "usable" in html
    assert html.index("calm&lt;2&gt;") < html.index(">other<")  # best-separated first, like the Markdown table
    assert _images(html)[0].startswith(b"\x89PNG")
