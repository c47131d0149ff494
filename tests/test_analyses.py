"""The five control studies under analyses/ run end to end (tiny model, two prompts, two iterations)
and write the figures and tables their docstrings promise."""

import json

import pytest

from analyses import directions, layer_ablation, norm_patterns, repe_cosine, suffix_ablation

SMALL = ["--model", "tiny-random", "--tasks", "angry2peaceful", "--n-prompts", "2",
         "--iterations", "2", "--max-new-tokens", "6"]


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
], ids=lambda s: getattr(s, "__name__", "").removeprefix("analyses."))
def test_study_writes_its_outputs(study, outputs, home, tmp_path):
    name = study.__name__.removeprefix("analyses.")
    out = tmp_path / "out"
    figure = tmp_path / "docs" / "figure.png"
    study.main([*SMALL, "--out", str(out), "--docs-figure", str(figure)])
    for file in outputs:
        assert (out / file).stat().st_size > 0, file
    assert figure.read_bytes() == (out / outputs[0]).read_bytes()  # the README figure is the study's main one
    summary = json.loads((out / f"{name}.json").read_text())
    assert summary["model"] == "tiny-random" and summary["seconds"] > 0


def test_step_geometry_study_compares_every_geometry(home, tmp_path):
    """The step-geometry study: one row per (prompt, geometry), a summary per geometry, the README table."""
    from analyses import step_geometry
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
