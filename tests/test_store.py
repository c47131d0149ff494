import json
import shutil

import pytest
import torch

import workbench as wb
from workbench.store import load_artifact, read_config, save_artifact


def test_round_trip_records_kind_version_and_model(tiny, tmp_path):
    tensors = {"blocks.0.hook_resid_post": torch.arange(6.0).view(2, 3)}
    save_artifact(tmp_path, "thing", tensors, {"model_id": tiny.model_id, "d_model": tiny.d_model})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["kind"] == "thing" and config["format_version"] == 1 and config["model_id"] == "tiny-random"
    loaded, cfg = load_artifact(tmp_path, "thing", model=tiny)
    assert torch.equal(loaded["blocks.0.hook_resid_post"], tensors["blocks.0.hook_resid_post"])
    assert not list(tmp_path.glob("*.tmp"))


def test_refusals(tiny, tiny_mha, tmp_path):
    save_artifact(tmp_path, "thing", {"x": torch.zeros(1)}, {"model_id": tiny.model_id, "d_model": tiny.d_model})
    with pytest.raises(wb.IncompatibleArtifactError, match="not a 'other'"):
        read_config(tmp_path, "other")
    with pytest.raises(wb.IncompatibleArtifactError, match="made for model 'tiny-random'"):
        load_artifact(tmp_path, "thing", model=tiny_mha)
    config = json.loads((tmp_path / "config.json").read_text())
    config["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(wb.IncompatibleArtifactError, match="format version 99"):
        read_config(tmp_path, "thing")


# ---- a damaged folder: one clear error from every loader ------------------------------------
KINDS = ["control", "prefix controller", "reading vector", "synthesis record"]


@pytest.fixture(scope="module")
def originals(tiny, tmp_path_factory):
    """One saved object of each kind (each test damages a copy)."""
    from workbench.analysis.repe import ReadingVector
    from workbench.prefix.controller import PrefixController
    from workbench.prefix.synthesis import synthesize
    from workbench.selfcontrol.search import SelfControlConfig

    root = tmp_path_factory.mktemp("artifacts")
    wb.Control.zeros(tiny, 3).save(root / "control")
    PrefixController.init(tiny, 2, residual_layers=[1]).save(root / "prefix controller")
    states = {n: torch.randn(6, tiny.d_model) for n in tiny.hook_names()}
    ReadingVector.from_states(states, {n: -s for n, s in states.items()}, model_id=tiny.model_id).save(root / "reading vector")
    config = SelfControlConfig(iterations=1, n_steps=1, max_new_tokens=2, progress=False)
    synthesize(tiny, "angry2peaceful", ["hi there"], root / "synthesis record", config=config, progress=False)
    return root


def _saved(kind, tiny, originals, folder):
    """A fresh copy of the saved ``kind``: (the artifact folder to damage, a loader reading it on ``tiny``)."""
    from workbench.analysis.repe import ReadingVector
    from workbench.prefix.controller import PrefixController
    from workbench.prefix.synthesis import RECORDS, load_records

    shutil.copytree(originals / kind, folder)
    if kind == "control":
        return folder, lambda: wb.Control.load(folder, tiny)
    if kind == "prefix controller":
        return folder, lambda: PrefixController.load(folder, tiny)
    if kind == "reading vector":
        return folder, lambda: ReadingVector.load(folder, tiny)
    (record,) = (folder / RECORDS).iterdir()
    return record, lambda: load_records(folder, tiny)


def _truncate(folder):
    path = folder / "tensors.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_a_tensor(folder):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "tensors.safetensors")
    save_file(dict(list(tensors.items())[1:]), folder / "tensors.safetensors")


DAMAGE = {
    "truncated tensors": (_truncate, "tensors.safetensors is truncated or unreadable"),
    "missing config": (lambda f: (f / "config.json").unlink(), "config.json is missing"),
    "config not JSON": (lambda f: (f / "config.json").write_text('{"kind": "con'), "config.json is unreadable"),
    "missing tensors": (lambda f: (f / "tensors.safetensors").unlink(), "tensors.safetensors is missing"),
    "a tensor gone": (_drop_a_tensor, "tensors.safetensors lacks"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("kind", KINDS)
def test_every_loader_reports_a_damaged_folder_as_corrupt(tiny, originals, tmp_path, kind, damage):
    folder, load = _saved(kind, tiny, originals, tmp_path / "saved")
    load()  # intact: loads
    spoil, message = DAMAGE[damage]
    spoil(folder)
    with pytest.raises(wb.CorruptArtifactError) as caught:
        load()
    text = str(caught.value)
    assert f"{folder} holds a damaged" in text and message in text
    assert "Delete the folder" in text or "Synthesise again" in text
    assert isinstance(caught.value, wb.IncompatibleArtifactError)  # callers that refuse unusable artifacts still do


def test_a_folder_that_holds_nothing_is_not_called_damaged(tmp_path):
    for folder in (tmp_path / "missing", tmp_path):
        with pytest.raises(wb.IncompatibleArtifactError, match="holds no saved control") as caught:
            wb.Control.load(folder)
        assert not isinstance(caught.value, wb.CorruptArtifactError)


# ---- the shared writers ------------------------------------------------------------------------
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from sigkill import killed  # noqa: E402

from workbench.store import (  # noqa: E402
    append_jsonl,
    atomic_write,
    atomic_write_json,
    check_fingerprint,
    content_hash,
    folder_lock,
    read_jsonl,
)

DIE = "import os, signal\ndef die(*a, **k):\n    os.kill(os.getpid(), signal.SIGKILL)\n"


def _killed(code: str, *args: object) -> subprocess.CompletedProcess:
    """``code`` SIGKILLs itself through ``die`` where it chooses."""
    return killed(DIE + code, *args)


def test_atomic_write_replaces_whole_files(tmp_path):
    path = atomic_write(tmp_path / "sub" / "a.txt", "first")
    assert path.read_text() == "first" and path.stat().st_mode & 0o777 == 0o644  # not the temp file's 0600
    path.chmod(0o640)
    atomic_write(path, b"\x00second")
    assert path.read_bytes() == b"\x00second" and path.stat().st_mode & 0o777 == 0o640  # a replaced file keeps its mode
    atomic_write_json(tmp_path / "a.json", {"x": (1, 2)})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2]}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.json", "a.txt", "sub"]  # no temp file left


def test_atomic_write_killed_before_the_rename_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"version": "old"})
    killed("from workbench.store import atomic_write_json\nimport sys\n"
           "atomic_write_json(sys.argv[1], {'version': 'new' * 1000})", path, at="os.replace", after=False)
    assert json.loads(path.read_text()) == {"version": "old"}
    atomic_write_json(path, {"version": "new"})
    assert json.loads(path.read_text()) == {"version": "new"}


