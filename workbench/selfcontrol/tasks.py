"""Behaviours as data: a self-judgement question, the answer we want, and
prompts to train and test on.

A task is model-agnostic text; :meth:`Task.compile` turns it into token ids
for one model: the chat template's continuation after an assistant answer
(new user turn with the question, open assistant turn, answer prefix) plus
the ids of the target and contrast answer tokens as that model writes them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, get_type_hints

from pydantic import ConfigDict, Field, Strict, StringConstraints, TypeAdapter, ValidationError

from ..errors import InputError, validation_problems

if TYPE_CHECKING:
    from ..model.chat_model import HookedChatModel

TASKS_DIR = Path(__file__).resolve().parents[2] / "data" / "tasks"
_PLACEHOLDER = "\u2063WORKBENCH_RESPONSE\u2063"

#: A piece of text a task or prompt file must hold: a real string (not a number, not bytes) with
#: something other than whitespace in it. The schema types below are what ``Task`` validates.
Text = Annotated[str, Strict(), StringConstraints(pattern=r"\S")]
#: A split's prompts: a list of texts, never a bare string (which would read as one prompt per character).
PromptList = Annotated[tuple[Text, ...], Field(min_length=1)]


@dataclass(frozen=True)
class ContrastPair:
    """One prompt with a response showing the behaviour and one showing its opposite."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    prompt: Text
    target_response: Text
    opposite_response: Text


@dataclass(frozen=True)
class Wording:
    """How the self-judge is asked: the question and the answer prefix the answer token follows."""

    question: str
    answer_prefix: str

    def label(self) -> str:
        return f"{self.question} / {self.answer_prefix or '(no prefix)'}"


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
    """A behaviour, e.g. ``Task(question="Is your answer polite?", target="Yes")``.

    The field types are the task schema: every field is validated (and lists
    become tuples) on construction, so a JSON file and a Python call are
    refused alike, with the field named, instead of being misread.
    """

    __pydantic_config__ = ConfigDict(extra="forbid")

    question: Text
    target: Text = "Yes"
    contrast: Text | None = None
    answer_prefix: Annotated[str, Strict()] = "Answer:"
    id: Text = "custom"
    description: Annotated[str, Strict()] = ""
    paraphrases: tuple[Text, ...] = ()
    instruction: Annotated[str, Strict()] = ""
    lexicon: dict[Text, Text] | None = None
    prompts: dict[Text, PromptList] = field(default_factory=dict)
    contrast_pairs: tuple[ContrastPair, ...] = ()

    def __post_init__(self) -> None:
        problems: list[str] = []
        for name, adapter in _field_adapters().items():
            try:
                object.__setattr__(self, name, adapter.validate_python(getattr(self, name)))
            except ValidationError as err:
                problems += validation_problems(err, at=(name,))
        if problems:
            raise InputError(f"task {self.id!r}: " + "; ".join(problems))
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
    def from_dict(cls, data: Mapping[str, Any], source: str = "task") -> Task:
        """A task from its JSON form (lists for tuples); every problem is reported at once, naming ``source``."""
        try:
            return _task_schema().validate_python(data)
        except ValidationError as err:
            raise InputError.from_validation(err, source, known=[f.name for f in fields(cls)]) from None

    @classmethod
    def from_json(cls, path: str | Path) -> Task:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise InputError(f"cannot read task file {path}: {err}") from err
        if isinstance(data, dict):
            data.setdefault("id", path.stem)
        return cls.from_dict(data, source=f"task file {path}")

    # ---- token ids -----------------------------------------------------
    def judge_dict(self) -> dict[str, Any]:
        """What decides the suffix score (no prompts): recorded with searches, caches and datasets."""
        return {"id": self.id, "question": self.question, "paraphrases": list(self.paraphrases), "target": self.target,
                "contrast": self.contrast, "answer_prefix": self.answer_prefix}

    def instructed(self, prompt: str, style: str = "user") -> tuple[str, str | None]:
        """(user turn, system message) that ask for the behaviour in words: instructed prompting.

        One place for it, because the evaluation's ``prompt`` method and the
        instructed-prompting preference pairs must ask the same way. ``user``
        prepends the instruction to the user turn (keeping the template's own
        system message); ``system`` makes it the system message.
        """
        if style not in ("user", "system"):
            raise InputError(f"prompt style must be 'user' or 'system', not {style!r}")
        if not self.instruction.strip():
            raise InputError(f"task {self.id!r} has no 'instruction' to ask for the behaviour in words; add one to its JSON")
        return (prompt, self.instruction) if style == "system" else (f"{self.instruction}\n\n{prompt}", None)

    def questions(self, paraphrases: bool = False) -> list[str]:
        return [self.question, *self.paraphrases] if paraphrases else [self.question]

    def wordings(self) -> list[Wording]:
        """The judge wordings ``judge-check --select`` chooses among, the task's own first.

        Each question (the task's and its paraphrases) with each answer format: the
        task's own prefix, ``"Answer:"`` and ``"Answer <target> or <contrast>:"``.
        """
        prefixes = dict.fromkeys([self.answer_prefix, "Answer:", f"Answer {self.target} or {self.contrast}:"])
        return [Wording(q, p) for q in self.questions(paraphrases=True) for p in prefixes]

    def with_wording(self, wording: Wording) -> Task:
        """This task judged with ``wording``; the other questions stay its paraphrases."""
        others = tuple(q for q in self.questions(paraphrases=True) if q != wording.question)
        return replace(self, question=wording.question, answer_prefix=wording.answer_prefix, paraphrases=others)

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
def _field_adapters() -> dict[str, TypeAdapter[Any]]:
    """One validator per ``Task`` field, built from its annotation (the schema has one source: the class)."""
    hints = get_type_hints(Task, include_extras=True)
    return {f.name: TypeAdapter(hints[f.name]) for f in fields(Task)}


