"""The five control studies under analyses/ run end to end (tiny model, two prompts, two iterations)
and write the figures and tables their docstrings promise: every number in the CSV is one the JSON
reports, and every figure's axes say what they show."""

import csv
import json
import math

import pytest

from analyses import (
    directions,
    layer_ablation,
    norm_patterns,
    repe_cosine,
    step_geometry,
    suffix_ablation,
)

SMALL = ["--model", "tiny-random", "--tasks", "angry2peaceful", "--n-prompts", "2",
         "--iterations", "2", "--max-new-tokens", "6", "--batch-prompts", "2"]


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """A fresh control cache per test, so each study computes what it reports."""
    cache = tmp_path / "home"
    (cache).mkdir()
    from workbench.model.loading import workbench_home

    (cache / "models").symlink_to(workbench_home() / "models", target_is_directory=True)
    monkeypatch.setenv("WORKBENCH_HOME", str(cache))
    return cache


@pytest.mark.parametrize("study, outputs", [
    (norm_patterns, ["heatmap.png", "angry2peaceful.png", "norm_patterns.csv"]),
    (directions, ["pca_by_layer.png", "trajectories.png", "directions.csv"]),
    (repe_cosine, ["repe_cosine.png", "repe_cosine.csv"]),
    (layer_ablation, ["angry2peaceful.png", "layer_ablation.csv"]),
    (suffix_ablation, ["angry2peaceful.png", "suffix_ablation.csv"]),
    (step_geometry, ["step_geometry.png", "step_geometry.csv"]),
], ids=lambda s: getattr(s, "__name__", "").removeprefix("analyses."))
def test_study_writes_its_outputs(study, outputs, home, tmp_path, monkeypatch):
    from workbench import plotting

    name = study.__name__.removeprefix("analyses.")
    out = tmp_path / "out"
    figure = tmp_path / "docs" / "figure.png"
    unlabelled, saved = [], []
    original_save = plotting.save

    def named(label, ticks):  # an axis label, or categorical tick labels set by the study (numeric ones appear at draw)
        return bool(label) or any(t.get_text() for t in ticks)

    def checked_save(fig, path, *args, **kwargs):  # every drawn axis names what its axes show
        for ax in fig.axes:
            if getattr(ax, "_colorbar", None) is not None or not ax.axison or not ax.has_data():
                continue
            if not named(ax.get_xlabel(), ax.get_xticklabels()) or not named(ax.get_ylabel(), ax.get_yticklabels()):
                unlabelled.append(f"{path}: {ax.get_title()!r} x={ax.get_xlabel()!r} y={ax.get_ylabel()!r}")
        saved.append(path)
        return original_save(fig, path, *args, **kwargs)

    monkeypatch.setattr(plotting, "save", checked_save)
    study.main([*SMALL, "--out", str(out), "--docs-figure", str(figure)])
    for file in outputs:
        assert (out / file).stat().st_size > 0, file
    assert figure.read_bytes() == (out / outputs[0]).read_bytes()  # the README figure is the study's main one
    assert {out / f for f in outputs if f.endswith(".png")} <= {type(out)(p) for p in saved}
    assert not unlabelled, unlabelled
    summary = json.loads((out / f"{name}.json").read_text())
    assert summary["model"] == "tiny-random" and summary["seconds"] > 0

    # the CSV holds the JSON's numbers: every numeric cell is a value the JSON reports
    reported = set()

    def collect(node):
        if isinstance(node, dict):
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)
        elif isinstance(node, int | float) and not isinstance(node, bool) and math.isfinite(node):
            reported.add(round(float(node), 5))

    collect(summary)
    table = next(f for f in outputs if f.endswith(".csv"))
    with (out / table).open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows, table
    numbers = 0
    for row in rows:
        for column, cell in row.items():
            if column.endswith("index"):  # a position in a list, not a measurement
                continue
            try:
                value = float(cell)
            except (TypeError, ValueError):
                continue
            if math.isfinite(value):
                numbers += 1
                assert round(value, 5) in reported, f"{table} {column}={cell} is not in {name}.json"
    assert numbers >= len(rows)


