"""On-disk format shared by controls, controllers and reading vectors:
``<folder>/tensors.safetensors`` plus ``<folder>/config.json`` (kind, format
version, model id, sizes). Loading checks all three before touching tensors,
so an object never lands silently on the wrong model, and a damaged folder
(truncated tensors, missing config) raises one :class:`CorruptArtifactError`
whichever object it held."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .errors import CorruptArtifactError, IncompatibleArtifactError


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


def _damaged(folder: Path, kind: str, what: str, remedy: str | None) -> CorruptArtifactError:
    return CorruptArtifactError(
        f"{folder} holds a damaged {kind}: {what}. "
        + (remedy or f"Delete the folder and save or recompute the {kind} again")
    )


def read_config(folder: str | Path, kind: str, remedy: str | None = None) -> dict[str, Any]:
    """The folder's config, checked for kind and format version.

    A folder that is not there, or holds neither file, is *not a saved
    ``kind``* (:class:`IncompatibleArtifactError`); one with a missing or
    unreadable config is *damaged* (:class:`CorruptArtifactError`, whose
    message says what to do; ``remedy`` replaces the default advice).
    """
    folder = Path(folder)
    if not (folder / CONFIG).is_file() and not (folder / TENSORS).is_file():
        where = "the folder does not exist" if not folder.exists() else f"no {CONFIG} or {TENSORS} in it"
        raise IncompatibleArtifactError(f"{folder} holds no saved {kind} ({where}); check the path")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except FileNotFoundError:
        raise _damaged(folder, kind, f"{CONFIG} is missing next to {TENSORS}", remedy) from None
    except (OSError, ValueError) as err:
        raise _damaged(folder, kind, f"{CONFIG} is unreadable ({err})", remedy) from None
    if not isinstance(config, dict):
        raise _damaged(folder, kind, f"{CONFIG} holds a {type(config).__name__}, not an object", remedy)
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


def load_artifact(
    folder: str | Path,
    kind: str,
    model: ModelIdentity | None = None,
    *,
    required: Sequence[str] = (),
    tensor_names: Callable[[dict[str, Any]], Iterable[str]] | None = None,
    remedy: str | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and config of a saved ``kind``, checked against ``model``; every loader reads through here.

    ``required``: config fields the loader reads; ``tensor_names``: the tensors
    the config promises (a function of the config). Anything missing, a
    truncated or unreadable tensors file, raises :class:`CorruptArtifactError`
    (a damaged folder, to save again), never a library error.
    """
    folder = Path(folder)
    config = read_config(folder, kind, remedy)
    missing = [key for key in ("model_id", *required) if key not in config]
    if missing:
        raise _damaged(folder, kind, f"{CONFIG} lacks {missing}", remedy)
    if model is not None:
        check_model(config, model, kind)
    if not (folder / TENSORS).is_file():
        raise _damaged(folder, kind, f"{TENSORS} is missing", remedy)
    try:
        tensors = load_file(folder / TENSORS)
    except (OSError, ValueError, SafetensorError) as err:
        raise _damaged(folder, kind, f"{TENSORS} is truncated or unreadable ({err})", remedy) from None
    if tensor_names is not None:
        try:
            expected = list(tensor_names(config))
        except (KeyError, TypeError, ValueError) as err:
            raise _damaged(folder, kind, f"{CONFIG} does not list its tensors properly ({err!r})", remedy) from None
        absent = [name for name in expected if name not in tensors]
        if absent:
            raise _damaged(folder, kind, f"{TENSORS} lacks {absent[:3]}{' ...' if len(absent) > 3 else ''}", remedy)
    return tensors, config
