"""On-disk format shared by controls, controllers and reading vectors:
``<folder>/tensors.safetensors`` plus ``<folder>/config.json`` (kind, format
version, model id, sizes). Loading checks all three before touching tensors,
so an object never lands silently on the wrong model."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

from safetensors.torch import load_file, save_file
from torch import Tensor

from .errors import IncompatibleArtifactError


class ModelIdentity(Protocol):
    """What an artifact is checked against: the model's id and width (shared ground imports no stage)."""

    @property
    def model_id(self) -> str: ...

    @property
    def d_model(self) -> int: ...

FORMAT_VERSION = 1
TENSORS = "tensors.safetensors"
CONFIG = "config.json"


def save_artifact(folder: str | Path, kind: str, tensors: dict[str, Tensor], config: dict[str, Any]) -> Path:
    """Write tensors and config; each file is written to a temp name and renamed (no half-written files)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"kind": kind, "format_version": FORMAT_VERSION, **config}
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as tmp:
        pass
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp.name,
              metadata={"kind": kind, "model_id": str(config.get("model_id"))})
    os.replace(tmp.name, folder / TENSORS)
    tmp_config = folder / (CONFIG + ".tmp")
    tmp_config.write_text(json.dumps(config, indent=2))
    os.replace(tmp_config, folder / CONFIG)
    return folder


def read_config(folder: str | Path, kind: str) -> dict[str, Any]:
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG).read_text())
    except FileNotFoundError as err:
        raise IncompatibleArtifactError(f"{folder} holds no saved {kind} ({CONFIG} missing)") from err
    except ValueError as err:
        raise IncompatibleArtifactError(f"{folder / CONFIG} is not valid JSON: {err}") from err
    if config.get("kind") != kind:
        raise IncompatibleArtifactError(f"{folder} holds a {config.get('kind')!r}, not a {kind!r}")
    if config.get("format_version") != FORMAT_VERSION:
        raise IncompatibleArtifactError(
            f"{folder} has format version {config.get('format_version')}; this workbench reads version {FORMAT_VERSION}"
        )
    return config


def check_model(config: dict[str, Any], model: ModelIdentity, what: str) -> None:
    if config.get("model_id") != model.model_id:
        raise IncompatibleArtifactError(
            f"this {what} was made for model {config.get('model_id')!r} and cannot be applied to {model.model_id!r}; "
            f"load {config.get('model_id')!r} or recompute the {what} on this model"
        )
    if "d_model" in config and config["d_model"] != model.d_model:
        raise IncompatibleArtifactError(f"this {what} has d_model {config['d_model']}, the model {model.d_model}")


def load_artifact(folder: str | Path, kind: str, model: ModelIdentity | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    config = read_config(folder, kind)
    if model is not None:
        check_model(config, model, kind)
    try:
        tensors = load_file(Path(folder) / TENSORS)
    except (OSError, ValueError) as err:
        raise IncompatibleArtifactError(f"cannot read {Path(folder) / TENSORS}: {err}") from err
    return tensors, config
