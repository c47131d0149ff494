"""Control methods behind one interface, for comparing them on equal terms.

Each method turns (model, task, prompt text) into response token ids with the
same decoding settings (:class:`Decoding`: greedy by default, one seed):

- ``none``: the plain chat prompt.
- ``prompt``: the behaviour asked for in words. The task's ``instruction`` is
  *prepended to the user turn* (``"{instruction}\\n\\n{prompt}"``), keeping the
  chat template's own default system message, so the only difference from
  ``none`` is the instruction (``style="system"`` puts it in the system
  message instead, which replaces SmolLM2's default one).
- ``repe``: a RepE reading vector (:class:`workbench.analysis.repe.ReadingVector`,
  fitted on the task's contrast pairs) added at every prompt position over a
  window of layers (default: the middle third). Its coefficient (units: the
  mean residual norm at each layer) is chosen per task on ``train`` prompts
  that are not evaluated: the highest mean suffix score among coefficients
  whose responses stay as fluent as the uncontrolled ones (same guard as the
  search: mean NLL within ``fluency_margin`` nats, no degenerate output).
  Coefficient 0 is a candidate, so "no steering" wins where nothing helps.
- ``selfcontrol``: :func:`workbench.selfcontrol.search.self_control` per prompt.
- ``prefix``: a trained :class:`workbench.prefix.controller.PrefixController`.
- ``model:DIR``: another model folder (e.g. a DPO-trained one) answers the plain
  chat prompt; the runner judges its answer with the base model like any other.

Every method applies its control in a context manager and leaves the model as
it found it; :func:`hook_state` lets the runner check that after each call.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import InputError, WorkbenchError
from ..selfcontrol.control import Control
from ..selfcontrol.fluency import is_degenerate
from ..selfcontrol.search import SEARCH_VERSION, SelfControlConfig, config_dict, resolve_config
from ..selfcontrol.suffix import score_responses
from ..selfcontrol.tasks import Task

if TYPE_CHECKING:
    from ..model.chat_model import HookedChatModel

METHODS = ("none", "prompt", "repe", "selfcontrol", "prefix")


class ControlLeakError(WorkbenchError):
    """A method left hooks or a prefix on the model after it returned."""


@dataclass(frozen=True)
class Decoding:
    """Decoding settings every method shares."""

    max_new_tokens: int = 40
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``model.generate`` (and of the search's config)."""
        return asdict(self)


@dataclass
class MethodResponse:
    """What a method produced for one prompt; ``prompt_ids`` is what the model was fed."""

    prompt_ids: list[int]
    response_ids: list[int]
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


def hook_state(model: HookedChatModel) -> tuple[int, tuple[int, ...]]:
    """(hooks on the bridge's hook points, prefix ids): equal before and after a method, or it leaked.

    Controls, reading vectors and prefix controllers all act through hook
    points (and ``model.prefix_ids``). Raw torch module hooks are not counted:
    the bridge registers some of its own lazily on the first forward.
    """
    return model.active_hooks(), tuple(model.prefix_ids)


def _generate(model: HookedChatModel, ids: list[int], decoding: Decoding) -> list[int]:
    return list(model.generate([ids], **decoding.kwargs()).tokens[0])


class Method:
    """One way of steering. ``prepare`` runs once per task; ``respond`` once per prompt."""

    name: ClassVar[str] = ""

    #: Prompts handed to :meth:`respond_many` at once by the runner (a record is committed per call);
    #: ``None``: the model's :func:`~workbench.selfcontrol.search.default_batch_prompts`.
    prompts_per_call: int | None = 1

    def settings(self) -> dict[str, Any]:
        """JSON-able settings, recorded in the run's config."""
        return {}

    def fingerprint(self, model: HookedChatModel, tasks: Sequence[Task]) -> dict[str, Any]:
        """Everything of this method that changes its responses on ``tasks``: settings, plus content it reads.

        The resumable-run fingerprint (:func:`workbench.store.check_fingerprint`) compares it, so it names
        content (e.g. a controller's hash), never a path that could hold something else tomorrow.
        """
        return self.settings()

    def prepare(self, model: HookedChatModel, task: Task, decoding: Decoding, *,
                held_out: Sequence[str] = (), state: dict[str, Any] | None = None) -> dict[str, Any]:
        """Per-task setup; returns JSON-able state (``state`` from an earlier run is reused as is).

        ``held_out``: the prompts that will be evaluated; nothing may be tuned on them.
        """
        return {}

    def respond(self, model: HookedChatModel, task: Task, prompt: str, decoding: Decoding) -> MethodResponse:
        raise NotImplementedError

    def respond_many(self, model: HookedChatModel, task: Task, prompts: Sequence[str],
                     decoding: Decoding) -> list[MethodResponse]:
        """One response per prompt (a method that can batch overrides this)."""
        return [self.respond(model, task, prompt, decoding) for prompt in prompts]


