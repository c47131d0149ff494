"""SelfControl's search: iterate suffix gradients with a step-size search.

Per iteration: gradient at the current control; candidate controls
``Δ + η·g`` for ``η = initial_step · step_scale**k``; one batched generation
for all candidates (and first-token branches), across prompts too
(:func:`self_control_many`; one prompt is the batch of one); each candidate keeps its best
fluent branch by the clean model's suffix score; the first candidate (smallest
|η|) that beats the best score so far by more than ``threshold`` and passes the
fluency guard is accepted. Stops when none is accepted. Returns the global
best and the whole trajectory.

The fluency guard exists because the clean judge is easy to game: on
SmolLM2, large steps raised the score most by producing "Yes Yes Yes" or
token salad (DESIGN.md §1).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import InputError, NumericalError
from .control import Control
from .fluency import is_degenerate
from .steps import SINK_RATIO, StepGeometry, check_geometry, dtype_steps
from .suffix import DEFAULT_TEMPERATURE, Loss, StepMode, score_responses, suffix_gradients_many
from .tasks import CompiledSuffix, Task, check_question, get_task, with_question

if TYPE_CHECKING:
    from ..model.chat_model import HookedChatModel

#: Version of the search's *behaviour*: bump it with any change that can change a result for the same settings
#: (step geometry, acceptance rule, scoring). Caches and resumable runs key on it, so old results stop being served.
SEARCH_VERSION = 4  # 3: batched search across prompts, scoring unembeds only the positions it reads;
# 4: the step ladder starts at the dtype's resolution (bf16/fp16 results change; float32 ones do not)
SCORE_ROWS = 64  # rows (answers x suffixes) per clean scoring forward
CPU_BATCH_PROMPTS = 8
#: Seconds spent in each part of the search in this process (``gradient``, ``generation``,
#: ``scoring``): the throughput benchmark reads it to say where the time goes.
TIMINGS: dict[str, float] = {"gradient": 0.0, "generation": 0.0, "scoring": 0.0}


@dataclass
class SelfControlConfig:
    """Every knob of the search; defaults are the settings measured to work on SmolLM2-135M."""

    iterations: int = 3
    initial_step: float | None = None  # default: -0.001 (relative) or -0.5 (absolute)
    step_scale: float = 2.0
    n_steps: int = 4
    step_mode: StepMode = "relative"
    step_geometry: StepGeometry = "position"  # which residual norm a relative step is a fraction of (steps.py)
    sink_ratio: float = SINK_RATIO  # a position whose residual norm exceeds this x the layer median is a sink
    threshold: float = 0.0
    branches: int = 1
    max_new_tokens: int = 40
    loss: Loss = "score"
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float | None = None
    seed: int = 0
    clip: float | None = 1.0
    grad_top_k: int | None = None
    point: str = "hook_resid_post"
    layers: tuple[int, ...] | None = None
    paraphrases: bool = False
    question: str | None = None  # None: the task's own; "auto": the wording judge-check --select saved; or a text
    score_temperature: float = DEFAULT_TEMPERATURE
    fluency_guard: bool = True
    fluency_margin: float = 0.5
    batch_candidates: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        # Input checks (issue 11, point 6): refuse settings that would run a different search than asked.
        # h <- h + eta * grad(loss) descends the loss only for eta < 0; a positive step climbs it
        # (steers *away* from the target answer), so the sign is part of the contract, not a knob.
        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value != value or abs(value) == float("inf"):
                raise InputError(f"{name} must be a finite number, got {value!r}")
            return float(value)

        if self.initial_step is not None and number("initial_step") >= 0:
            raise InputError(
                f"initial_step must be negative, got {self.initial_step}: each step is h + eta * grad(loss), so "
                "eta > 0 climbs the loss (an uphill search, away from the target answer); use e.g. -0.001"
            )
        check_geometry(self.step_geometry)
        if number("sink_ratio") <= 1:
            raise InputError(f"sink_ratio must be > 1 (a multiple of the layer's median residual norm), got {self.sink_ratio}")
        check_question(self.question)
        if number("step_scale") <= 0:
            raise InputError(f"step_scale must be > 0 (it multiplies the step, keeping its sign), got {self.step_scale}")
        for name, low in (("iterations", 0), ("n_steps", 1), ("branches", 1), ("max_new_tokens", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"{name} must be an integer >= {low}, got {value!r}")

    def steps(self) -> list[float]:
        if self.n_steps < 1 or self.iterations < 0:
            raise InputError("n_steps must be >= 1 and iterations >= 0")
        eta0 = self.initial_step if self.initial_step is not None else (-0.001 if self.step_mode == "relative" else -0.5)
        return [eta0 * self.step_scale**k for k in range(self.n_steps)]


def resolve_config(config: SelfControlConfig | None = None, **overrides: Any) -> SelfControlConfig:
    """``config`` (default settings if None) with ``overrides`` applied; unknown names are refused."""
    cfg = config or SelfControlConfig()
    unknown = set(overrides) - set(SelfControlConfig.__dataclass_fields__)
    if unknown:
        raise InputError(f"unknown settings {sorted(unknown)}")
    return SelfControlConfig(**{**asdict(cfg), **overrides}) if overrides else cfg


def config_dict(config: SelfControlConfig) -> dict[str, Any]:
    """The settings that change a search's result, as JSON (``progress`` is not one)."""
    data = asdict(config)
    data.pop("progress", None)
    if data.get("layers") is not None:
        data["layers"] = list(data["layers"])
    return data


