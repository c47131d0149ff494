"""Preference pairs on disk: TRL's conversational preference format, as JSON lines.

Why this format: it is what TRL's trainers read and what ``datasets.load_dataset("json", ...)``
loads, so pairs made here train in any stack. One row per prompt::

    {"prompt": [{"role": "user", "content": "..."}],
     "chosen": [{"role": "assistant", "content": "..."}],
     "rejected": [{"role": "assistant", "content": "..."}],
     ...any further fields (scores, NLLs), ignored by training}

A data folder holds ``pairs.jsonl`` (and, from the data generator, a manifest of its settings).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import InputError
from ..store import atomic_write

PAIRS_FILE = "pairs.jsonl"
COLUMNS = ("prompt", "chosen", "rejected")


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class AssistantMessage(Message):
    role: Literal["assistant"]


class PreferencePair(BaseModel):
    """One row: the conversation so far, and the preferred and the dispreferred answer to it."""

    model_config = ConfigDict(extra="allow")
    prompt: list[Message] = Field(min_length=1)
    chosen: list[AssistantMessage] = Field(min_length=1, max_length=1)
    rejected: list[AssistantMessage] = Field(min_length=1, max_length=1)


def pair(prompt: str | list[Mapping[str, str]], chosen: str, rejected: str, **fields: Any) -> dict[str, Any]:
    """A row in the format, from a user message (or a message list) and two answers."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    row = {"prompt": messages, "chosen": [{"role": "assistant", "content": chosen}],
           "rejected": [{"role": "assistant", "content": rejected}], **fields}
    return PreferencePair.model_validate(row).model_dump()


def pairs_path(data: str | Path) -> Path:
    """``data`` itself if it is a file, else ``data/pairs.jsonl``."""
    path = Path(data).expanduser()
    if path.is_dir():
        path = path / PAIRS_FILE
    if not path.is_file():
        raise InputError(f"no preference data at {path}: pass a folder holding {PAIRS_FILE} or a .jsonl file")
    return path


def read_pairs(data: str | Path) -> list[dict[str, Any]]:
    """Every row of a pairs file, validated; a bad row names its line and field."""
    path = pairs_path(data)
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(PreferencePair.model_validate(json.loads(line)).model_dump())
        except json.JSONDecodeError as err:
            raise InputError(f"{path}, line {number}: not JSON ({err.msg})") from err
        except ValidationError as err:
            problem = err.errors()[0]
            where = ".".join(str(p) for p in problem["loc"]) or "row"
            raise InputError(f"{path}, line {number}, field {where}: {problem['msg']} (rows need prompt: a list of "
                             "chat messages, chosen and rejected: one assistant message each)") from err
    if not rows:
        raise InputError(f"{path} holds no preference pairs")
    return rows


def write_pairs(rows: Iterable[Mapping[str, Any]], folder: str | Path) -> Path:
    """Write validated rows to ``folder/pairs.jsonl`` (replacing it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(PreferencePair.model_validate(dict(r)).model_dump()) for r in rows]
    return atomic_write(folder / PAIRS_FILE, "".join(line + "\n" for line in lines))
