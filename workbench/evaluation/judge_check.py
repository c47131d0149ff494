"""Judge check: can this model's self-judgement tell a task's good answers from bad ones?

SelfControl climbs the model's own suffix score, so it can only help where
that score separates answers showing the behaviour from answers showing its
opposite. Each task ships hand-written contrast pairs (one prompt, a target
response, an opposite response); we score both responses with the clean
model, exactly as the search would (chat-formatted prompt ids + response ids
from ``model.encode`` + the task's suffix), and report the ROC AUC of target
vs opposite, the mean paired gap and how often the target wins its own pair.
Cheap (one batched forward per task), so run it before spending compute on a
task: an AUC near 0.5 means the search is steering toward noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from jaxtyping import Float
from tqdm.auto import tqdm

from .. import plotting
from ..errors import InputError
from ..selfcontrol.suffix import score_responses
from ..selfcontrol.tasks import CompiledSuffix, Task, Wording, get_task, list_tasks, wording_path
from ..store import atomic_write, atomic_write_json
from .judges import roc_auc

if TYPE_CHECKING:
    from ..model.chat_model import HookedChatModel

GOOD_AUC = 0.75
"""AUC at or above which we call a task's self-judge usable."""
WEAK_AUC = 0.6
"""AUC below which the self-judge is treated as no better than chance (with ~20 pairs)."""


def verdict(auc: float, low: float, high: float) -> str:
    """A one-word reading of the AUC and its 95% bootstrap interval, for the table.

    "inverted" means the self-judge prefers the *opposite* responses: climbing
    its score would steer away from the behaviour.
    """
    if auc >= GOOD_AUC and low > 0.5:
        return "usable"
    if auc >= WEAK_AUC and low > 0.5:
        return "weak"
    if auc <= 1 - WEAK_AUC and high < 0.5:
        return "inverted"
    return "chance"


@dataclass
class TaskCheck:
    """How one task's suffix score separates its contrast pairs."""

    task: str
    n_pairs: int
    auc: float
    auc_low: float  # 95% bootstrap interval over pairs
    auc_high: float
    mean_gap: float  # mean over pairs of score(target) - score(opposite)
    paired_accuracy: float  # fraction of pairs where the target response scores higher
    target_mean: float
    opposite_mean: float
    target_scores: list[float]
    opposite_scores: list[float]

    @property
    def verdict(self) -> str:
        return verdict(self.auc, self.auc_low, self.auc_high)