@dataclass
class Candidate:
    """One step size tried in one iteration."""

    step: float
    response_ids: list[int]
    response: str
    score: float
    nll: float
    branch: int
    status: str  # "accepted", "not better", "disfluent: ...", "degenerate: ...", "not evaluated"


@dataclass
class Iteration:
    index: int
    loss: float
    controlled_score: float  # the model's self-judgement with the current control applied
    raw_grad_norms: Float[Tensor, "layer pos"]
    grad_norms: Float[Tensor, "layer pos"]
    candidates: list[Candidate]
    accepted_step: float | None
    control: Control  # the control after this iteration (unchanged if nothing was accepted)
    best_score: float


@dataclass
class SelfControlResult:
    task_id: str
    prompt: str
    prompt_ids: list[int]
    original_ids: list[int]
    original_response: str
    initial_score: float
    response_ids: list[int]
    response: str
    score: float
    control: Control
    iterations: list[Iteration]
    seconds: float
    config: SelfControlConfig
    original_nll: float = float("nan")
    nll: float = float("nan")
    hook_names: list[str] = field(default_factory=list)

    @property
    def iterations_accepted(self) -> int:
        return sum(it.accepted_step is not None for it in self.iterations)

    @property
    def gain(self) -> float:
        return self.score - self.initial_score

    def to_dict(self, trajectory: bool = False) -> dict[str, Any]:
        out = {
            "task": self.task_id,
            "prompt": self.prompt,
            "original_response": self.original_response,
            "controlled_response": self.response,
            "initial_score": self.initial_score,
            "final_score": self.score,
            "iterations_accepted": self.iterations_accepted,
            "iterations_run": len(self.iterations),
            "original_nll": self.original_nll,
            "controlled_nll": self.nll,
            "seconds": round(self.seconds, 3),
        }
        if trajectory:
            out["config"] = {k: v for k, v in asdict(self.config).items()}
            out["trajectory"] = [
                {
                    "iteration": it.index,
                    "loss": it.loss,
                    "controlled_score": it.controlled_score,
                    "accepted_step": it.accepted_step,
                    "best_score": it.best_score,
                    "grad_norm_per_layer": it.grad_norms.norm(dim=-1).tolist(),
                    "candidates": [asdict(c) for c in it.candidates],
                }
                for it in self.iterations
            ]
        return out

    def _repr_html_(self) -> str:
        """Jupyter's view: the prompt, both answers with their scores, and the trajectory."""
        from .. import display

        answers = display.table(
            [["original", self.initial_score, self.original_nll, display.text(self.original_response)],
             ["controlled", self.score, self.nll, display.text(self.response)]],
            ["answer", "suffix score", "mean NLL", "text"])
        steps = [display.details(
            f"iteration {it.index}: loss {it.loss:.4f}, score under the control {it.controlled_score:.4f}, "
            f"accepted step {it.accepted_step if it.accepted_step is not None else 'none'}, best {it.best_score:.4f}",
            display.table([[f"{c.step:g}", c.score, c.nll, c.status, display.text(c.response)] for c in it.candidates],
                          ["step", "score", "NLL", "status", "answer"]))
            for it in self.iterations]
        return display.card(
            f"SelfControl on {self.task_id}: {self.initial_score:.4f} -> {self.score:.4f} ({self.gain:+.4f}), "
            f"{self.iterations_accepted} of {len(self.iterations)} iterations accepted, {self.seconds:.1f} s",
            display.heading("prompt"), display.text(self.prompt), answers, display.heading("trajectory"), *steps)


