"""One exception family, so notebooks can catch workbench mistakes without
catching library internals, and every message says what to do next."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError


class WorkbenchError(Exception):
    """Base class of every error the workbench raises on bad input or state."""


class ModelLoadError(WorkbenchError):
    """A model could not be found or built."""


class InputError(WorkbenchError, ValueError):
    """A prompt, task or argument is unusable as given."""

    @classmethod
    def from_validation(cls, err: ValidationError, source: str, known: Iterable[str] = (),
                        at: tuple[str | int, ...] = ()) -> InputError:
        """One message for every problem pydantic found, each naming ``source`` (e.g. the file) and the field.

        ``known``: the valid field names, listed when a field is unknown; ``at``:
        the location of what was validated inside ``source`` (e.g. its field name).
        """
        return cls(f"{source}: " + "; ".join(validation_problems(err, known, at)))


class IncompatibleArtifactError(WorkbenchError):
    """A saved control or controller belongs to another model or format."""


class CorruptArtifactError(IncompatibleArtifactError):
    """A saved folder is damaged (truncated tensors, a missing or unreadable config): it must be saved again.

    A subclass of :class:`IncompatibleArtifactError`, so code that refuses
    unusable artifacts keeps working, while a cache can catch exactly this one
    and recompute the entry.
    """


class ResumeMismatchError(InputError):
    """A resumable output folder holds a run made with other settings: resuming would mix two runs' results."""


class RunLockedError(WorkbenchError):
    """Another live process is writing the same output folder."""


class NumericalError(WorkbenchError):
    """A gradient or score became NaN or infinite."""


class DistributedError(WorkbenchError):
    """A Ray run cannot go on: Ray is not installed, the cluster is unreachable, or workers keep dying."""


# ---- readable pydantic problems ----------------------------------------------------------
_EXPECTED = {
    "string_type": "should be a string",
    "int_type": "should be an integer",
    "int_parsing": "should be an integer",
    "float_type": "should be a number",
    "float_parsing": "should be a number",
    "bool_type": "should be true or false",
    "list_type": "should be a list",
    "tuple_type": "should be a list",
    "dict_type": "should be an object ({...})",
    "dataclass_type": "should be an object ({...})",
    "model_type": "should be an object ({...})",
    "string_pattern_mismatch": "should be a non-empty, non-blank string",
    "string_too_short": "should be non-empty",
    "too_short": "should be non-empty",
}


def validation_problems(err: ValidationError, known: Iterable[str] = (), at: tuple[str | int, ...] = ()) -> list[str]:
    """Each problem pydantic found, in words: which field, what it should be, what it was."""
    return [_describe({**p, "loc": (*at, *p.get("loc", ()))}, known) for p in err.errors()]


def _field(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            out += " (a key)"
        else:
            out += f".{part}" if out else str(part)
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(problem: dict[str, Any], known: Iterable[str]) -> str:
    where = _field(tuple(problem.get("loc", ())))
    kind = problem.get("type", "")
    subject = f"field {where!r}" if where else "the content"
    if kind == "missing":
        return f"{subject} is required"
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        names = sorted(known)
        return f"{subject} is not a known field" + (f" (known: {', '.join(names)})" if names else "")
    if kind == "value_error" and isinstance((problem.get("ctx") or {}).get("error"), WorkbenchError):
        return f"{subject}: {problem['ctx']['error']}" if where else str(problem["ctx"]["error"])
    expected = _EXPECTED.get(kind, problem.get("msg", "is invalid"))
    got = problem.get("input")
    return f"{subject} {expected}, got {type(got).__name__} {_short(got)}"