class NoControl(Method):
    name = "none"

    def respond(self, model, task, prompt, decoding):
        start = time.perf_counter()
        ids = model.chat_ids(prompt)
        return MethodResponse(ids, _generate(model, ids, decoding), time.perf_counter() - start)


class PromptInstruction(Method):
    """The task's instruction in words, prepended to the user turn (or as the system message)."""

    name = "prompt"

    def __init__(self, style: str = "user") -> None:
        if style not in ("user", "system"):
            raise InputError(f"prompt style must be 'user' or 'system', not {style!r}")
        self.style = style

    def settings(self) -> dict[str, Any]:
        return {"style": self.style}

    def fingerprint(self, model, tasks):
        return {**self.settings(), "instructions": {t.id: t.instruction for t in tasks}}

    def prompt_ids(self, model: HookedChatModel, task: Task, prompt: str) -> list[int]:
        user, system = task.instructed(prompt, self.style)
        return model.chat_ids(user, system=system)

    def respond(self, model, task, prompt, decoding):
        start = time.perf_counter()
        ids = self.prompt_ids(model, task, prompt)
        return MethodResponse(ids, _generate(model, ids, decoding), time.perf_counter() - start,
                              {"instruction": task.instruction, "style": self.style})


def choose_coefficient(table: list[dict[str, Any]], fluency_margin: float = 0.5) -> dict[str, Any]:
    """The admissible row with the highest mean score; marks each row's ``admissible``.

    Rows: ``{"coefficient", "score", "nll", "degenerate"}`` (means / counts over
    the selection prompts). The guard is relative to no steering (coefficient
    0, or the smallest): mean NLL within ``fluency_margin`` and no more
    degenerate outputs, so "no steering" always passes, even where the plain
    model itself loops. Ties go to the smaller coefficient.
    """
    base = min(table, key=lambda row: abs(row["coefficient"]))
    for row in table:
        row["admissible"] = row["degenerate"] <= base["degenerate"] and row["nll"] <= base["nll"] + fluency_margin
    ok = sorted((row for row in table if row["admissible"]), key=lambda row: abs(row["coefficient"]))
    return max(ok, key=lambda row: row["score"])