def test_read_jsonl_drops_a_torn_last_line_with_a_warning_and_repairs_the_file(tmp_path, caplog):
    path = tmp_path / "log.jsonl"
    assert read_jsonl(path) == []
    for i in range(3):
        append_jsonl(path, {"i": i})
    intact = path.read_bytes()
    for torn in (b'{"i": 3, "x"', b'{"i": 3}', b"[1, 2]\n", b"\n\n"):  # cut mid-line, no newline yet, not an object
        path.write_bytes(intact + torn)
        with caplog.at_level(logging.WARNING, logger="workbench"):
            caplog.clear()
            records = read_jsonl(path)
        assert records == [{"i": 0}, {"i": 1}, {"i": 2}]
        if torn.strip():
            assert "dropped a torn last line 4" in caplog.text
            assert path.read_bytes() == intact  # repaired: the next append starts on a fresh line
    path.write_bytes(intact + b'{"i": 3, "x')
    append_jsonl(path, {"i": 3})  # an append after a torn tail cuts it off first
    assert read_jsonl(path) == [{"i": i} for i in range(4)]


def test_read_jsonl_refuses_a_corrupt_line_before_the_last(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"i": 0}\n{"i": 1\n{"i": 2}\n')
    with pytest.raises(wb.CorruptArtifactError, match="corrupt line 2"):
        read_jsonl(path)
    assert path.read_text() == '{"i": 0}\n{"i": 1\n{"i": 2}\n'  # nothing is cut on an error


def test_append_jsonl_killed_mid_line_loses_only_that_line(tmp_path, caplog):
    path = tmp_path / "log.jsonl"
    code = ("import sys\nfrom workbench.store import append_jsonl\n"
            "append_jsonl(sys.argv[1], {'i': 0}); append_jsonl(sys.argv[1], {'i': 1})\n"
            "write = os.write\n"
            "def half(fd, data):\n    write(fd, bytes(data)[: len(data) // 2]); die()\n"
            "os.write = half\nappend_jsonl(sys.argv[1], {'i': 2, 'text': 'x' * 100})\n")
    _killed(code, path)
    assert path.read_bytes().startswith(b'{"i": 0}\n{"i": 1}\n{"i": 2, "text": "xx')  # torn mid-line
    assert not path.read_bytes().endswith(b"\n")
    with caplog.at_level(logging.WARNING, logger="workbench"):
        assert read_jsonl(path) == [{"i": 0}, {"i": 1}]
    assert "torn last line" in caplog.text and path.read_text().endswith("}\n")
    append_jsonl(path, {"i": 2})
    assert read_jsonl(path) == [{"i": i} for i in range(3)]


def test_append_jsonl_killed_before_fsync_returns_keeps_whole_lines(tmp_path):
    path = tmp_path / "log.jsonl"
    _killed("import sys\nfrom workbench.store import append_jsonl\nappend_jsonl(sys.argv[1], {'i': 0})\n"
            "os.fsync = die\nappend_jsonl(sys.argv[1], {'i': 1})\n", path)
    assert read_jsonl(path) == [{"i": 0}, {"i": 1}]  # written before the kill: whole (the page cache survives the process)


SAVE = ("import sys, torch\nfrom workbench.store import save_artifact\n"
        "save_artifact(sys.argv[1], 'thing', {'x': torch.ones(3)}, {'model_id': 'm', 'size': 'new'})\n")


@pytest.mark.parametrize("at", [1, 2])
def test_save_artifact_killed_between_its_files_never_loads_a_mix(tmp_path, at):
    folder = tmp_path / "thing"
    save_artifact(folder, "thing", {"x": torch.zeros(3)}, {"model_id": "m", "size": "old"})
    killed(SAVE, folder, at="os.replace", call=at, after=False)  # the at-th rename does not happen
    if at == 1:  # killed before the tensors were renamed: the old object is intact
        tensors, config = load_artifact(folder, "thing")
        assert torch.equal(tensors["x"], torch.zeros(3)) and config["size"] == "old"
    else:  # new tensors, old config: refused, not loaded as a mix
        with pytest.raises(wb.CorruptArtifactError, match="does not match the hash"):
            load_artifact(folder, "thing")
    save_artifact(folder, "thing", {"x": torch.ones(3)}, {"model_id": "m", "size": "new"})
    tensors, config = load_artifact(folder, "thing")
    assert torch.equal(tensors["x"], torch.ones(3)) and config["size"] == "new"


def test_content_hash_follows_content_not_path(tmp_path):
    save_artifact(tmp_path / "a", "thing", {"x": torch.zeros(3)}, {"model_id": "m"})
    save_artifact(tmp_path / "b", "thing", {"x": torch.zeros(3)}, {"model_id": "m"})
    save_artifact(tmp_path / "c", "thing", {"x": torch.tensor([0.0, 0.0, 1e-6])}, {"model_id": "m"})
    assert content_hash(tmp_path / "a", "thing") == content_hash(tmp_path / "b", "thing")
    assert content_hash(tmp_path / "a", "thing") != content_hash(tmp_path / "c", "thing")


HOLD = ("import sys, time\nfrom workbench.store import folder_lock\n"
        "with folder_lock(sys.argv[1]):\n    print('locked', flush=True)\n    " + "{}\n")


def test_folder_lock_refuses_a_live_second_writer(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", HOLD.format("time.sleep(120)"), str(tmp_path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(wb.RunLockedError, match=f"pid {child.pid}"):
            with folder_lock(tmp_path):
                pass
    finally:
        os.kill(child.pid, signal.SIGTERM)
        child.wait()
    with folder_lock(tmp_path) as lock:  # the holder is gone: free again
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(wb.RunLockedError):  # one writer, even within a process
            with folder_lock(tmp_path):
                pass
    assert not lock.exists()


def test_folder_lock_takes_over_a_stale_lock_with_a_warning(tmp_path, caplog):
    proc = killed(HOLD.format("time.sleep(120)"), tmp_path, at="time.sleep")
    assert proc.stdout.strip() == "locked" and (tmp_path / ".lock").is_file()
    dead = json.loads((tmp_path / ".lock").read_text())["pid"]
    with caplog.at_level(logging.WARNING, logger="workbench"), folder_lock(tmp_path) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"stale lock left by pid {dead}" in caplog.text


def test_check_fingerprint_stores_then_refuses_naming_every_difference(tmp_path):
    first = {"model": "m", "dtype": "float32", "decoding": {"max_new_tokens": 40, "seed": 0}}
    assert check_fingerprint(tmp_path, first) == first
    assert json.loads((tmp_path / "run.json").read_text())["fingerprint"] == first
    assert check_fingerprint(tmp_path, dict(first)) == first  # the same run resumes
    with pytest.raises(wb.ResumeMismatchError) as caught:
        check_fingerprint(tmp_path, {"model": "m", "dtype": "bfloat16", "decoding": {"max_new_tokens": 20, "seed": 0},
                                     "prompts": ["a"]})
    text = str(caught.value)
    for line in ("dtype: 'float32' stored vs 'bfloat16' now", "decoding.max_new_tokens: 40 stored vs 20 now",
                 "prompts: (absent) stored vs [\"a\"] now", "another --out", "--restart"):
        assert line in text
    assert "seed" not in text
    assert isinstance(caught.value, wb.InputError)


def test_check_fingerprint_extendable_keys_grow_but_never_shrink_or_change(tmp_path):
    user = {"model": "m", "methods": {"none": {}, "prompt": {"style": "user"}}}
    check_fingerprint(tmp_path, user, extendable=["methods"])
    assert check_fingerprint(tmp_path, {"model": "m", "methods": {"none": {}}}, extendable=["methods"]) == user
    with pytest.raises(wb.ResumeMismatchError, match="methods.prompt.style: 'user' stored vs 'system' now"):
        check_fingerprint(tmp_path, {"model": "m", "methods": {"none": {}, "prompt": {"style": "system"}}},
                          extendable=["methods"])
    grown = check_fingerprint(tmp_path, {"model": "m", "methods": {"repe": {"c": 1}}}, extendable=["methods"])
    assert grown["methods"] == {"none": {}, "prompt": {"style": "user"}, "repe": {"c": 1}}
    assert json.loads((tmp_path / "run.json").read_text())["fingerprint"] == grown


def test_check_fingerprint_restart_discards_outputs_and_unknown_outputs_are_refused(tmp_path):
    (tmp_path / "results.jsonl").write_text('{"old": 1}\n')
    (tmp_path / "records").mkdir()
    with pytest.raises(wb.ResumeMismatchError, match="no run.json"):
        check_fingerprint(tmp_path, {"a": 1}, outputs=["results.jsonl", "records"])
    check_fingerprint(tmp_path, {"a": 1}, restart=True, outputs=["results.jsonl", "records"])
    assert not (tmp_path / "results.jsonl").exists() and not (tmp_path / "records").exists()
    (tmp_path / "results.jsonl").write_text('{"new": 1}\n')
    with pytest.raises(wb.ResumeMismatchError):
        check_fingerprint(tmp_path, {"a": 2}, outputs=["results.jsonl"])
    assert check_fingerprint(tmp_path, {"a": 2}, restart=True, outputs=["results.jsonl"]) == {"a": 2}
    assert not (tmp_path / "results.jsonl").exists()


def test_weights_fingerprint_samples_large_tensors_and_sees_a_changed_element():
    """Beyond 2**24 elements a float linspace of indices rounded past the end (an IndexError on SmolLM2's embedding)."""
    from workbench.store import WEIGHT_SAMPLES, weights_fingerprint

    big = torch.zeros(2**24 + 5, dtype=torch.uint8)
    before = weights_fingerprint([("embed", big)])
    big[-1] = 1  # the last element is always sampled
    assert weights_fingerprint([("embed", big)]) != before
    small = torch.arange(WEIGHT_SAMPLES * 3, dtype=torch.bfloat16)
    assert weights_fingerprint([("w", small)]) == weights_fingerprint([("w", small.clone())])
    assert weights_fingerprint([("w", small)]) != weights_fingerprint([("v", small)])  # names count
    assert weights_fingerprint([("w", small)]) != weights_fingerprint([("w", small.float())])  # dtypes count
