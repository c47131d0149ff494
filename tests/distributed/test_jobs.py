"""synthesize on Ray (tiny model, two CPU workers): the same records as one process, each written once,
whichever worker or driver dies."""

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray.cloudpickle
import torch
from sigkill import killed

import workbench as wb
from workbench.distributed import jobs
from workbench.distributed.jobs import RaySettings, SynthesisJob, synthesize_on_ray
from workbench.prefix.synthesis import load_records, read_index, synthesize

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROOT = Path(__file__).resolve().parents[2]
TASK = "angry2peaceful"
N = 6
SEARCH = dict(iterations=2, n_steps=2, max_new_tokens=6)
CLI = ["synthesize", "--model", "tiny-random", "--task", TASK, "--limit", str(N), "--iterations", "2",
       "--n-steps", "2", "--max-new-tokens", "6", "--json"]


def cfg():
    return wb.SelfControlConfig(**SEARCH)


def entries(folder):
    """Index entries by key, without the wall time (the one field that differs between runs)."""
    out = {}
    for e in read_index(folder):
        assert e["key"] not in out, f"{e['key']} written twice"
        out[e["key"]] = {k: v for k, v in e.items() if k != "seconds"}
    return out


def assert_same_data(folder, reference):
    got, want = entries(folder), entries(reference)
    assert sorted(got) == sorted(want)
    for key in want:
        for field, value in want[key].items():
            if isinstance(value, float) or (isinstance(value, list) and value and isinstance(value[0], float)):
                assert got[key][field] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, field)
            else:
                assert got[key][field] == value, (key, field)
    _, records = load_records(folder)
    _, ref_records = load_records(reference)
    for r, q in zip(sorted(records, key=lambda r: r.key), sorted(ref_records, key=lambda r: r.key), strict=True):
        torch.testing.assert_close(r.hidden, q.hidden, rtol=1e-4, atol=1e-5)
        assert r.control.hook_names == q.control.hook_names
    assert sorted(p.name for p in (folder / "records").iterdir()) == sorted(want)  # no orphan or temp folder


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The single-process run's data for the same prompts."""
    return synthesize(tiny, TASK, "train", tmp_path_factory.mktemp("single"), limit=N, config=cfg(), progress=False)


@dataclass
class DiesOnce(SynthesisJob):
    """SIGKILLs its own process the first time it is handed ``prompt index 2`` (a marker file remembers)."""

    marker: str = ""

    def run(self, model, items):
        if any(i == 2 for _, (i, _) in items) and not Path(self.marker).exists():
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().run(model, items)


def test_a_worker_killed_mid_run_the_run_completes_with_the_single_process_records_once_each(
        ray_cluster, reference, tmp_path, monkeypatch):
    marker = tmp_path / "died"
    monkeypatch.setattr(jobs, "SynthesisJob", lambda load, task, config: DiesOnce(load, task, config, str(marker)))
    settings = RaySettings(workers=2, chunk_size=1)
    out = synthesize_on_ray({"name": "tiny-random"}, TASK, "train", tmp_path / "ray", limit=N, config=cfg(),
                            ray=settings, progress=False)
    assert marker.exists() and settings.stats.workers_lost == 1 and settings.stats.retried >= 1
    assert settings.stats.written == N and len(settings.stats.per_worker) >= 2
    assert_same_data(out, reference)


DRIVER = "import sys\nfrom workbench.cli import main\nsys.exit(main(sys.argv[1:]))"


def test_the_driver_killed_mid_run_resumes_on_rerun(ray_cluster, reference, tmp_path):
    out = tmp_path / "ray"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    # dies after the 3rd record folder is in place, before its index line
    killed(DRIVER, *CLI, "--out", out, "--ray", "--ray-workers", "2", env=env, cwd=tmp_path,
           at="workbench.prefix.synthesis._write_record", call=3)
    before = entries(out)
    assert len(before) == 2 and len(list((out / "records").iterdir())) == 3  # the 3rd folder has no index line
    from workbench.cli import main

    assert main([*CLI, "--out", str(out), "--ray", "--ray-workers", "2"]) == 0  # joins the session's cluster
    assert_same_data(out, reference)
    assert {k: entries(out)[k] for k in before} == before  # finished records were not redone


EVAL = dict(tasks="angry2peaceful", methods="none,repe,selfcontrol", prompts="test", limit=3, max_new_tokens=6,
            selfcontrol={"iterations": 1, "n_steps": 2}, repe={"coefficients": [0.0, 1.0], "n_select": 2, "n_pairs": 4})


def comparable(records):
    """Records by (method, prompt), without wall times."""
    out = {}
    for r in records:
        key = (r["method"], r["prompt"])
        assert key not in out, f"{key} written twice"
        out[key] = {k: v for k, v in r.items() if k not in ("seconds", "info")}
    return out


def test_evaluate_on_ray_writes_the_single_process_records_and_resumes(ray_cluster, tiny, tmp_path):
    from workbench.distributed.jobs import evaluate_on_ray
    from workbench.evaluation.runner import evaluate
    from workbench.store import read_jsonl

    single = evaluate(tiny, out_dir=tmp_path / "single", progress=False, **EVAL)
    settings = RaySettings(workers=2, chunk_size=1)
    sharded = evaluate_on_ray({"name": "tiny-random"}, out_dir=tmp_path / "ray", ray=settings, progress=False, **EVAL)
    assert settings.stats.written == 3 and len(settings.stats.per_worker) == 2  # both workers answered
    got, want = comparable(read_jsonl(tmp_path / "ray" / "results.jsonl")), comparable(single.records)
    assert sorted(got) == sorted(want)
    for key, record in want.items():
        for field, value in record.items():
            if isinstance(value, float):
                assert got[key][field] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, field)
            else:
                assert got[key][field] == value, (key, field)
    assert (tmp_path / "ray" / "summary.md").is_file() and len(sharded.records) == 9
    again = RaySettings(workers=1)
    evaluate_on_ray({"name": "tiny-random"}, out_dir=tmp_path / "ray", ray=again, progress=False, **EVAL)
    assert again.stats.items == 0  # a rerun finds everything done
    assert len(read_jsonl(tmp_path / "ray" / "results.jsonl")) == 9
