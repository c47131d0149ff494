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
from tqdm.auto import tqdm

from .. import plotting
from ..errors import InputError
from ..selfcontrol.suffix import score_responses
from ..selfcontrol.tasks import Task, get_task, list_tasks
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


def check_task(model: HookedChatModel, task: Task | str, *, paraphrases: bool = False) -> TaskCheck:
    """Score every contrast pair of ``task`` (target vs opposite response) with the clean model."""
    task = get_task(task)
    pairs = list(task.contrast_pairs)
    if len(pairs) < 2:
        raise InputError(f"task {task.id!r} has {len(pairs)} contrast pair(s); the check needs at least 2")
    suffixes = task.compile(model, task.questions(paraphrases))
    prompts = [model.chat_ids(p.prompt) for p in pairs]
    responses = [model.encode(p.target_response) for p in pairs] + [model.encode(p.opposite_response) for p in pairs]
    scores = score_responses(model, prompts + prompts, responses, suffixes).scores.float().cpu().numpy()
    target, opposite = scores[: len(pairs)], scores[len(pairs):]
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


def judge_check(
    model: HookedChatModel,
    tasks: Sequence[Task | str] | Task | str | None = None,
    *,
    paraphrases: bool = False,
    progress: bool = True,
) -> JudgeCheck:
    """How well the clean model's suffix score separates each task's contrast pairs (all tasks by default)."""
    if tasks is None:
        tasks = list_tasks()
    elif isinstance(tasks, Task | str):
        tasks = [tasks]
    tasks = [get_task(t) for t in tasks]
    if not tasks:
        raise InputError("no tasks to check")
    rows = [check_task(model, t, paraphrases=paraphrases)
            for t in tqdm(tasks, desc="judge check", disable=not progress, leave=False)]
    return JudgeCheck(model.model_id, rows, paraphrases)