Option = tuple[list[int], float, float, int]  # (response ids, score, nll, branch)


def evaluate_many(
    model: HookedChatModel,
    jobs: Sequence[tuple[Sequence[int], Sequence[Control], int]],
    suffixes: list[CompiledSuffix],
    cfg: SelfControlConfig,
) -> list[list[list[Option]]]:
    """Per job ``(prompt ids, controls, seed)``: generate under each control and score each branch on the clean model.

    All controls of all jobs run in one left-padded generation (each row's control on its
    own prompt; each job samples from its own seed) and all answers are scored in one clean
    forward that shares each prompt's KV cache. Returns per job, per control its branches
    as (response ids, score, nll, branch), best score first.
    """
    rows, controls, groups = [], [], []
    for g, (prompt_ids, cs, _) in enumerate(jobs):
        for c in cs:
            rows.append(list(prompt_ids))
            controls.append(c)
            groups.append(g)
    batch = Control.stack(controls) if len(controls) > 1 else controls[0]
    start = time.perf_counter()
    with batch.applied(model):
        gen = model.generate(rows, max_new_tokens=cfg.max_new_tokens, branches=cfg.branches, do_sample=cfg.do_sample,
                             temperature=cfg.temperature, top_p=cfg.top_p, seed=[seed for _, _, seed in jobs],
                             seed_groups=groups)
    middle = time.perf_counter()
    scored = score_responses(model, gen.prompts, gen.tokens, suffixes, temperature=cfg.score_temperature,
                             batch_size=SCORE_ROWS)
    TIMINGS["generation"] += middle - start
    TIMINGS["scoring"] += time.perf_counter() - middle
    out: list[list[list[Option]]] = []
    row = 0
    for _, cs, _ in jobs:
        per_job = []
        for _ in cs:
            span = range(row * cfg.branches, (row + 1) * cfg.branches)
            options = [(gen.tokens[r], float(scored.scores[r]), float(scored.nll[r]), r - span.start) for r in span]
            options.sort(key=lambda o: -o[1])
            per_job.append(options)
            row += 1
        out.append(per_job)
    return out


def evaluate_controls(
    model: HookedChatModel,
    prompt_ids: list[int],
    controls: Sequence[Control],
    suffixes: list[CompiledSuffix],
    cfg: SelfControlConfig,
    seed: int,
) -> list[list[Option]]:
    """:func:`evaluate_many` for one prompt: per control its branches, best score first."""
    return evaluate_many(model, [(prompt_ids, controls, seed)], suffixes, cfg)[0]


def fluency_problem(tokens: list[int], nll: float, reference_nll: float, cfg: SelfControlConfig) -> str | None:
    """Why the guard refuses an answer (degenerate, or NLL above the reference's + margin), or None: the one
    fluency rule of the search and of the preference pairs."""
    if not cfg.fluency_guard:
        return None
    reason = is_degenerate(tokens)
    if reason:
        return f"degenerate: {reason}"
    if nll > reference_nll + cfg.fluency_margin:
        return f"disfluent: NLL {nll:.2f} > {reference_nll:.2f} + {cfg.fluency_margin}"
    return None


def _pick(options, reference_nll: float, cfg: SelfControlConfig) -> tuple[tuple, str | None]:
    """The best-scoring branch that passes the guard (else the best branch, with its reason)."""
    for option in options:
        if fluency_problem(option[0], option[2], reference_nll, cfg) is None:
            return option, None
    return options[0], fluency_problem(options[0][0], options[0][2], reference_nll, cfg)