def test_throughput_benchmark_prints_consistent_json(capsys):
    """``analyses.throughput --json`` on the tiny model: one object keyed by dtype, figures that agree with each other."""
    from analyses import throughput

    throughput.main(["--model", "tiny-random", "--dtypes", "float32", "--json", "--n-prompts", "3", "--batch", "3",
                     "--max-new-tokens", "6"])
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(data) == ["float32"]  # --dtypes float32 runs one dtype only
    r = data["float32"]
    for key in ("sequential_prompts_per_min", "batched_prompts_per_min", "ratio", "amortized_plain_generations",
                "same_step_fraction", "gain_sequential", "gain_batched"):
        assert isinstance(r[key], float | int), key
    assert r["prompts"] == 3 and r["batch_size"] == 3
    assert r["sequential_prompts_per_min"] == pytest.approx(60 * 3 / r["sequential_seconds"], rel=0.01)
    assert r["batched_prompts_per_min"] == pytest.approx(60 * 3 / r["batched_seconds"], rel=0.01)
    assert r["ratio"] == pytest.approx(r["batched_prompts_per_min"] / r["sequential_prompts_per_min"], rel=0.01)
    assert r["amortized_plain_generations"] == pytest.approx(
        r["batched_seconds"] / 3 / r["plain_generation_seconds"], rel=0.02)
    assert 0 <= r["tie_fraction"] <= r["same_step_fraction"] <= 1 and r["iterations_compared"] >= 3
    # the batched search means the same as one prompt at a time (equivalence is tested in tests/selfcontrol)
    assert r["same_step_fraction"] == 1.0 and r["gain_batched"] == pytest.approx(r["gain_sequential"], abs=2e-3)
    assert sum(r["batched_time_split"].values()) <= 1.0 + 1e-6


def test_step_geometry_study_compares_every_geometry(home, tmp_path):
    """The step-geometry study: one row per (prompt, geometry), a summary per geometry, the README table."""
    from workbench.selfcontrol.steps import GEOMETRIES

    out = tmp_path / "out"
    step_geometry.main(["--model", "tiny-random", "--tasks", "angry2peaceful", "--n-prompts", "2", "--iterations", "1",
                        "--max-new-tokens", "6", "--initial-step", "-0.05", "--out", str(out)])
    summary = json.loads((out / "step_geometry.json").read_text())
    rows = summary["rows"]
    assert len(rows) == 2 * len(GEOMETRIES) and {r["geometry"] for r in rows} == set(GEOMETRIES)
    assert list(summary["summary"]) == list(GEOMETRIES)
    for g, s in summary["summary"].items():
        mine = [r for r in rows if r["geometry"] == g]
        assert s["n"] == 2 and s["gain"] == pytest.approx(sum(r["gain"] for r in mine) / 2)
        assert s["sink_share"] == 0.0 or s["sink_share"] != s["sink_share"]  # 0, or NaN when no run found a control
    assert all(r["sink_share"] == 0.0 for r in rows)  # the tiny random model has no massive activations
    # no sinks: the sink rules equal the position rule, prompt by prompt
    by = {(r["prompt"], r["geometry"]): r for r in rows}
    for r in rows:
        if r["geometry"] in ("sink-off", "sink-median"):
            assert r["score"] == pytest.approx(by[r["prompt"], "position"]["score"])
    assert summary["summary"]["sink-off"]["delta_vs_position"] == pytest.approx(0.0)
    table = (out / "step_geometry.md").read_text().splitlines()
    assert table[0].startswith("| geometry |") and len(table) == 2 + len(GEOMETRIES)
    assert (out / "step_geometry.png").stat().st_size > 5000
    import csv

    with (out / "step_geometry.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert [float(r["gain"]) for r in csv_rows] == pytest.approx([r["gain"] for r in rows])


def test_guard_effect_counts_refused_candidates_that_beat_the_best_so_far():
    """Planted search: iteration 0 refuses a higher-scoring disfluent candidate, iteration 1 a lower degenerate one."""
    from types import SimpleNamespace

    def cand(score, status):
        return {"step": -0.01, "score": score, "nll": 1.0, "status": status, "response": ""}

    record = SimpleNamespace(initial_score=0.40, score=0.42, iteration_scores=[0.42, 0.42], candidates=[
        [cand(0.39, "not better"), cand(0.42, "accepted"), cand(0.47, "disfluent: NLL 3 > 1 + 0.5")],
        [cand(0.41, "degenerate: repeats"), cand(0.43, "disfluent: NLL 2 > 1 + 0.5"), cand(0.0, "not evaluated")],
    ])
    # refused: 0.47 (> 0.40 before iteration 0), 0.41 (< 0.42 before iteration 1), 0.43 (> 0.42)
    assert step_geometry.guard_effect(record) == (3, 2, pytest.approx(0.07))
    record.candidates[0][2]["status"] = "better, later step"  # not a guard refusal: the best refused one is now 0.43
    assert step_geometry.guard_effect(record) == (2, 1, pytest.approx(0.03))
