"""Norm patterns: where along the layers SelfControl acts, per task (Cai et al. 2024, §5).

For each prompt we take the cached SelfControl run and measure, per layer:

- ``grad``: the first-iteration suffix-gradient norm (before clipping), over
  all prompt positions: where the self-judgement is most sensitive in
  absolute units;
- ``sensitivity``: at the last prompt token, the gradient norm times the
  residual norm: the first-order change of the loss for a *relative* step,
  which is what the default relative step mode takes (raw gradient norms
  shrink with depth mostly because residual norms grow). Read at the last
  token because summed over positions it is dominated by massive-norm
  positions: on SmolLM2 the first token's residual jumps from ~180 to
  ~25,000 at layer 11 (an attention sink), which alone then decides the sum;
- ``shift``: ``log||h + delta|| - log||h||`` at the last prompt token under
  the found control, ``h`` being the residual the control's addition lands
  on (upstream deltas included): the paper's norm-pattern measure;
- ``cumulative``: ``log||h_controlled|| - log||h_clean||`` at the last prompt
  token: the shift accumulated from all layers up to this one.

All four are aggregated over prompts (mean and standard deviation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from .. import plotting
from ..errors import InputError
from ..selfcontrol.control import Control
from ..selfcontrol.search import SelfControlConfig
from ..selfcontrol.steps import split_norms
from ..selfcontrol.tasks import Task, get_task
from .control_cache import CachedResult, analysis_config, cached_self_control_many
from .sinks import prompt_sinks

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..model.chat_model import HookedChatModel

#: The five emotion tasks of the paper's norm-pattern study.
EMOTION_TASKS = ["angry2peaceful", "afraid2fearless", "happy2sad", "surprised2calm", "disgusted2satisfied"]

MEASURES = {
    "grad": "suffix-gradient norm (first iteration)",
    "sensitivity": "gradient norm x residual norm (last prompt token)",
    "shift": "log||h+delta|| - log||h|| (last prompt token)",
    "cumulative": "log||h_ctrl|| - log||h_clean|| (last prompt token)",
}


SHORT = {"grad": "gradient norm", "sensitivity": "grad × resid norm (last token)",
         "shift": "log-norm shift (last token)", "cumulative": "cumulative log-norm shift"}


@torch.no_grad()
def residuals_at_last_token(
    model: HookedChatModel, prompt_ids: Sequence[int], hook_names: Sequence[str], control: Control | None = None
) -> Float[Tensor, "layer d_model"]:
    """Residual at each hook at the last prompt token, with ``control`` applied if given.

    The cache hooks are registered after the control's, so they see the residual *with* the delta added.
    """
    ids = model.as_tensor(list(prompt_ids))
    with control.applied(model) if control is not None else contextlib.nullcontext():
        cache = model.capture(ids, hook_names)
    return torch.stack([cache[n][0, -1].float().to(model.device) for n in hook_names])  # from each layer's device


def shift_scores(
    model: HookedChatModel, prompt_ids: Sequence[int], control: Control, clean: Tensor | None = None
) -> tuple[Float[Tensor, " layer"], Float[Tensor, " layer"]]:
    """(local, cumulative) log-norm shifts per hook of ``control`` at the last prompt token.

    ``clean``: the uncontrolled residuals at the last token, if the caller already has them.
    """
    names = control.hook_names
    if clean is None:
        clean = residuals_at_last_token(model, prompt_ids, names)
    controlled = residuals_at_last_token(model, prompt_ids, names, control)  # h + delta
    delta = torch.stack([control.deltas[n][-1].float().to(model.device) for n in names])
    before = controlled - delta  # h: what the delta was added to
    local = controlled.norm(dim=-1).log() - before.norm(dim=-1).log()
    cumulative = controlled.norm(dim=-1).log() - clean.norm(dim=-1).log()
    return local.cpu(), cumulative.cpu()


@dataclass
class NormPattern:
    """Per-layer norm measures of one task, one row per prompt (see module docstring)."""

    model_id: str
    task_id: str
    layers: list[int]
    prompts: list[str]
    measures: dict[str, np.ndarray]  # name -> [prompt, layer]
    position_grad_norms: list[np.ndarray]  # per prompt: raw gradient norm [layer, pos]
    initial_scores: list[float]
    final_scores: list[float]
    from_cache: list[bool] = field(default_factory=list)
    sink_masks: list[np.ndarray] = field(default_factory=list)  # per prompt: massive-activation positions [layer, pos]

    def grad_split(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean over prompts of the gradient norm per layer on the sink positions and on all others (steps.sink_mask)."""
        on, off = zip(*(split_norms(torch.as_tensor(g), torch.as_tensor(m))
                        for g, m in zip(self.position_grad_norms, self.sink_masks, strict=True)), strict=True)
        return torch.stack(on).mean(0).numpy(), torch.stack(off).mean(0).numpy()

    def mean(self, measure: str = "grad") -> np.ndarray:
        return self._get(measure).mean(axis=0)

    def std(self, measure: str = "grad") -> np.ndarray:
        return self._get(measure).std(axis=0)

    def _get(self, measure: str) -> np.ndarray:
        if measure not in self.measures:
            raise InputError(f"unknown measure {measure!r}; use one of {sorted(self.measures)}")
        return self.measures[measure]

    def normalised(self, measure: str = "grad") -> np.ndarray:
        """Mean absolute pattern divided by its maximum (all-zero stays zero)."""
        m = np.abs(self.mean(measure))
        top = m.max() if m.size else 0.0
        return m / top if top > 0 else m

    def mean_layer(self, measure: str = "grad") -> float:
        """Centre of mass of the absolute pattern along the layers."""
        m = np.abs(self.mean(measure))
        return float((np.asarray(self.layers) * m).sum() / m.sum()) if m.sum() > 0 else float("nan")

    def position_pattern(self, last: int | None = None) -> np.ndarray:
        """Mean raw gradient norm per layer over the last ``last`` prompt positions, right-aligned: [layer, last]."""
        width = min(p.shape[1] for p in self.position_grad_norms)
        last = width if last is None else min(last, width)
        return np.mean([p[:, -last:] for p in self.position_grad_norms], axis=0)

    @property
    def gains(self) -> list[float]:
        return [f - i for i, f in zip(self.initial_scores, self.final_scores, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "task": self.task_id,
            "layers": self.layers,
            "prompts": self.prompts,
            "initial_scores": self.initial_scores,
            "final_scores": self.final_scores,
            "measures": {
                name: {"mean": self.mean(name).tolist(), "std": self.std(name).tolist(), "per_prompt": v.tolist(),
                       "mean_layer": self.mean_layer(name), "description": MEASURES.get(name, name)}
                for name, v in self.measures.items()
            },
        }

    def rows(self) -> list[dict[str, Any]]:
        """One row per layer (mean and std of every measure), for CSV files."""
        out = []
        for i, layer in enumerate(self.layers):
            row: dict[str, Any] = {"model": self.model_id, "task": self.task_id, "layer": layer}
            for name in self.measures:
                row[f"{name}_mean"] = float(self.mean(name)[i])
                row[f"{name}_std"] = float(self.std(name)[i])
            out.append(row)
        return out

    def _repr_html_(self) -> str:
        """Jupyter's view: the mean layer of each measure, the per-layer table and the figure."""
        from .. import display

        gains = self.gains
        head = display.fields({"prompts": len(self.prompts), "mean score gain": sum(gains) / len(gains) if gains else None,
                               **{f"mean layer ({name})": f"{self.mean_layer(name):.1f}" for name in self.measures}})
        rows = [{"layer": row["layer"], **{k: f"{v:.3g}" for k, v in row.items() if k.endswith(("_mean", "_std"))}}
                for row in self.rows()]
        return display.card(f"Norm pattern of {self.task_id} on {self.model_id}", head,
                            display.details("per-layer means and standard deviations", display.table(rows)),
                            display.figure(self.plot(), "norm pattern"))

    def plot(self, last_positions: int = 16) -> Figure:
        """Four panels: gradient norm, sensitivity and shift per layer (mean ± std), gradient norm per position."""
        fig, axes = plotting.figure(2, 2, width=4.4, height=3.0)
        n = len(self.prompts)
        for ax, name, log in [(axes[0, 0], "grad", True), (axes[0, 1], "sensitivity", True), (axes[1, 0], "shift", False)]:
            mean, std = self.mean(name), self.std(name)
            ax.plot(self.layers, mean, marker="o", ms=3, label="mean")
            ax.fill_between(self.layers, mean - std, mean + std, alpha=0.25, label=f"± std ({n} prompts)")
            if log and (mean > 0).any():
                ax.set_yscale("log")
            ax.set_ylabel(SHORT[name], fontsize=8)
            plotting.layer_axis(ax, self.layers)
            handles, labels = ax.get_legend_handles_labels()
            if name == "shift" and "cumulative" in self.measures:  # much larger: its own axis
                twin = ax.twinx()
                line = twin.plot(self.layers, self.mean("cumulative"), ls="--", color="gray", label="cumulative (right)")
                twin.set_ylabel(SHORT["cumulative"], fontsize=8, color="gray")
                twin.tick_params(labelsize=7, colors="gray")
                handles, labels = handles + line, labels + ["cumulative (right)"]
            if name == "grad" and self.sink_masks and any(m.any() for m in self.sink_masks):  # the sink apart
                on, off = self.grad_split()
                handles += ax.plot(self.layers, off, ls=":", color="tab:green") + ax.plot(self.layers, on, ls="--", color="tab:red")
                labels += ["positions off the sink", "sink position(s)"]
            ax.legend(handles, labels, fontsize=7)
        ax = axes[1, 1]
        pattern = self.position_pattern(last_positions)
        with np.errstate(divide="ignore"):
            img = ax.imshow(np.log10(np.where(pattern > 0, pattern, np.nan)), aspect="auto", origin="lower", cmap="viridis",
                            extent=(-pattern.shape[1] - 0.5, -0.5, self.layers[0] - 0.5, self.layers[-1] + 0.5))
        ax.grid(False)
        fig.colorbar(img, ax=ax, label="log10 gradient norm")
        ax.set_xlabel("prompt position (0 = last token)")
        plotting.layer_axis(ax, self.layers, axis="y")
        gains = np.mean(self.gains) if self.gains else float("nan")
        fig.suptitle(f"Norm pattern — {plotting.model_label(self.model_id)}, task {self.task_id} "
                     f"({n} prompts, mean score gain {gains:+.4f})", fontsize=10)
        return fig


def analyze_norms(
    task: Task | str,
    *,
    model: HookedChatModel | None = None,
    prompts: Sequence[str] | None = None,
    n_prompts: int = 3,
    split: str = "train",
    config: SelfControlConfig | None = None,
    use_cache: bool = True,
    cache_root: str | None = None,
    progress: bool = True,
    batch_prompts: int | None = None,
    **overrides: Any,
) -> NormPattern:
    """Norm pattern of ``task`` over ``prompts`` (default: the first ``n_prompts`` of ``split``).

    Controls come from :func:`~workbench.analysis.control_cache.cached_self_control_many` (the prompts not cached yet
    are searched together, ``batch_prompts`` at once), so a second call with the same
    model, task, prompts and settings does not search again. ``model=None`` loads the embedded model;
    ``config=None`` means :func:`~workbench.analysis.control_cache.analysis_config` (``overrides`` apply on top).
    """
    task = get_task(task)
    if model is None:
        from ..model.loading import load_model

        model = load_model(progress=progress)
    prompts = list(prompts) if prompts is not None else task.split(split)[:n_prompts]
    if not prompts:
        raise InputError("no prompts: pass prompts=[...] or n_prompts >= 1")
    cfg = analysis_config(config, **overrides)
    records: list[CachedResult] = []
    measures: dict[str, list[np.ndarray]] = {m: [] for m in MEASURES}
    positions, sinks = [], []
    searched = cached_self_control_many(model, prompts, task, cfg, root=cache_root, refresh=not use_cache,
                                        batch_size=batch_prompts, progress=progress)
    for record in tqdm(searched, desc=f"norm pattern [{task.id}]", disable=not progress, leave=False):
        records.append(record)
        raw = record.raw_grad_norms.float()
        clean = residuals_at_last_token(model, record.prompt_ids, record.hook_names)
        local, cumulative = shift_scores(model, record.prompt_ids, record.control, clean)
        measures["grad"].append(raw.norm(dim=-1).numpy())
        measures["sensitivity"].append((raw[:, -1] * clean.norm(dim=-1).cpu()).numpy())
        measures["shift"].append(local.numpy())
        measures["cumulative"].append(cumulative.numpy())
        positions.append(raw.numpy())
        sinks.append(prompt_sinks(model, record.prompt_ids, record.hook_names).numpy())
    return NormPattern(
        model_id=model.model_id, task_id=task.id, layers=records[0].layers, prompts=[r.prompt for r in records],
        measures={k: np.stack(v) for k, v in measures.items()}, position_grad_norms=positions,
        initial_scores=[r.initial_score for r in records], final_scores=[r.score for r in records],
        from_cache=[r.from_cache for r in records], sink_masks=sinks,
    )


def norm_heatmap(
    patterns: Sequence[NormPattern], measure: str | Sequence[str] = "sensitivity", title: str | None = None
) -> Figure:
    """Layers × tasks heatmap, each task's mean pattern divided by its maximum, tasks ordered by mean layer.

    Several measures give one panel each (each panel ordered by its own mean layers). Each task's label
    carries the maximum it was divided by, so tiny patterns are not mistaken for large ones.
    """
    patterns = list(patterns)
    if not patterns:
        raise InputError("no norm patterns to plot")
    layers = patterns[0].layers
    if any(p.layers != layers for p in patterns):
        raise InputError("all patterns must cover the same layers")
    measures = [measure] if isinstance(measure, str) else list(measure)
    fig, axes = plotting.figure(1, len(measures), width=max(4.6, 1.6 + 0.9 * len(patterns)), height=4.8)
    img = None
    for ax, name in zip(axes.flat, measures, strict=True):
        ordered = sorted(patterns, key=lambda p: p.mean_layer(name))
        matrix = np.stack([p.normalised(name) for p in ordered], axis=1)
        img = ax.imshow(matrix, aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=1,
                        extent=(-0.5, len(ordered) - 0.5, layers[0] - 0.5, layers[-1] + 0.5))
        ax.grid(False)
        ax.scatter(range(len(ordered)), [p.mean_layer(name) for p in ordered], marker="D", s=18, color="cyan",
                   edgecolor="black", linewidth=0.5, label="mean layer", zorder=3)
        ax.set_xticks(range(len(ordered)))
        ax.set_xticklabels([f"{p.task_id}\n(max {np.abs(p.mean(name)).max():.1e})" for p in ordered],
                           rotation=35, ha="right", fontsize=7)
        ax.set_xlabel("task (ordered by mean layer)")
        plotting.layer_axis(ax, layers, axis="y")
        ax.legend(loc="upper right", fontsize=7)
        ax.set_title(MEASURES.get(name, name), fontsize=9)
    fig.colorbar(img, ax=list(axes.flat), label="per-task pattern / its max")
    n = sorted({len(p.prompts) for p in patterns})
    fig.suptitle(title or f"Norm patterns — {plotting.model_label(patterns[0].model_id)} "
                 f"({'/'.join(map(str, n))} prompts per task, mean over prompts)", fontsize=10)
    return fig