@dataclass
class _Search:
    """One prompt's search state inside :func:`self_control_many`."""

    index: int
    prompt: str
    prompt_ids: list[int]
    started: float
    best: dict[str, Any] = field(default_factory=dict)
    original: Option | None = None
    iterations: list[Iteration] = field(default_factory=list)
    done: bool = False
    reported: int = 0  # progress-bar steps already counted

    def seed(self, cfg: SelfControlConfig) -> int:
        """The original answer's seed, then one per iteration: per prompt, whatever the batch."""
        return cfg.seed + 1000 * len(self.iterations) if self.original is not None else cfg.seed


def _judge(model: HookedChatModel, cfg: SelfControlConfig, steps: list[float], suffixes: list[CompiledSuffix],
           search: _Search, grads: Any, controls: list[Control], evaluated: list[list[Option]] | None) -> None:
    """Accept the first fluent candidate that beats the best score (one iteration of one prompt)."""
    best, original_nll = search.best, search.original[2]
    candidates: list[Candidate] = []
    accepted = None
    seed = search.seed(cfg)
    for k, eta in enumerate(steps):
        if accepted is not None and evaluated is None:
            candidates.append(Candidate(eta, [], "", float("nan"), float("nan"), -1, "not evaluated"))
            continue
        options = evaluated[k] if evaluated is not None else evaluate_controls(model, search.prompt_ids, [controls[k]],
                                                                               suffixes, cfg, seed)[0]
        (ids, score, nll, branch), reason = _pick(options, original_nll, cfg)
        status = reason or ("not better" if score <= best["score"] + cfg.threshold or accepted is not None else "accepted")
        if status == "not better" and accepted is not None and reason is None and score > best["score"] + cfg.threshold:
            status = "better, later step"
        candidates.append(Candidate(eta, list(ids), model.decode(ids), score, nll, branch, status))
        if status == "accepted":
            accepted = (k, ids, score, nll)
    if accepted is not None:
        k, ids, score, nll = accepted
        search.best = {"ids": list(ids), "score": score, "nll": nll, "control": controls[k]}
    search.iterations.append(Iteration(len(search.iterations), grads.loss, grads.score, grads.raw_norms, grads.norms(),
                                       candidates, steps[accepted[0]] if accepted else None, search.best["control"],
                                       search.best["score"]))
    if accepted is None or len(search.iterations) >= cfg.iterations:
        search.done = True


