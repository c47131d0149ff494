"""SelfControl's search: iterate suffix gradients with a step-size search.

Per iteration: gradient at the current control; candidate controls
``Δ + η·g`` for ``η = initial_step · step_scale**k``; one batched generation
for all candidates (and first-token branches); each candidate keeps its best
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
from .suffix import DEFAULT_TEMPERATURE, Loss, StepMode, score_responses, suffix_gradients
from .tasks import CompiledSuffix, Task, check_question, get_task, with_question

if TYPE_CHECKING:
    from ..model.chat_model import HookedChatModel


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


def evaluate_controls(
    model: HookedChatModel,
    prompt_ids: list[int],
    controls: Sequence[Control],
    suffixes: list[CompiledSuffix],
    cfg: SelfControlConfig,
    seed: int,
) -> list[list[tuple[list[int], float, float, int]]]:
    """Generate under each control (one batch) and score each branch on the clean model.

    Returns per control its branches as (response ids, score, nll, branch), best score first.
    """
    batch = Control.stack(controls) if len(controls) > 1 else controls[0]
    with batch.applied(model):
        gen = model.generate([prompt_ids] * len(controls), max_new_tokens=cfg.max_new_tokens, branches=cfg.branches,
                             do_sample=cfg.do_sample, temperature=cfg.temperature, top_p=cfg.top_p, seed=seed)
    scored = score_responses(model, [prompt_ids], gen.tokens, suffixes, temperature=cfg.score_temperature)
    out = []
    for c in range(len(controls)):
        rows = range(c * cfg.branches, (c + 1) * cfg.branches)
        options = [(gen.tokens[r], float(scored.scores[r]), float(scored.nll[r]), r - c * cfg.branches) for r in rows]
        options.sort(key=lambda o: -o[1])
        out.append(options)
    return out


def _guard(tokens: list[int], nll: float, reference_nll: float, cfg: SelfControlConfig) -> str | None:
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
        if _guard(option[0], option[2], reference_nll, cfg) is None:
            return option, None
    return options[0], _guard(options[0][0], options[0][2], reference_nll, cfg)


def self_control(
    model: HookedChatModel,
    prompt: str | Sequence[int],
    task: Task | str,
    config: SelfControlConfig | None = None,
    **overrides: Any,
) -> SelfControlResult:
    """Steer one prompt's answer toward ``task``'s target by suffix gradients (SelfControl)."""
    cfg = resolve_config(config, **overrides)
    steps = dtype_steps(cfg.steps(), model.dtype, cfg.step_mode)
    task = with_question(get_task(task), model.model_id, cfg.question)
    start = time.perf_counter()
    prompt_ids = model.chat_ids(prompt) if isinstance(prompt, str) else list(prompt)
    prompt_text = prompt if isinstance(prompt, str) else model.decode(prompt_ids)
    suffixes = task.compile(model, task.questions(cfg.paraphrases))
    names = model.hook_names(cfg.layers, cfg.point)
    zero = Control.zeros(model, len(prompt_ids), names)

    original_options = evaluate_controls(model, prompt_ids, [zero], suffixes, cfg, cfg.seed)[0]
    original = original_options[0]  # the clean model's own best branch: no guard on the reference
    original_ids, initial_score, original_nll = original[0], original[1], original[2]
    best = {"ids": original_ids, "score": initial_score, "nll": original_nll, "control": zero}
    iterations: list[Iteration] = []
    bar = tqdm(range(cfg.iterations), desc=f"self-control [{task.id}]", disable=not cfg.progress, leave=False)
    for it in bar:
        grads = suffix_gradients(model, prompt_ids, best["ids"], suffixes, control=best["control"], loss=cfg.loss,
                                 point=cfg.point, layers=cfg.layers, clip=cfg.clip, top_k=cfg.grad_top_k,
                                 temperature=cfg.score_temperature)
        controls = [best["control"] + grads.step(eta, cfg.step_mode, cfg.step_geometry, cfg.sink_ratio) for eta in steps]
        for c in controls:
            if not all(torch.isfinite(d).all() for d in c.deltas.values()):
                raise NumericalError("a candidate control is NaN/inf; use smaller steps")
        candidates: list[Candidate] = []
        accepted = None
        seed = cfg.seed + 1000 * (it + 1)
        if cfg.batch_candidates:
            evaluated = evaluate_controls(model, prompt_ids, controls, suffixes, cfg, seed)
        else:
            evaluated = []
        for k, eta in enumerate(steps):
            if accepted is not None and not cfg.batch_candidates:
                candidates.append(Candidate(eta, [], "", float("nan"), float("nan"), -1, "not evaluated"))
                continue
            options = evaluated[k] if cfg.batch_candidates else evaluate_controls(model, prompt_ids, [controls[k]], suffixes, cfg, seed)[0]
            (ids, score, nll, branch), reason = _pick(options, original_nll, cfg)
            status = reason or ("not better" if score <= best["score"] + cfg.threshold or accepted is not None else "accepted")
            if status == "not better" and accepted is not None and reason is None and score > best["score"] + cfg.threshold:
                status = "better, later step"
            candidates.append(Candidate(eta, list(ids), model.decode(ids), score, nll, branch, status))
            if status == "accepted":
                accepted = (k, ids, score, nll)
        if accepted is not None:
            k, ids, score, nll = accepted
            best = {"ids": list(ids), "score": score, "nll": nll, "control": controls[k]}
        iterations.append(Iteration(it, grads.loss, grads.score, grads.raw_norms, grads.norms(), candidates,
                                    steps[accepted[0]] if accepted else None, best["control"], best["score"]))
        bar.set_postfix(score=f"{best['score']:.4f}")
        if accepted is None:
            break
    bar.close()
    return SelfControlResult(
        task_id=task.id, prompt=prompt_text, prompt_ids=prompt_ids, original_ids=list(original_ids),
        original_response=model.decode(original_ids), initial_score=initial_score, response_ids=list(best["ids"]),
        response=model.decode(best["ids"]), score=best["score"], control=best["control"], iterations=iterations,
        seconds=time.perf_counter() - start, config=cfg, original_nll=original_nll, nll=best["nll"], hook_names=names,
    )
