import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sigkill import killed

import workbench as wb
from workbench.errors import (
    IncompatibleArtifactError,
    InputError,
    ResumeMismatchError,
    RunLockedError,
)
from workbench.prefix.synthesis import INDEX, capture_states, load_records, read_index, synthesize
from workbench.selfcontrol.control import Control
from workbench.selfcontrol.search import SelfControlConfig
from workbench.selfcontrol.tasks import get_task

FAST = SelfControlConfig(iterations=1, n_steps=2, max_new_tokens=3, progress=False)


def test_capture_states_sees_the_control(tiny):
    ids = tiny.chat_ids("hello there")
    clean = capture_states(tiny, ids)
    assert clean.shape == (tiny.n_layers, len(ids), tiny.d_model) and clean.dtype == torch.float32
    names = tiny.hook_names()
    control = Control({names[0]: torch.randn(len(ids), tiny.d_model)}, tiny.model_id)
    controlled = capture_states(tiny, ids, control=control)
    # the first hook's captured state is exactly clean + delta; later layers move too
    torch.testing.assert_close(controlled[0] - clean[0], control.deltas[names[0]], atol=1e-5, rtol=1e-5)
    assert (controlled[-1] - clean[-1]).abs().max() > 1e-3


def test_synthesize_writes_records_and_resumes(tiny, tmp_path):
    out = synthesize(tiny, "angry2peaceful", "train", tmp_path / "d", limit=2, config=FAST, progress=False)
    manifest, records = load_records(out, tiny)
    assert manifest["model_id"] == tiny.model_id and manifest["task"]["id"] == "angry2peaceful"
    assert len(records) == 2
    for r in records:
        assert r.hidden.shape == (tiny.n_layers, len(r.prompt_ids), tiny.d_model) and r.hidden.device == tiny.device
        assert r.control.prompt_len == len(r.prompt_ids)
        assert torch.equal(r.hidden, capture_states(tiny, r.prompt_ids, control=r.control))
        for key in ("initial_score", "score", "nll", "original_nll", "shift_fraction", "control_norm"):
            assert key in r.info
    first_keys = [e["key"] for e in read_index(out)]
    synthesize(tiny, "angry2peaceful", "train", out, limit=3, config=FAST, progress=False)
    entries = read_index(out)
    assert [e["key"] for e in entries][:2] == first_keys and len(entries) == 3  # the first two were not redone
    assert [e["index"] for e in entries] == [0, 1, 2]


def test_synthesize_refuses_other_settings_and_models(tiny, tiny_mha, tmp_path):
    out = synthesize(tiny, "angry2peaceful", ["hi there"], tmp_path / "d", config=FAST, progress=False)
    with pytest.raises(InputError, match="config.max_new_tokens"):
        synthesize(tiny, "angry2peaceful", ["hi there"], out, config=SelfControlConfig(iterations=1, n_steps=2, max_new_tokens=5))
    with pytest.raises(InputError, match="task"):
        synthesize(tiny, "happy2sad", ["hi there"], out, config=FAST, progress=False)
    with pytest.raises(InputError, match="model_id"):
        synthesize(tiny_mha, "angry2peaceful", ["hi there"], out, config=FAST, progress=False)
    with pytest.raises(IncompatibleArtifactError, match="synthesised on"):
        load_records(out, tiny_mha)


def test_synthesize_refuses_another_split_prompt_or_dtype_and_restart_starts_over(tiny, tmp_path):
    """Issue 11.1: `--split test` into a `--split train` folder appended test prompts that training then used."""
    out = synthesize(tiny, "angry2peaceful", "train", tmp_path / "d", limit=1, config=FAST, progress=False)
    with pytest.raises(ResumeMismatchError, match="split: 'train' stored vs 'test' now") as caught:
        synthesize(tiny, "angry2peaceful", "test", out, limit=1, config=FAST, progress=False)
    assert "another --out" in str(caught.value) and "--restart" in str(caught.value)
    with pytest.raises(ResumeMismatchError, match="prompts.0: "):  # a list whose first prompt is another
        synthesize(tiny, "angry2peaceful", ["something else"], out, config=FAST, progress=False)
    half = wb.load_model("tiny-random", dtype=torch.bfloat16, progress=False)
    with pytest.raises(ResumeMismatchError, match="model.dtype: 'float32' stored vs 'bfloat16' now"):
        synthesize(half, "angry2peaceful", "train", out, limit=1, config=FAST, progress=False)
    assert len(read_index(out)) == 1  # nothing was appended by the refused runs
    synthesize(tiny, "angry2peaceful", "test", out, limit=1, config=FAST, progress=False, restart=True)
    manifest, records = load_records(out, tiny)
    assert manifest["split"] == "test" and [r.prompt for r in records] == get_task("angry2peaceful").split("test")[:1]