def _auc_interval(target: np.ndarray, opposite: np.ndarray, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap over pairs (resampled together, as they share prompts) of the AUC."""
    wins = (target[:, None] > opposite[None, :]) + 0.5 * (target[:, None] == opposite[None, :])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(target), size=(n_resamples, len(target)))
    boot = wins[idx[:, :, None], idx[:, None, :]].mean(axis=(1, 2))
    low, high = np.quantile(boot, [0.025, 0.975])
    return float(low), float(high)


def pair_scores(
    model: HookedChatModel, task: Task, suffixes: Sequence[CompiledSuffix]
) -> tuple[Float[np.ndarray, " pair"], Float[np.ndarray, " pair"]]:
    """Suffix score of each contrast pair's target and opposite response, scored as the search scores."""
    pairs = list(task.contrast_pairs)
    prompts = [model.chat_ids(p.prompt) for p in pairs]
    responses = [model.encode(p.target_response) for p in pairs] + [model.encode(p.opposite_response) for p in pairs]
    scores = score_responses(model, prompts + prompts, responses, suffixes).scores.float().cpu().numpy()
    return scores[: len(pairs)], scores[len(pairs):]


def check_task(model: HookedChatModel, task: Task | str, *, paraphrases: bool = False) -> TaskCheck:
    """Score every contrast pair of ``task`` (target vs opposite response) with the clean model."""
    task = get_task(task)
    pairs = list(task.contrast_pairs)
    if len(pairs) < 2:
        raise InputError(f"task {task.id!r} has {len(pairs)} contrast pair(s); the check needs at least 2")
    target, opposite = pair_scores(model, task, task.compile(model, task.questions(paraphrases)))
    low, high = _auc_interval(target, opposite)
    return TaskCheck(
        task=task.id, n_pairs=len(pairs), auc=roc_auc(target, opposite), auc_low=low, auc_high=high,
        mean_gap=float((target - opposite).mean()), paired_accuracy=float((target > opposite).mean()),
        target_mean=float(target.mean()), opposite_mean=float(opposite.mean()),
        target_scores=target.tolist(), opposite_scores=opposite.tolist(),
    )


@dataclass
class JudgeCheck:
    """Per-task results of :func:`judge_check` with a Markdown table, a plot and a writer."""

    model_id: str
    tasks: list[TaskCheck]
    paraphrases: bool = False

    def __getitem__(self, task_id: str) -> TaskCheck:
        for t in self.tasks:
            if t.task == task_id:
                return t
        raise KeyError(task_id)

    def table(self) -> str:
        """Markdown table, one row per task, best-separated first."""
        lines = [
            "| task | pairs | ROC AUC [95% CI] | mean gap (target - opposite) | target wins its pair | target mean | opposite mean | verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for t in sorted(self.tasks, key=lambda t: -t.auc):
            lines.append(
                f"| {t.task} | {t.n_pairs} | {t.auc:.2f} [{t.auc_low:.2f}, {t.auc_high:.2f}] | {t.mean_gap:+.4f} | "
                f"{t.paired_accuracy:.0%} | {t.target_mean:.4f} | {t.opposite_mean:.4f} | {t.verdict} |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "paraphrases": self.paraphrases,
            "thresholds": {"usable_auc": GOOD_AUC, "weak_auc": WEAK_AUC},
            "tasks": [{**asdict(t), "verdict": t.verdict} for t in self.tasks],
        }

    def plot(self, path: str | Path) -> Path:
        """Score distributions per task: target vs opposite responses, points over box plots."""
        order = sorted(self.tasks, key=lambda t: -t.auc)
        fig, axes = plotting.figure(width=max(6.0, 0.95 * len(order) + 2), height=4.4)
        ax = axes[0, 0]
        rng = np.random.default_rng(0)
        for i, t in enumerate(order):
            for offset, values, colour in ((-0.18, t.target_scores, "tab:green"), (0.18, t.opposite_scores, "tab:red")):
                ax.boxplot([values], positions=[i + offset], widths=0.28, showfliers=False,
                           medianprops={"color": colour}, boxprops={"color": colour},
                           whiskerprops={"color": colour}, capprops={"color": colour})
                ax.scatter(i + offset + rng.uniform(-0.07, 0.07, len(values)), values, s=9, color=colour, alpha=0.6)
        ax.scatter([], [], color="tab:green", label="target response")
        ax.scatter([], [], color="tab:red", label="opposite response")
        ax.set_xticks(range(len(order)), [f"{t.task}\nAUC {t.auc:.2f}" for t in order], rotation=45, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(order) - 0.4)
        ax.set_xlabel("task (sorted by ROC AUC)")
        ax.set_ylabel("suffix score (clean model's self-judgement)")
        ax.set_title(f"Judge check on {self.model_id}: suffix score of contrast-pair responses", fontsize=10)
        ax.legend(fontsize=8, loc="best")
        ax.grid(False, axis="x")
        return plotting.save(fig, path)

    def _repr_html_(self) -> str:
        """Jupyter's view: the table and the score distributions."""
        import tempfile

        from .. import display

        with tempfile.TemporaryDirectory() as tmp:
            plot = display.image(self.plot(Path(tmp) / "judge_check.png"), "judge check")
        return display.card(f"Judge check on {self.model_id}", display.markdown_table(self.table()), plot)

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``judge_check.json``, ``judge_check.md`` and ``judge_check.png`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "judge_check.json", "markdown": out / "judge_check.md", "plot": out / "judge_check.png"}
        atomic_write_json(paths["json"], self.to_dict())
        atomic_write(paths["markdown"], f"Judge check on `{self.model_id}`\n\n{self.table()}\n")
        self.plot(paths["plot"])
        return paths


def _tasks(tasks: Sequence[Task | str] | Task | str | None, what: str) -> list[Task]:
    """One task, a list, or ``None`` (all tasks), as Task objects; an empty selection is refused."""
    if tasks is None:
        tasks = list_tasks()
    elif isinstance(tasks, Task | str):
        tasks = [tasks]
    out = [get_task(t) for t in tasks]
    if not out:
        raise InputError(f"no tasks {what}")
    return out


def judge_check(
    model: HookedChatModel,
    tasks: Sequence[Task | str] | Task | str | None = None,
    *,
    paraphrases: bool = False,
    progress: bool = True,
) -> JudgeCheck:
    """How well the clean model's suffix score separates each task's contrast pairs (all tasks by default)."""
    tasks = _tasks(tasks, "to check")
    rows = [check_task(model, t, paraphrases=paraphrases)
            for t in tqdm(tasks, desc="judge check", disable=not progress, leave=False)]
    return JudgeCheck(model.model_id, rows, paraphrases)


# ---- choosing the wording per model (issue 15, item 2) ------------------------------------------------------
SELECTION_FORMAT = 1
SELECTION_SPLITS = 200
"""Random fit/held-out splits over which ``helps`` (how often the choice beats the task's own wording) is counted."""


def split_pairs(n_pairs: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """A random half of the pairs to choose on (the larger half when odd) and the rest to report on."""
    if n_pairs < 4:
        raise InputError(f"wording selection needs at least 4 contrast pairs (2 to fit, 2 to hold out), got {n_pairs}")
    order = np.random.default_rng(seed).permutation(n_pairs)
    cut = (n_pairs + 1) // 2
    return sorted(order[:cut].tolist()), sorted(order[cut:].tolist())


def _aucs(target: np.ndarray, opposite: np.ndarray, pairs: Sequence[int]) -> np.ndarray:
    """ROC AUC of each wording (row) on the given pairs (columns)."""
    idx = np.asarray(pairs)
    return np.array([roc_auc(t[idx], o[idx]) for t, o in zip(target, opposite, strict=True)])


def choose(target: Float[np.ndarray, "wording pair"], opposite: Float[np.ndarray, "wording pair"],
           fit: Sequence[int]) -> int:
    """Index of the wording with the best AUC on the ``fit`` pairs; ties go to the earliest (the task's own is first)."""
    return int(np.argmax(_aucs(target, opposite, fit)))


@dataclass
class WordingSelection:
    """The wording chosen for one task on one model, with the evidence: fit and held-out AUC of every wording."""

    task: str
    model_id: str
    wordings: list[Wording]
    fit_pairs: list[int]
    heldout_pairs: list[int]
    fit_auc: list[float]
    heldout_auc: list[float]
    chosen: int
    chosen_interval: tuple[float, float]  # 95% bootstrap interval of the chosen wording's held-out AUC
    default_interval: tuple[float, float]  # the same for the task's own wording (index 0)
    helps: float  # over random splits: fraction where the wording chosen on the fit half beats the default held out
    mean_change: float  # over random splits: mean held-out AUC change, chosen minus default
    n_splits: int

    @property
    def wording(self) -> Wording:
        return self.wordings[self.chosen]

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task, "model_id": self.model_id, "question": self.wording.question,
            "answer_prefix": self.wording.answer_prefix, "chosen": self.chosen,
            "fit_pairs": self.fit_pairs, "heldout_pairs": self.heldout_pairs,
            "chosen_heldout_auc": self.heldout_auc[self.chosen], "chosen_interval": list(self.chosen_interval),
            "default_heldout_auc": self.heldout_auc[0], "default_interval": list(self.default_interval),
            "helps": self.helps, "mean_change": self.mean_change, "n_splits": self.n_splits,
            "wordings": [{**asdict(w), "fit_auc": f, "heldout_auc": h}
                         for w, f, h in zip(self.wordings, self.fit_auc, self.heldout_auc, strict=True)],
        }


def select_from_scores(
    task: str,
    model_id: str,
    wordings: Sequence[Wording],
    target: Float[np.ndarray, "wording pair"],
    opposite: Float[np.ndarray, "wording pair"],
    *,
    seed: int = 0,
    n_splits: int = SELECTION_SPLITS,
) -> WordingSelection:
    """Choose on a fit half of the pairs, report on the other half; count over ``n_splits`` random splits how often it helps.

    The held-out AUC is the honest number: the fit AUC of the best of several
    wordings is biased upward (it was picked for being high).
    """
    target, opposite = np.asarray(target, dtype=float), np.asarray(opposite, dtype=float)
    if target.shape != opposite.shape or target.ndim != 2 or target.shape[0] != len(wordings):
        raise InputError(f"scores must be [wording, pair] for {len(wordings)} wordings, got {target.shape} and {opposite.shape}")
    fit, held = split_pairs(target.shape[1], seed)
    fit_auc, held_auc = _aucs(target, opposite, fit), _aucs(target, opposite, held)
    chosen = int(np.argmax(fit_auc))
    h = np.asarray(held)
    changes = []
    for k in range(n_splits):
        f, o = split_pairs(target.shape[1], seed + 1 + k)
        c = choose(target, opposite, f)
        changes.append(roc_auc(target[c, o], opposite[c, o]) - roc_auc(target[0, o], opposite[0, o]))
    changes_arr = np.asarray(changes)
    return WordingSelection(
        task=task, model_id=model_id, wordings=list(wordings), fit_pairs=fit, heldout_pairs=held,
        fit_auc=fit_auc.tolist(), heldout_auc=held_auc.tolist(), chosen=chosen,
        chosen_interval=_auc_interval(target[chosen, h], opposite[chosen, h]),
        default_interval=_auc_interval(target[0, h], opposite[0, h]),
        helps=float((changes_arr > 0).mean()) if n_splits else float("nan"),
        mean_change=float(changes_arr.mean()) if n_splits else float("nan"), n_splits=n_splits,
    )


def select_wording(
    model: HookedChatModel,
    task: Task | str,
    *,
    seed: int = 0,
    n_splits: int = SELECTION_SPLITS,
    save: bool = True,
    root: str | Path | None = None,
) -> WordingSelection:
    """Score every wording of ``task`` (:meth:`Task.wordings`) on its contrast pairs, choose one, save the choice.

    The saved choice (``$WORKBENCH_HOME/judge_wording/<model>/<task>.json``, or under ``root``) is what
    ``self_control(..., question="auto")`` reads.
    """
    task = get_task(task)
    wordings = task.wordings()
    scores = [pair_scores(model, task, task.with_wording(w).compile(model)) for w in wordings]
    target = np.stack([t for t, _ in scores])
    opposite = np.stack([o for _, o in scores])
    selection = select_from_scores(task.id, model.model_id, wordings, target, opposite, seed=seed, n_splits=n_splits)
    if save:
        save_wording(selection, task, root)
    return selection


def save_wording(selection: WordingSelection, task: Task, root: str | Path | None = None) -> Path:
    """Write the choice where :func:`workbench.selfcontrol.tasks.saved_wording` reads it (atomically)."""
    if selection.task != task.id:
        raise InputError(f"a selection for task {selection.task!r} cannot be saved as {task.id!r}")
    path = wording_path(selection.model_id, task.id, root)
    record = {"format": SELECTION_FORMAT, "model_id": selection.model_id, "task": task.judge_dict(),
              "question": selection.wording.question, "answer_prefix": selection.wording.answer_prefix,
              "selection": selection.to_dict()}
    return atomic_write_json(path, record)


@dataclass
class WordingSelections:
    """:func:`select_wordings` over several tasks: a Markdown table and a writer."""

    model_id: str
    tasks: list[WordingSelection]

    def table(self) -> str:
        lines = [
            "| task | pairs (fit / held out) | own wording: held-out AUC [95% CI] | chosen wording | chosen: fit AUC | "
            "chosen: held-out AUC [95% CI] | Δ held out | choice beats own wording (random splits) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for t in self.tasks:
            d, c = t.default_interval, t.chosen_interval
            own = "(own wording)" if t.chosen == 0 else t.wording.label()
            lines.append(
                f"| {t.task} | {len(t.fit_pairs)} / {len(t.heldout_pairs)} | {t.heldout_auc[0]:.2f} [{d[0]:.2f}, {d[1]:.2f}] | "
                f"{own} | {t.fit_auc[t.chosen]:.2f} | {t.heldout_auc[t.chosen]:.2f} [{c[0]:.2f}, {c[1]:.2f}] | "
                f"{t.heldout_auc[t.chosen] - t.heldout_auc[0]:+.2f} | {t.helps:.0%} (mean Δ {t.mean_change:+.3f}) |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "n_splits": SELECTION_SPLITS, "tasks": [t.to_dict() for t in self.tasks]}

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``wording_selection.json`` and ``wording_selection.md`` into ``out_dir``."""
        out = Path(out_dir)
        paths = {"json": out / "wording_selection.json", "markdown": out / "wording_selection.md"}
        atomic_write_json(paths["json"], self.to_dict())
        atomic_write(paths["markdown"], f"Judge wording selection on `{self.model_id}`\n\n{self.table()}\n")
        return paths


def select_wordings(
    model: HookedChatModel,
    tasks: Sequence[Task | str] | Task | str | None = None,
    *,
    seed: int = 0,
    save: bool = True,
    root: str | Path | None = None,
    progress: bool = True,
) -> WordingSelections:
    """:func:`select_wording` for each task (all tasks by default)."""
    tasks = _tasks(tasks, "to select wordings for")
    rows = [select_wording(model, t, seed=seed, save=save, root=root)
            for t in tqdm(tasks, desc="wording selection", disable=not progress, leave=False)]
    return WordingSelections(model.model_id, rows)