@cache
def _task_schema() -> TypeAdapter[Task]:
    """The whole task (missing and unknown fields too), for files: every problem in one message."""
    return TypeAdapter(Task)


def _registry() -> dict[str, Path]:
    """Shipped task files, read from disk on every call: a file added while a notebook runs is seen at once."""
    return {p.stem: p for p in sorted(TASKS_DIR.glob("*.json"))}


def list_tasks() -> list[str]:
    """Ids of the tasks shipped in ``data/tasks``."""
    return list(_registry())


def get_task(name: str | Task) -> Task:
    """A shipped task by id, a JSON file path, or a :class:`Task` (returned as is)."""
    if isinstance(name, Task):
        return name
    registry = _registry()
    if name in registry:
        return Task.from_json(registry[name])
    if str(name).endswith(".json") and Path(name).is_file():
        return Task.from_json(name)
    raise InputError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}, or pass a JSON file")


# ---- the judge wording chosen per model (written by ``judge-check --select``) ----------------------------
WORDING_FORMAT = 1
AUTO = "auto"


def check_question(question: str | None) -> None:
    """``None`` (the task's own wording), ``"auto"`` (the saved choice) or a question text."""
    if question is not None and (not isinstance(question, str) or not question.strip()):
        raise InputError(f"question must be None, 'auto' or a question text, got {question!r}")


def wording_path(model_id: str, task_id: str, root: str | Path | None = None) -> Path:
    """Where the chosen wording of ``task_id`` on ``model_id`` is saved: ``$WORKBENCH_HOME/judge_wording/<model>/<task>.json``."""
    if root is None:
        from ..model.loading import workbench_home

        root = workbench_home() / "judge_wording"
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("_") or "model"
    return Path(root) / safe / f"{task_id}.json"


def saved_wording(model_id: str, task: Task, root: str | Path | None = None) -> Wording:
    """The wording ``judge-check --select`` saved for ``task`` on ``model_id``; a clear error if there is none."""
    path = wording_path(model_id, task.id, root)
    rerun = f"run `python -m workbench judge-check --select --task {task.id}` on this model first"
    if not path.is_file():
        raise InputError(f"no judge wording chosen for task {task.id!r} on {model_id} ({path} is missing): {rerun}")
    try:
        data = json.loads(path.read_text())
        wording = Wording(str(data["question"]), str(data["answer_prefix"]))
        saved_task, saved_model = data["task"], data["model_id"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"the saved judge wording {path} is unreadable ({err}): {rerun}") from None
    if saved_model != model_id:
        raise InputError(f"{path} holds a wording chosen on {saved_model}, not {model_id}: {rerun}")
    if saved_task != task.judge_dict():
        raise InputError(f"the task {task.id!r} changed since its wording was chosen ({path}): {rerun}")
    if wording not in task.wordings():
        raise InputError(f"the saved wording {wording.label()!r} is not among task {task.id!r}'s wordings: {rerun}")
    return wording


def with_question(task: Task, model_id: str, question: str | None, root: str | Path | None = None) -> Task:
    """``task`` as the search should judge it: its own wording, the saved choice (``"auto"``) or ``question``."""
    check_question(question)
    if question is None or question == task.question:
        return task
    if question == AUTO:
        return task.with_wording(saved_wording(model_id, task, root))
    return task.with_wording(Wording(question, task.answer_prefix))