def self_control_many(
    model: HookedChatModel,
    prompts: Sequence[str | Sequence[int]],
    task: Task | str,
    config: SelfControlConfig | None = None,
    *,
    batch_size: int | None = None,
    progress: bool = True,
    **overrides: Any,
) -> list[SelfControlResult]:
    """SelfControl on many prompts at once: one :class:`SelfControlResult` per prompt, as :func:`self_control` gives.

    Up to ``batch_size`` prompts are searched together (default: :func:`default_batch_prompts`).
    Per round, the gradients of all iterating prompts come from one forward and one
    backward (rows = prompts x suffixes); the candidates of all of them (x branches),
    with the original answers of prompts just joining, from one generation; all answers
    are scored in one clean forward. A prompt that stops leaves the batch and the next
    waiting prompt takes its place. Seeds are per prompt, so results do not depend on
    ``batch_size``; one progress bar counts each prompt's original answer and iterations.
    """
    cfg = resolve_config(config, **overrides)
    steps = dtype_steps(cfg.steps(), model.dtype, cfg.step_mode)
    task = with_question(get_task(task), model.model_id, cfg.question)
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise InputError("self_control_many takes a list of prompts (texts or token-id lists)")
    prompts = list(prompts)
    if not prompts:
        return []
    if batch_size is None:
        batch_size = default_batch_prompts(model)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    suffixes = task.compile(model, task.questions(cfg.paraphrases))
    names = model.hook_names(cfg.layers, cfg.point)
    ids_of = [model.chat_ids(p) if isinstance(p, str) else list(p) for p in prompts]
    for ids in ids_of:
        if not ids:
            raise InputError("empty prompt: every prompt needs at least one token")
    waiting: list[int | _Search] = list(range(len(prompts)))  # prompt indices, or searches paused by an OOM
    active: list[_Search] = []
    finished: dict[int, SelfControlResult] = {}
    per_prompt = cfg.iterations + 1
    bar = tqdm(total=len(prompts) * per_prompt, desc=f"self-control [{task.id}]", unit="step",
               disable=not (progress and cfg.progress), leave=False)
    while waiting or active:
        while waiting and len(active) < batch_size:
            i = waiting.pop(0)
            if isinstance(i, _Search):
                active.append(i)
                continue
            text = prompts[i] if isinstance(prompts[i], str) else model.decode(ids_of[i])
            active.append(_Search(i, text, ids_of[i], time.perf_counter()))
        try:
            _round(model, cfg, steps, suffixes, names, active)
        except _OutOfMemory as err:
            if len(active) == 1:
                raise err.error from None
            batch_size = max(1, len(active) // 2)
            warnings.warn(f"out of device memory with {len(active)} prompts in the batch: continuing with {batch_size}",
                          stacklevel=2)
            # a round changes no search before its last forward succeeds: the paused ones resume where they were
            waiting = active[batch_size:] + waiting
            active = active[:batch_size]
            continue
        for search in list(active):
            progressed = per_prompt if search.done else 1 + len(search.iterations)
            bar.update(progressed - search.reported)
            search.reported = progressed
            if search.done:
                finished[search.index] = _result(model, task, cfg, names, search)
                active.remove(search)
        bar.set_postfix(done=f"{len(finished)}/{len(prompts)}", active=len(active),
                        gain=f"{sum(r.gain for r in finished.values()) / max(1, len(finished)):+.4f}")
    bar.close()
    return [finished[i] for i in range(len(prompts))]


class _OutOfMemory(Exception):
    """A round ran out of device memory (wraps ``torch.cuda.OutOfMemoryError``); the batch is halved."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _round(model: HookedChatModel, cfg: SelfControlConfig, steps: list[float], suffixes: list[CompiledSuffix],
           names: list[str], active: list[_Search]) -> None:
    """One round for the active prompts: gradients, one generation, one scoring forward, the accept decisions."""
    try:
        _round_unguarded(model, cfg, steps, suffixes, names, active)
    except torch.cuda.OutOfMemoryError as err:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise _OutOfMemory(err) from err


def _round_unguarded(model: HookedChatModel, cfg: SelfControlConfig, steps: list[float], suffixes: list[CompiledSuffix],
                     names: list[str], active: list[_Search]) -> None:
    starting = [s for s in active if s.original is None]
    iterating = [s for s in active if s.original is not None and not s.done]
    grads = []
    start = time.perf_counter()
    if iterating:
        grads = suffix_gradients_many(model, [s.prompt_ids for s in iterating], [s.best["ids"] for s in iterating],
                                      suffixes, controls=[s.best["control"] for s in iterating], loss=cfg.loss,
                                      point=cfg.point, layers=cfg.layers, clip=cfg.clip, top_k=cfg.grad_top_k,
                                      temperature=cfg.score_temperature)
    TIMINGS["gradient"] += time.perf_counter() - start
    candidates = []
    for s, g in zip(iterating, grads, strict=True):
        controls = [s.best["control"] + g.step(eta, cfg.step_mode, cfg.step_geometry, cfg.sink_ratio) for eta in steps]
        for c in controls:
            if not all(torch.isfinite(d).all() for d in c.deltas.values()):
                raise NumericalError("a candidate control is NaN/inf; use smaller steps")
        candidates.append(controls)
    jobs = [(s.prompt_ids, [Control.zeros(model, s.prompt_ids, names)], s.seed(cfg)) for s in starting]
    if cfg.batch_candidates:
        jobs += [(s.prompt_ids, controls, s.seed(cfg)) for s, controls in zip(iterating, candidates, strict=True)]
    evaluated = evaluate_many(model, jobs, suffixes, cfg) if jobs else []
    for s, options in zip(starting, evaluated[: len(starting)], strict=True):
        s.original = options[0][0]  # the clean model's own best branch: no guard on the reference
        s.best = {"ids": list(s.original[0]), "score": s.original[1], "nll": s.original[2], "control": s.best.get("control")
                  or Control.zeros(model, s.prompt_ids, names)}
        if cfg.iterations == 0:
            s.done = True
    rest = evaluated[len(starting):] if cfg.batch_candidates else [None] * len(iterating)
    for s, g, controls, options in zip(iterating, grads, candidates, rest, strict=True):
        _judge(model, cfg, steps, suffixes, s, g, controls, options)


def _result(model: HookedChatModel, task: Task, cfg: SelfControlConfig, names: list[str], s: _Search) -> SelfControlResult:
    original_ids, initial_score, original_nll = s.original[0], s.original[1], s.original[2]
    return SelfControlResult(
        task_id=task.id, prompt=s.prompt, prompt_ids=s.prompt_ids, original_ids=list(original_ids),
        original_response=model.decode(original_ids), initial_score=initial_score, response_ids=list(s.best["ids"]),
        response=model.decode(s.best["ids"]), score=s.best["score"], control=s.best["control"], iterations=s.iterations,
        seconds=time.perf_counter() - s.started, config=cfg, original_nll=original_nll, nll=s.best["nll"], hook_names=names,
    )


def self_control(
    model: HookedChatModel,
    prompt: str | Sequence[int],
    task: Task | str,
    config: SelfControlConfig | None = None,
    **overrides: Any,
) -> SelfControlResult:
    """Steer one prompt's answer toward ``task``'s target by suffix gradients (SelfControl): :func:`self_control_many` of one."""
    if not isinstance(prompt, str):
        try:
            prompt = [int(t) for t in (prompt.tolist() if hasattr(prompt, "tolist") else prompt)]
        except (TypeError, ValueError):
            raise InputError("a prompt is a text or a list of token ids") from None
    return self_control_many(model, [prompt], task, config, batch_size=1, **overrides)[0]


def default_batch_prompts(model: HookedChatModel) -> int:
    """How many prompts to search at once when not told.

    CUDA: from free memory, budgeting per prompt the activations of its candidate rows
    (gradient and generation) at the model's size. CPU: :data:`CPU_BATCH_PROMPTS`, the best
    measured on a 2-core machine (``python -m analyses.throughput``; larger batches gain little there).
    """
    if model.device.type != "cuda":
        return CPU_BATCH_PROMPTS
    free, _ = torch.cuda.mem_get_info(model.device)
    element = torch.tensor([], dtype=model.dtype).element_size()
    # per prompt: ~8 candidate rows x 512 positions x (layers x d_model residual + vocab logits), x4 for the backward
    per_prompt = 8 * 512 * (model.n_layers * model.d_model * 4 + model.d_vocab) * element
    return int(max(1, min(64, (free * 0.5) // per_prompt)))


def compare_searches(a: SelfControlResult, b: SelfControlResult, tolerance: float = 1e-4) -> dict[str, int]:
    """Did two searches of one prompt accept the same step at every iteration? Counts of iterations.

    ``same``: equal accepted step (or both none). ``tie``: they differ, but in one of them a
    candidate's accept decision was within ``tolerance`` of the bar it had to clear (two
    scores that close are equal up to float noise, so either choice is right); the
    trajectories part there, so later iterations are not compared. ``different``: anything else.
    """
    out = {"compared": 0, "same": 0, "tie": 0, "different": 0}
    before_a, before_b = a.initial_score, b.initial_score
    for ia, ib in zip(a.iterations, b.iterations, strict=False):
        out["compared"] += 1
        if ia.accepted_step == ib.accepted_step:
            out["same"] += 1
            before_a, before_b = ia.best_score, ib.best_score
            continue

        def close(it: Iteration, bar: float) -> bool:
            return any(abs(c.score - (bar + a.config.threshold)) <= tolerance for c in it.candidates if c.score == c.score)

        out["tie" if close(ia, before_a) or close(ib, before_b) else "different"] += 1
        break
    if out["different"] == 0 and out["tie"] == 0 and len(a.iterations) != len(b.iterations):
        out["different"] += 1  # one stopped, the other went on with the same steps: cannot happen without a tie
    return out
