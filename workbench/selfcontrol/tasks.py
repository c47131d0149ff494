"""Behaviours as data: a self-judgement question, the answer we want, and
prompts to train and test on.

A task is model-agnostic text; :meth:`Task.compile` turns it into token ids
for one model: the chat template's continuation after an assistant answer
(new user turn with the question, open assistant turn, answer prefix) plus
the ids of the target and contrast answer tokens as that model writes them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError

if TYPE_CHECKING:
    from ..model.chat_model import HookedChatModel

TASKS_DIR = Path(__file__).resolve().parents[2] / "data" / "tasks"
_PLACEHOLDER = "\u2063WORKBENCH_RESPONSE\u2063"


@dataclass(frozen=True)
class ContrastPair:
    """One prompt with a response showing the behaviour and one showing its opposite."""

    prompt: str
    target_response: str
    opposite_response: str


@dataclass(frozen=True)
class CompiledSuffix:
    """One question as token ids for one model."""

    question: str
    ids: tuple[int, ...]
    target_id: int
    contrast_id: int
    weight: float = 1.0


@dataclass(frozen=True)
class Task:
    """A behaviour, e.g. ``Task(question="Is your answer polite?", target="Yes")``."""

    question: str
    target: str = "Yes"
    contrast: str | None = None
    answer_prefix: str = "Answer:"
    id: str = "custom"
    description: str = ""
    paraphrases: tuple[str, ...] = ()
    instruction: str = ""
    lexicon: dict[str, str] | None = None
    prompts: dict[str, tuple[str, ...]] = field(default_factory=dict)
    contrast_pairs: tuple[ContrastPair, ...] = ()

    def __post_init__(self) -> None:
        if not self.question or not self.question.strip():
            raise InputError("a task needs a non-empty self-judgement question")
        if not self.target or not self.target.strip():
            raise InputError("a task needs a non-empty target answer, e.g. target='Yes'")
        if self.answer_prefix != self.answer_prefix.rstrip():
            raise InputError(
                f"answer_prefix {self.answer_prefix!r} ends with whitespace: the suffix must end where the "
                "answer token begins (the answer token carries its own leading space); drop the trailing space"
            )
        if self.contrast is None:
            default = {"yes": "No", "no": "Yes"}.get(self.target.strip().lower())
            if default is None:
                raise InputError(f"give a contrast answer for target {self.target!r} (only Yes/No have a default)")
            object.__setattr__(self, "contrast", default)
        if self.contrast == self.target:
            raise InputError("target and contrast answers must differ")

    # ---- data ----------------------------------------------------------
    def split(self, name: str) -> list[str]:
        if name not in self.prompts:
            raise InputError(f"task {self.id!r} has no split {name!r}; it has {sorted(self.prompts) or 'none'}")
        return list(self.prompts[name])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Task:
        data = dict(data)
        data["paraphrases"] = tuple(data.get("paraphrases") or ())
        data["prompts"] = {k: tuple(v) for k, v in (data.get("prompts") or {}).items()}
        data["contrast_pairs"] = tuple(ContrastPair(**p) for p in data.get("contrast_pairs") or ())
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise InputError(f"unknown task fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> Task:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise InputError(f"cannot read task file {path}: {err}") from err
        data.setdefault("id", path.stem)
        return cls.from_dict(data)

    # ---- token ids -----------------------------------------------------
    def judge_dict(self) -> dict[str, Any]:
        """What decides the suffix score (no prompts): recorded with searches, caches and datasets."""
        return {"id": self.id, "question": self.question, "paraphrases": list(self.paraphrases), "target": self.target,
                "contrast": self.contrast, "answer_prefix": self.answer_prefix}

    def questions(self, paraphrases: bool = False) -> list[str]:
        return [self.question, *self.paraphrases] if paraphrases else [self.question]

    def compile(
        self,
        model: HookedChatModel,
        questions: Sequence[str] | None = None,
        weights: Sequence[float] | None = None,
    ) -> list[CompiledSuffix]:
        """Suffix ids, target and contrast ids for ``model``; several questions combine by weighted mean."""
        questions = list(questions or [self.question])
        weights = list(weights or [1.0] * len(questions))
        if len(weights) != len(questions):
            raise InputError(f"{len(weights)} weights for {len(questions)} questions")
        return [_compile_one(model, q, self.answer_prefix, self.target, self.contrast, w) for q, w in zip(questions, weights, strict=True)]


def _answer_id(model: HookedChatModel, context: str, answer: str, joiner: str) -> int:
    """The single token the model writes for ``answer`` right after ``context``."""
    base = model.encode(context)
    full = model.encode(context + joiner + answer)
    if full[: len(base)] != base:
        raise InputError(
            f"the suffix does not end where the answer token belongs: appending {answer!r} re-tokenises "
            f"the end of the suffix ({model.decode(base[-2:])!r}); end the answer prefix with a word or punctuation"
        )
    extra = full[len(base):]
    if len(extra) != 1:
        pieces = [model.tokenizer.convert_ids_to_tokens(t) for t in extra]
        raise InputError(
            f"answer {answer!r} is {len(extra)} tokens for {model.model_id} ({pieces}); the score reads one "
            "next-token logit, so pick a single-token answer such as 'Yes' or 'No'"
        )
    return extra[0]


def suffix_text(model: HookedChatModel, question: str, answer_prefix: str) -> str:
    """Template text that follows an assistant answer: end of turn, user question, open assistant turn."""
    conversation = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": _PLACEHOLDER},
        {"role": "user", "content": question},
    ]
    rendered = model.render(conversation, add_generation_prompt=True)
    if rendered.count(_PLACEHOLDER) != 1:
        raise InputError(f"the chat template of {model.model_id} does not echo assistant content verbatim")
    return rendered.split(_PLACEHOLDER, 1)[1] + answer_prefix


def _compile_one(model: HookedChatModel, question: str, prefix: str, target: str, contrast: str, weight: float) -> CompiledSuffix:
    text = suffix_text(model, question, prefix)
    joiner = " " if prefix else ""
    target_id = _answer_id(model, text, target, joiner)
    contrast_id = _answer_id(model, text, contrast, joiner)
    if target_id == contrast_id:
        raise InputError(f"target {target!r} and contrast {contrast!r} map to the same token")
    return CompiledSuffix(question=question, ids=tuple(model.encode(text)), target_id=target_id,
                          contrast_id=contrast_id, weight=float(weight))


@cache
def _registry() -> dict[str, Path]:
    return {p.stem: p for p in sorted(TASKS_DIR.glob("*.json"))}


def list_tasks() -> list[str]:
    """Ids of the tasks shipped in ``data/tasks``."""
    return list(_registry())


def get_task(name: str | Task) -> Task:
    """A shipped task by id, a JSON file path, or a :class:`Task` (returned as is)."""
    if isinstance(name, Task):
        return name
    if name in _registry():
        return Task.from_json(_registry()[name])
    if str(name).endswith(".json") and Path(name).is_file():
        return Task.from_json(name)
    raise InputError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}, or pass a JSON file")