def test_a_second_writer_of_a_synthesis_folder_is_refused(tiny, tmp_path):
    from workbench.store import folder_lock

    out = tmp_path / "d"
    with folder_lock(out):  # another run holds the folder
        with pytest.raises(RunLockedError, match="being written by another process"):
            synthesize(tiny, "angry2peaceful", ["hi"], out, config=FAST, progress=False)


def test_torn_last_index_line_is_ignored_and_cut(tiny, tmp_path):
    out = synthesize(tiny, "angry2peaceful", ["one", "two"], tmp_path / "d", config=FAST, progress=False)
    with open(out / INDEX, "a") as f:
        f.write('{"key": "00001-torn", "prom')
    assert len(read_index(out)) == 2
    synthesize(tiny, "angry2peaceful", ["one", "two", "three"], out, config=FAST, progress=False)
    lines = (out / INDEX).read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line) for line in lines)


# the third record is on disk, its index line is not: SIGKILL then
KILLED_RUN = """
import sys
import workbench as wb
from workbench.selfcontrol.search import SelfControlConfig
from workbench.prefix.synthesis import synthesize
model = wb.load_model("tiny-random", progress=False)
synthesize(model, "angry2peaceful", "train", sys.argv[1], limit=int(sys.argv[2]),
           config=SelfControlConfig(iterations=1, n_steps=2, max_new_tokens=3), progress=False)
"""


def _all_files_load(folder: Path) -> int:
    n = 0
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix == ".safetensors":
            load_file(path)
            n += 1
        elif path.is_file() and path.suffix == ".json":
            json.loads(path.read_text())
    return n


def test_synthesis_survives_sigkill(tiny, tmp_path):
    out = tmp_path / "killed"
    limit = 5
    killed(KILLED_RUN, out, limit, at="workbench.prefix.synthesis._write_record", call=3)
    done_before = read_index(out)
    assert len(done_before) == 2  # the prompt in flight (its record written, its index line not) is lost
    assert _all_files_load(out) >= len(done_before)
    _, records = load_records(out, tiny)
    assert len(records) == len(done_before)
    stamps = {e["key"]: (out / "records" / e["key"] / "tensors.safetensors").stat().st_mtime_ns for e in done_before}

    synthesize(tiny, "angry2peaceful", "train", out, limit=limit, config=FAST, progress=False)
    entries = read_index(out)
    keys = [e["key"] for e in entries]
    assert len(entries) == limit and len(set(keys)) == limit
    assert keys[: len(done_before)] == [e["key"] for e in done_before]
    for key, stamp in stamps.items():  # finished prompts were not redone
        assert (out / "records" / key / "tensors.safetensors").stat().st_mtime_ns == stamp
    assert not list((out / "records").glob(".tmp-*"))
    _all_files_load(out)


def test_synthesis_records_do_not_depend_on_the_batch_of_prompts(tiny, tmp_path):
    """Batched searches (several prompts at once) write the records one-at-a-time searches write."""
    cfg = SelfControlConfig(iterations=2, n_steps=2, max_new_tokens=4, progress=False)
    one = read_index(synthesize(tiny, "angry2peaceful", "train", tmp_path / "one", limit=3, config=cfg,
                                batch_size=1, progress=False))
    three = read_index(synthesize(tiny, "angry2peaceful", "train", tmp_path / "three", limit=3, config=cfg,
                                  batch_size=3, progress=False))
    for a, b in zip(one, three, strict=True):
        assert (a["key"], a["response"], a["original_response"]) == (b["key"], b["response"], b["original_response"])
        assert a["iterations_accepted"] == b["iterations_accepted"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
    with pytest.raises(InputError, match="batch_size"):
        synthesize(tiny, "angry2peaceful", "train", tmp_path / "zero", limit=1, config=cfg, batch_size=0)
