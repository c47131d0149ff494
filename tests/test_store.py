import json

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
