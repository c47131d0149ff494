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