class RepeAddition(Method):
    """Reading-vector addition over a layer window; coefficient chosen on unevaluated train prompts."""

    name = "repe"

    def __init__(self, layers: Sequence[int] | None = None, coefficients: Sequence[float] = (0.0, 0.025, 0.05, 0.1, 0.2),
                 n_select: int = 6, method: str = "pca", point: str = "hook_resid_post",
                 fluency_margin: float = 0.5, n_pairs: int | None = None) -> None:
        coefficients = sorted({float(c) for c in coefficients}, key=abs)
        if not coefficients:
            raise InputError("repe needs at least one coefficient to choose from")
        if n_select < 1:
            raise InputError("repe needs at least one train prompt to choose the coefficient on")
        self.layers = None if layers is None else [int(x) for x in layers]
        self.coefficients = coefficients
        self.n_select = n_select
        self.method = method
        self.point = point
        self.fluency_margin = fluency_margin
        if n_pairs is not None and n_pairs < 2:
            raise InputError("repe needs at least 2 contrast pairs to fit a reading vector")
        self.n_pairs = n_pairs  # None: all of the task's contrast pairs
        self._vectors: dict[str, Any] = {}
        self._fitted: dict[tuple, Any] = {}
        self._chosen: dict[str, float] = {}

    def settings(self) -> dict[str, Any]:
        return {"layers": self.layers, "coefficients": self.coefficients, "n_select": self.n_select,
                "method": self.method, "point": self.point, "fluency_margin": self.fluency_margin,
                "n_pairs": self.n_pairs}

    def fingerprint(self, model, tasks):
        """Settings, the layer window, and the data the vector is fitted and its coefficient chosen on."""
        from ..store import fingerprint_hash

        def data(task: Task) -> str:
            try:
                train = task.split("train")
            except InputError:
                train = []
            return fingerprint_hash({"pairs": [asdict(p) for p in task.contrast_pairs], "train": train})

        return {**self.settings(), "window": self.window(model), "data": {t.id: data(t) for t in tasks}}

    def window(self, model: HookedChatModel) -> list[int]:
        """The layers the vector is added at (default: the middle third)."""
        if self.layers is not None:
            return self.layers
        n = model.n_layers
        return list(range(n // 3, 2 * n // 3 + 1)) if n >= 3 else list(range(n))

    def prepare(self, model, task, decoding, *, held_out=(), state=None):
        from ..analysis.repe import ReadingVector

        start = time.perf_counter()
        held = set(held_out)
        layers = self.window(model)
        pairs = [p for p in task.contrast_pairs if p.prompt not in held][: self.n_pairs]
        if len(pairs) < 2:
            raise InputError(f"task {task.id!r}: fewer than 2 contrast pairs outside the evaluated prompts to fit a reading vector")
        key = (model.model_id, task.id, tuple(layers), tuple(p.prompt for p in pairs))
        if key not in self._fitted:  # refit only when model, task, window or pairs change
            self._fitted[key] = ReadingVector.fit(model, task, pairs=pairs, layers=layers, point=self.point,
                                                  method=self.method)
        vector = self._vectors[task.id] = self._fitted[key]
        if state and "coefficient" in state:
            tuned_on = held & set(state.get("selection_prompts") or ())
            if tuned_on:
                raise InputError(
                    f"repe: the saved coefficient for task {task.id!r} was chosen on prompts that are now evaluated "
                    f"({sorted(tuned_on)[:3]}{' ...' if len(tuned_on) > 3 else ''}); a method may not be tuned on "
                    "its test prompts. Evaluate other prompts, or rerun with --restart to choose it again")
            self._chosen[task.id] = float(state["coefficient"])
            return state
        try:
            pool = [p for p in task.split("train") if p not in held][: self.n_select]
        except InputError:
            pool = []
        if not pool:
            raise InputError(f"task {task.id!r} has no train prompts outside the evaluated ones to choose the repe coefficient on")
        suffixes = task.compile(model)
        per_coef: dict[float, dict[str, list]] = {c: {"score": [], "nll": [], "degenerate": []} for c in self.coefficients}
        # One batch for every (prompt, coefficient): each row's control covers its own prompt (per-row controls).
        prompt_ids = [model.chat_ids(p) for p in pool]
        controls = [vector.as_control(model, len(ids), c, layers).bind(ids) for ids in prompt_ids for c in self.coefficients]
        rows = [ids for ids in prompt_ids for _ in self.coefficients]
        with Control.stack(controls).applied(model):
            gen = model.generate(rows, **decoding.kwargs())
        scored = score_responses(model, rows, gen.tokens, suffixes)
        for i in range(len(rows)):
            c = self.coefficients[i % len(self.coefficients)]
            per_coef[c]["score"].append(float(scored.scores[i]))
            per_coef[c]["nll"].append(float(scored.nll[i]))
            per_coef[c]["degenerate"].append(is_degenerate(gen.tokens[i]) is not None)
        table = []
        for c in self.coefficients:
            r = per_coef[c]
            table.append({"coefficient": c, "score": sum(r["score"]) / len(pool), "nll": sum(r["nll"]) / len(pool),
                          "degenerate": int(sum(r["degenerate"]))})
        best = choose_coefficient(table, self.fluency_margin)
        self._chosen[task.id] = best["coefficient"]
        return {"coefficient": best["coefficient"], "layers": layers, "selection_prompts": pool, "grid": table,
                "fit_accuracy": {str(k): v for k, v in vector.fit_accuracy.items()},
                "seconds": round(time.perf_counter() - start, 3)}

    def respond(self, model, task, prompt, decoding):
        if task.id not in self._vectors:
            raise InputError(f"repe: call prepare() for task {task.id!r} first")
        start = time.perf_counter()
        ids = model.chat_ids(prompt)
        coefficient = self._chosen[task.id]
        control = self._vectors[task.id].as_control(model, len(ids), coefficient, self.window(model))
        with control.applied(model):
            tokens = _generate(model, ids, decoding)
        return MethodResponse(ids, tokens, time.perf_counter() - start, {"coefficient": coefficient})


class SelfControlMethod(Method):
    """SelfControl's search on each prompt (decoding settings forced to the shared ones)."""

    name = "selfcontrol"

    def __init__(self, config: SelfControlConfig | dict[str, Any] | None = None,
                 batch_prompts: int | None = None) -> None:
        if batch_prompts is not None and (isinstance(batch_prompts, bool) or not isinstance(batch_prompts, int)
                                          or batch_prompts < 1):
            raise InputError(f"selfcontrol: batch_prompts must be an integer >= 1, got {batch_prompts!r}")
        #: prompts searched together (None: default_batch_prompts of the model); results do not depend on it
        self.prompts_per_call = batch_prompts
        if isinstance(config, dict):
            try:
                config = resolve_config(None, **config)
            except InputError as err:
                raise InputError(f"selfcontrol: {err}") from None
        self.config = resolve_config(config)

    def settings(self) -> dict[str, Any]:
        """The search's settings less the decoding ones, which :class:`Decoding` records for every method."""
        return {k: v for k, v in config_dict(self.config).items() if k not in Decoding.__dataclass_fields__}

    def fingerprint(self, model, tasks):
        """Settings, the search's version, and the judge wording each task is searched with (``question="auto"``
        names the saved choice, which ``judge-check --select`` may change: the wording itself is what counts)."""
        from ..selfcontrol.tasks import with_question

        judged = {t.id: with_question(t, model.model_id, self.config.question).judge_dict() for t in tasks}
        return {**self.settings(), "search_version": SEARCH_VERSION, "judged_as": judged}

    def respond(self, model, task, prompt, decoding):
        return self.respond_many(model, task, [prompt], decoding)[0]

    def respond_many(self, model, task, prompts, decoding):
        """The searches of ``prompts`` through :func:`workbench.prefix.synthesis.search_prompts` (the one search loop)."""
        from ..prefix.synthesis import search_prompts

        cfg = resolve_config(self.config, **decoding.kwargs(), progress=False)
        start = time.perf_counter()
        results = search_prompts(model, prompts, task, cfg, batch_size=len(prompts))
        seconds = (time.perf_counter() - start) / max(1, len(prompts))
        return [MethodResponse(r.prompt_ids, list(r.response_ids), seconds, {
            "initial_score": r.initial_score, "search_score": r.score, "gain": r.gain,
            "iterations_accepted": r.iterations_accepted, "iterations_run": len(r.iterations),
        }) for r in results]


class PrefixMethod(Method):
    """A trained prefix controller: ``folder`` is one controller, or holds one sub-folder per task id."""

    name = "prefix"

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._controllers: dict[str, Any] = {}

    def settings(self) -> dict[str, Any]:
        return {"folder": str(self.folder)}

    def fingerprint(self, model, tasks):
        """Each task's controller by content (hash of its tensors and config), not by folder path."""
        from ..prefix.controller import KIND
        from ..store import content_hash

        return {"controllers": {t.id: content_hash(self.controller_folder(t), KIND) for t in tasks}}

    def controller_folder(self, task: Task) -> Path:
        per_task = self.folder / task.id
        folder = per_task if (per_task / "config.json").is_file() else self.folder
        if not (folder / "config.json").is_file():
            raise InputError(f"no prefix controller for task {task.id!r} in {self.folder} (nor in {per_task})")
        return folder

    def prepare(self, model, task, decoding, *, held_out=(), state=None):
        from ..prefix.controller import PrefixController

        folder = self.controller_folder(task)
        controller = PrefixController.load(folder, model)
        trained_on = (controller.meta.get("training") or {}).get("task")
        if trained_on and trained_on != task.id:
            raise InputError(f"the prefix controller in {folder} was trained for task {trained_on!r}, not {task.id!r}; "
                             f"pass a folder with one sub-folder per task id")
        self._controllers[task.id] = controller
        return {"folder": str(folder), "trained_on": trained_on, "n_tokens": controller.n_tokens}

    def respond(self, model, task, prompt, decoding):
        if task.id not in self._controllers:
            raise InputError(f"prefix: call prepare() for task {task.id!r} first")
        start = time.perf_counter()
        ids = model.chat_ids(prompt)
        with self._controllers[task.id].applied(model):
            tokens = _generate(model, ids, decoding)
        return MethodResponse(ids, tokens, time.perf_counter() - start)


class OtherModel(Method):
    """Answers from another model folder (``DIR``, or ``DIR/<task id>`` when that holds a model), judged by the base.

    Why a method: a model trained on the base (by DPO, say) is compared with steering
    the base on equal terms: the same prompts, decoding and judges. Its tokenizer and
    chat template must give the base's prompt ids, so its answer ids mean the same text.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.name = f"model:{folder}"
        self._loaded: dict[Path, Any] = {}
        self._by_task: dict[str, Path] = {}

    def settings(self) -> dict[str, Any]:
        return {"folder": str(self.folder)}

    def fingerprint(self, model, tasks):
        """Each task's model by content (weights sample, chat template: :func:`~workbench.store.model_fingerprint`)."""
        from ..store import model_fingerprint

        return {"models": {t.id: model_fingerprint(self._load(self.model_folder(t), model)) for t in tasks}}

    def _load(self, folder: Path, model: HookedChatModel) -> HookedChatModel:
        from ..model.loading import load_model

        if folder not in self._loaded:
            self._loaded.clear()  # one other model in memory at a time
            self._loaded[folder] = load_model(str(folder), device=str(model.device), dtype=model.dtype, progress=False)
        return self._loaded[folder]

    def model_folder(self, task: Task) -> Path:
        per_task = self.folder / task.id
        folder = per_task if (per_task / "config.json").is_file() else self.folder
        if not (folder / "config.json").is_file():
            raise InputError(f"no model for task {task.id!r} in {self.folder} (nor in {per_task}): "
                             "pass a model folder, or one with a sub-folder per task id")
        return folder

    def prepare(self, model, task, decoding, *, held_out=(), state=None):
        folder = self.model_folder(task)
        other = self._load(folder, model)
        probe = held_out[0] if held_out else "Hello"
        if other.chat_ids(probe) != model.chat_ids(probe):
            raise InputError(f"{folder} turns a prompt into other token ids than {model.model_id}: "
                             "its answers cannot be judged by the base model")
        self._by_task[task.id] = folder
        return {"folder": str(folder), "model_id": other.model_id}

    def respond(self, model, task, prompt, decoding):
        folder = self._by_task.get(task.id)
        if folder not in self._loaded:
            raise InputError(f"{self.name}: call prepare() for task {task.id!r} first")
        other = self._loaded[folder]
        start = time.perf_counter()
        ids = other.chat_ids(prompt)
        return MethodResponse(ids, _generate(other, ids, decoding), time.perf_counter() - start, {"model": str(folder)})


def build_methods(
    names: Sequence[str | Method] | str,
    *,
    prefix: str | Path | None = None,
    selfcontrol: SelfControlConfig | dict[str, Any] | None = None,
    repe: dict[str, Any] | None = None,
    prompt_style: str = "user",
    batch_prompts: int | None = None,
) -> list[Method]:
    """Method objects from names (``"none,prompt"`` or a list); :class:`Method` instances pass through."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: list[Method] = []
    for name in names:
        if isinstance(name, Method):
            out.append(name)
        elif name == "none":
            out.append(NoControl())
        elif name == "prompt":
            out.append(PromptInstruction(prompt_style))
        elif name == "repe":
            out.append(RepeAddition(**(repe or {})))
        elif name == "selfcontrol":
            out.append(SelfControlMethod(selfcontrol, batch_prompts))
        elif name.startswith("model:") and name.removeprefix("model:").strip():
            out.append(OtherModel(name.removeprefix("model:").strip()))
        elif name == "prefix":
            if prefix is None:
                raise InputError("method 'prefix' needs a trained controller: pass prefix=FOLDER (--prefix DIR)")
            out.append(PrefixMethod(prefix))
        else:
            raise InputError(f"unknown method {name!r}; choose from {', '.join(METHODS)}, or model:DIR")
    seen = [m.name for m in out]
    if len(set(seen)) != len(seen) or not seen:
        raise InputError(f"methods must be distinct and non-empty, got {seen}")
    return out


def run_isolated_many(model: HookedChatModel, method: Method, task: Task, prompts: Sequence[str],
                      decoding: Decoding) -> list[MethodResponse]:
    """``method.respond_many`` with a check that it left no hooks or prefix behind (raises :class:`ControlLeakError`)."""
    before = hook_state(model)
    out = method.respond_many(model, task, list(prompts), decoding)
    after = hook_state(model)
    if after != before:
        raise ControlLeakError(f"method {method.name!r} left control on the model: hooks/prefix {before} -> {after}")
    if len(out) != len(prompts):
        raise ControlLeakError(f"method {method.name!r} returned {len(out)} responses for {len(prompts)} prompts")
    return out


def run_isolated(model: HookedChatModel, method: Method, task: Task, prompt: str, decoding: Decoding) -> MethodResponse:
    """:func:`run_isolated_many` of one prompt."""
    return run_isolated_many(model, method, task, [prompt], decoding)[0]
