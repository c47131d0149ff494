"""Directions of suffix gradients: cosines, PCA across tasks and prompts, and
PCA of a control's trajectory across iterations.

The *steering direction* of a prompt at a layer is minus the first-iteration
suffix-loss gradient (the way SelfControl moves the residual stream), at the
last prompt token (or averaged over prompt positions), scaled to unit norm.
Comparing these across prompts and tasks asks whether the model's
self-judgement pulls in one direction per behaviour, and whether different
behaviours share directions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from jaxtyping import Float
from matplotlib.ticker import MaxNLocator
from sklearn.decomposition import PCA
from torch import Tensor
from tqdm.auto import tqdm

from .. import plotting
from ..errors import InputError
from ..selfcontrol.control import Control, layer_of
from ..selfcontrol.search import (
    SelfControlConfig,
    default_batch_prompts,
    evaluate_many,
    resolve_config,
)
from ..selfcontrol.suffix import suffix_gradients_many
from ..selfcontrol.tasks import Task, get_task
from .control_cache import CachedResult, analysis_config, lookup

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..model.chat_model import HookedChatModel

Position = Literal["last", "mean"]


# ------------------------------------------------------------------ cosines
def unit(x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """``x / ||x||`` along the last axis (float32); zero vectors stay zero."""
    return torch.nn.functional.normalize(torch.as_tensor(x).float(), dim=-1)


def cosine(a: Float[Tensor, " d_model"], b: Float[Tensor, " d_model"]) -> float:
    """Cosine similarity of two vectors; NaN when either is zero."""
    a, b = torch.as_tensor(a).flatten(), torch.as_tensor(b).flatten()
    if a.shape != b.shape:
        raise InputError(f"vectors of different sizes: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float(cosine_matrix(a[None], b[None])[0, 0])


def cosine_matrix(
    a: Float[Tensor, "n d_model"] | Sequence[Tensor], b: Float[Tensor, "m d_model"] | Sequence[Tensor] | None = None
) -> Float[Tensor, "n m"]:
    """Pairwise cosines between the rows of ``a`` and of ``b`` (default ``a``); NaN where a row is zero."""
    a = torch.stack([torch.as_tensor(v).float() for v in a]) if not isinstance(a, Tensor) else a.float()
    b = a if b is None else (torch.stack([torch.as_tensor(v).float() for v in b]) if not isinstance(b, Tensor) else b.float())
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise InputError(f"cosine_matrix needs two [n, d] matrices with the same d, got {tuple(a.shape)} and {tuple(b.shape)}")
    out = unit(a) @ unit(b).T
    zero = (a.norm(dim=-1) == 0)[:, None] | (b.norm(dim=-1) == 0)[None, :]
    return out.masked_fill(zero, float("nan"))


def fit_pca(vectors: Float[Tensor, "n d_model"] | np.ndarray, n_components: int = 2) -> PCA:
    """scikit-learn PCA (centred) with as many components as the data allows."""
    x = np.asarray(torch.as_tensor(vectors).float().cpu().numpy(), dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise InputError(f"PCA needs at least two vectors as an [n, d] matrix, got shape {x.shape}")
    k = max(1, min(n_components, x.shape[0], x.shape[1]))
    return PCA(n_components=k).fit(x)


# ------------------------------------------------------------------ gradient directions
@dataclass
class GradientDirections:
    """Unit steering directions ``-grad`` per sample (a task and a prompt) and layer."""

    model_id: str
    hook_names: list[str]
    tasks: list[str]  # per sample
    prompts: list[str]  # per sample
    vectors: Float[Tensor, "sample layer d_model"]
    scores: list[float]  # the clean suffix score of each sample's original response
    position: str = "last"

    @property
    def layers(self) -> list[int]:
        return [layer_of(n) for n in self.hook_names]

    def layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise InputError(f"layer {layer} not among the computed layers {self.layers}")
        return self.layers.index(layer)

    def at_layer(self, layer: int) -> Float[Tensor, "sample d_model"]:
        return self.vectors[:, self.layer_index(layer)]

    def task_ids(self) -> list[str]:
        return list(dict.fromkeys(self.tasks))

    def by_task(self) -> dict[str, Float[Tensor, "layer d_model"]]:
        """Per task, the mean of its samples' unit directions, re-normalised (zero where all are zero)."""
        out = {}
        for t in self.task_ids():
            idx = [i for i, s in enumerate(self.tasks) if s == t]
            out[t] = unit(self.vectors[idx].mean(0))
        return out

    def consistency(self) -> dict[str, np.ndarray]:
        """Per task and layer, the mean cosine between different prompts' directions (1 = one shared direction)."""
        out = {}
        for t in self.task_ids():
            idx = [i for i, s in enumerate(self.tasks) if s == t]
            values = []
            for li in range(len(self.hook_names)):
                if len(idx) < 2:
                    values.append(float("nan"))
                    continue
                m = cosine_matrix(self.vectors[idx, li])
                off = m[~torch.eye(len(idx), dtype=torch.bool)]
                values.append(float(off.nanmean()) if torch.isfinite(off).any() else float("nan"))
            out[t] = np.asarray(values)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "layers": self.layers, "tasks": self.tasks, "prompts": self.prompts,
                "scores": self.scores, "position": self.position,
                "consistency": {t: v.tolist() for t, v in self.consistency().items()}}


def steering_direction(
    model: HookedChatModel,
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    task: Task | str,
    *,
    config: SelfControlConfig | None = None,
    position: Position = "last",
) -> tuple[Float[Tensor, "layer d_model"], list[str], float]:
    """Unit ``-grad`` of the suffix loss at every hook of ``config`` for one (prompt, response); and the score."""
    return steering_directions(model, [prompt_ids], [response_ids], task, config=config, position=position)[0]


def steering_directions(
    model: HookedChatModel,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    task: Task | str,
    *,
    config: SelfControlConfig | None = None,
    position: Position = "last",
    batch_prompts: int | None = None,
) -> list[tuple[Float[Tensor, "layer d_model"], list[str], float]]:
    """:func:`steering_direction` of several (prompt, response) pairs, ``batch_prompts`` per forward and backward."""
    cfg = resolve_config(config)
    task = get_task(task)
    if position not in ("last", "mean"):
        raise InputError(f"position must be 'last' or 'mean', not {position!r}")
    suffixes = task.compile(model, task.questions(cfg.paraphrases))
    size = batch_prompts or default_batch_prompts(model)
    out = []
    for start in range(0, len(prompts), size):
        for grads in suffix_gradients_many(model, prompts[start:start + size], responses[start:start + size], suffixes,
                                           loss=cfg.loss, point=cfg.point, layers=cfg.layers, clip=None,
                                           temperature=cfg.score_temperature):
            stacked = torch.stack([g.float().to(model.device) for g in grads.grads.values()])  # [layer, pos, d]
            vec = stacked[:, -1] if position == "last" else unit(stacked).mean(1)
            out.append((unit(-vec).cpu(), grads.hook_names, grads.score))
    return out


def original_response(
    model: HookedChatModel, prompt_ids: Sequence[int], task: Task, cfg: SelfControlConfig, cache_root: str | None = None
) -> list[int]:
    """The uncontrolled response SelfControl starts from: from the cache, else generated as the search does."""
    return original_responses(model, [prompt_ids], task, cfg, cache_root)[0]


def original_responses(
    model: HookedChatModel, prompts: Sequence[Sequence[int]], task: Task, cfg: SelfControlConfig,
    cache_root: str | None = None, batch_prompts: int | None = None,
) -> list[list[int]]:
    """:func:`original_response` of several prompts: the uncached ones generated together (each with the search's seed)."""
    out: list[list[int] | None] = []
    for ids in prompts:
        record = lookup(model, ids, task, cfg, root=cache_root)
        out.append(list(record.original_ids) if record is not None else None)
    missing = [i for i, r in enumerate(out) if r is None]
    names = model.hook_names(cfg.layers, cfg.point)
    suffixes = task.compile(model, task.questions(cfg.paraphrases))
    size = batch_prompts or default_batch_prompts(model)
    for start in range(0, len(missing), size):
        chunk = missing[start:start + size]
        jobs = [(list(prompts[i]), [Control.zeros(model, list(prompts[i]), names)], cfg.seed) for i in chunk]
        for i, options in zip(chunk, evaluate_many(model, jobs, suffixes, cfg), strict=True):
            out[i] = list(options[0][0][0])  # the best-scoring branch, as the search starts from
    return [list(r) for r in out if r is not None]


def gradient_directions(
    model: HookedChatModel,
    tasks: Sequence[Task | str],
    *,
    prompts: Mapping[str, Sequence[str]] | None = None,
    n_prompts: int = 3,
    split: str = "train",
    position: Position = "last",
    config: SelfControlConfig | None = None,
    cache_root: str | None = None,
    progress: bool = True,
    batch_prompts: int | None = None,
    **overrides: Any,
) -> GradientDirections:
    """First-iteration steering directions for each task's prompts (default: the first ``n_prompts`` of ``split``).

    Responses are the uncontrolled ones SelfControl starts from (read from the control cache when
    present); no search is run, so this costs one generation (or none) and one backward per prompt,
    both batched across a task's prompts (``batch_prompts`` at once).
    ``config=None`` means :func:`~workbench.analysis.control_cache.analysis_config`.
    """
    cfg = analysis_config(config, **overrides)
    task_objs = [get_task(t) for t in tasks]
    if not task_objs:
        raise InputError("no tasks given")
    vectors, task_ids, texts, scores = [], [], [], []
    names: list[str] = []
    for task in tqdm(task_objs, desc="gradient directions", disable=not progress, leave=False):
        task_prompts = list(prompts[task.id] if prompts and task.id in prompts else task.split(split)[:n_prompts])
        ids = [model.chat_ids(p) for p in task_prompts]
        responses = original_responses(model, ids, task, cfg, cache_root, batch_prompts)
        found = steering_directions(model, ids, responses, task, config=cfg, position=position, batch_prompts=batch_prompts)
        for prompt, (vec, hook_names, score) in zip(task_prompts, found, strict=True):
            names = hook_names
            vectors.append(vec)
            task_ids.append(task.id)
            texts.append(prompt)
            scores.append(score)
    return GradientDirections(model.model_id, names, task_ids, texts, torch.stack(vectors), scores, position)


# ------------------------------------------------------------------ PCA across tasks and prompts
def _informative_layers(directions: GradientDirections, count: int) -> list[int]:
    """``count`` evenly spaced layers among those with non-zero directions."""
    usable = [layer for i, layer in enumerate(directions.layers) if directions.vectors[:, i].norm(dim=-1).gt(0).all()]
    if not usable:
        raise InputError("all gradient directions are zero")
    idx = np.linspace(0, len(usable) - 1, min(count, len(usable))).round().astype(int)
    return [usable[i] for i in dict.fromkeys(idx)]


def plot_direction_pca(directions: GradientDirections, layers: Sequence[int] | None = None, ncols: int = 3) -> Figure:
    """Per layer, the samples' steering directions on their first two principal components, coloured by task."""
    layers = list(layers) if layers is not None else _informative_layers(directions, 6)
    nrows = (len(layers) + ncols - 1) // ncols
    fig, axes = plotting.figure(nrows, min(ncols, len(layers)), width=3.3, height=3.0)
    colors = plotting.task_colors(directions.tasks)
    for ax, layer in zip(axes.flat, layers, strict=False):
        x = directions.at_layer(layer)
        pca = fit_pca(x, 2)
        coords = pca.transform(x.double().numpy())
        if coords.shape[1] == 1:
            coords = np.concatenate([coords, np.zeros_like(coords)], axis=1)
        for t in directions.task_ids():
            idx = [i for i, s in enumerate(directions.tasks) if s == t]
            ax.scatter(coords[idx, 0], coords[idx, 1], color=colors[t], label=t, s=22, edgecolor="black", linewidth=0.3)
        ratio = list(pca.explained_variance_ratio_) + [0.0]
        ax.set_xlabel(f"PC1 ({ratio[0]:.0%})")
        ax.set_ylabel(f"PC2 ({ratio[1]:.0%})")
        ax.set_title(f"layer {layer}", fontsize=9)
    for ax in list(axes.flat)[len(layers):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(5, len(labels)), fontsize=7)
    fig.suptitle(f"PCA of suffix-gradient directions ({directions.position} prompt token) — "
                 f"{plotting.model_label(directions.model_id)}, {len(directions.tasks)} prompts", fontsize=10)
    return fig


def plot_cosine_matrix(
    matrix: Float[Tensor, "n m"] | np.ndarray, rows: Sequence[str], cols: Sequence[str] | None = None, *,
    title: str = "", label: str = "cosine", ax: Any = None, vmax: float | None = None,
) -> Figure:
    """A labelled cosine matrix with a symmetric colour scale and the values written in the cells."""
    m = np.asarray(torch.as_tensor(matrix).float().numpy())
    cols = list(cols) if cols is not None else list(rows)
    if ax is None:
        fig, axes = plotting.figure(1, 1, width=max(4.0, 1.8 + 0.65 * len(cols)), height=max(3.2, 1.6 + 0.55 * len(rows)))
        ax = axes[0, 0]
    else:
        fig = ax.figure
    v = vmax if vmax is not None else max(1e-6, float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 1.0)
    img = ax.imshow(m, cmap="RdBu_r", vmin=-v, vmax=v)
    ax.grid(False)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=35, ha="right")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows)
    if m.size <= 144:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(m[i, j]) > 0.6 * v else "black")
    fig.colorbar(img, ax=ax, label=label)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def plot_consistency(directions: GradientDirections) -> Figure:
    """Per layer: mean cosine between prompts of the same task (one line per task) and of different tasks."""
    fig, axes = plotting.figure(1, 1, width=5.2, height=3.4)
    ax = axes[0, 0]
    colors = plotting.task_colors(directions.tasks)
    for t, values in directions.consistency().items():
        ax.plot(directions.layers, values, marker="o", ms=2.5, color=colors[t], label=f"{t} (same task)")
    across = []
    for li in range(len(directions.layers)):
        m = cosine_matrix(directions.vectors[:, li])
        other = torch.tensor([[a != b for b in directions.tasks] for a in directions.tasks])
        values = m[other]
        across.append(float(values.nanmean()) if other.any() and torch.isfinite(values).any() else float("nan"))
    ax.plot(directions.layers, across, color="black", ls="--", lw=1.2, label="different tasks")
    d = directions.vectors.shape[-1]
    ax.axhspan(-2 / np.sqrt(d), 2 / np.sqrt(d), color="gray", alpha=0.2, label="random ±2σ")
    plotting.layer_axis(ax, directions.layers)
    ax.set_ylabel("mean cosine between prompts' directions")
    ax.legend(fontsize=6.5, loc="best")
    ax.set_title(f"Agreement of suffix-gradient directions ({directions.position} prompt token)\n"
                 f"{plotting.model_label(directions.model_id)}, {len(directions.tasks)} prompts", fontsize=9)
    return fig


def task_cosines(directions: GradientDirections, layer: int) -> Float[Tensor, "task task"]:
    """Cosine between the tasks' mean steering directions at ``layer``."""
    by_task = directions.by_task()
    i = directions.layer_index(layer)
    return cosine_matrix([v[i] for v in by_task.values()])


# ------------------------------------------------------------------ trajectory PCA
@dataclass
class Trajectory:
    """A control's path across iterations, projected on its principal components."""

    model_id: str
    task_id: str
    prompt: str
    layers: list[int]
    coords: np.ndarray  # [state, n_components]; state 0 is the zero control
    explained_variance_ratio: list[float]
    scores: list[float]  # best score at each state
    accepted: list[bool]  # whether each iteration moved the control

    def to_dict(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "task": self.task_id, "prompt": self.prompt, "layers": self.layers,
                "coords": self.coords.tolist(), "explained_variance_ratio": self.explained_variance_ratio,
                "scores": self.scores, "accepted": self.accepted}


def trajectory_pca(
    model: HookedChatModel, record: CachedResult, *, layers: Sequence[int] | None = None, position: Position = "last"
) -> Trajectory:
    """PCA of the controls visited by one SelfControl run (zero control first).

    Each state is the control at the chosen layers, per layer divided by the clean residual norm there (so
    deep layers with large residuals do not dominate), concatenated into one vector.
    """
    from .norms import residuals_at_last_token

    names = [n for n in record.hook_names if layers is None or layer_of(n) in set(layers)]
    if not names:
        raise InputError(f"none of layers {layers} is in the control")
    scale = residuals_at_last_token(model, record.prompt_ids, names).norm(dim=-1).clamp_min(1e-6).cpu()
    states = []
    for control in [None, *record.trajectory]:
        if control is None:
            states.append(torch.zeros(len(names) * model.d_model))
            continue
        rows = torch.stack([control.deltas[n].float().cpu() for n in names])  # [layer, pos, d]
        vec = rows[:, -1] if position == "last" else rows.mean(1)
        states.append((vec / scale[:, None]).flatten())
    x = torch.stack(states)
    if bool((x == x[0]).all()):  # nothing was accepted: no direction to find
        coords = np.zeros((len(states), 2))
        ratio = [0.0, 0.0]
    else:
        pca = fit_pca(x, 2)
        coords = pca.transform(x.double().numpy())
        ratio = [float(r) for r in pca.explained_variance_ratio_]
        if coords.shape[1] == 1:
            coords = np.concatenate([coords, np.zeros_like(coords)], axis=1)
            ratio.append(0.0)
        coords[:, np.asarray(ratio) < 1e-9] = 0.0  # round-off, not a direction
    scores = [record.initial_score, *record.iteration_scores]
    return Trajectory(record.control.model_id, record.task_id, record.prompt, [layer_of(n) for n in names],
                      coords, ratio, scores, [s is not None for s in record.accepted_steps])


def plot_trajectories(trajectories: Sequence[Trajectory]) -> Figure:
    """Each trajectory on its own principal components: states joined by arrows, coloured by score."""
    trajectories = list(trajectories)
    if not trajectories:
        raise InputError("no trajectories to plot")
    fig, axes = plotting.figure(1, len(trajectories), width=3.4, height=3.1)
    all_scores = [s for t in trajectories for s in t.scores]
    lo, hi = min(all_scores), max(all_scores)
    img = None
    for ax, t in zip(axes.flat, trajectories, strict=True):
        ax.plot(t.coords[:, 0], t.coords[:, 1], color="gray", lw=1, zorder=1)
        for k in range(len(t.coords) - 1):
            if np.allclose(t.coords[k], t.coords[k + 1]):
                continue
            ax.annotate("", xy=t.coords[k + 1, :2], xytext=t.coords[k, :2],
                        arrowprops=dict(arrowstyle="->", color="gray", lw=1))
        img = ax.scatter(t.coords[:, 0], t.coords[:, 1], c=t.scores, cmap="viridis", vmin=lo, vmax=hi + 1e-9, s=40,
                         edgecolor="black", linewidth=0.4, zorder=2)
        labels: dict[tuple[float, float], list[str]] = {}
        where: dict[tuple[float, float], tuple[float, float]] = {}
        for k, (x, y) in enumerate(t.coords[:, :2]):
            key = (round(float(x), 12), round(float(y), 12))
            labels.setdefault(key, []).append(str(k))
            where.setdefault(key, (float(x), float(y)))
        for key, ks in labels.items():  # states an iteration did not move share one label
            ax.annotate(",".join(ks), where[key], textcoords="offset points", xytext=(4, 4), fontsize=7)
        if np.ptp(t.coords[:, 1]) == 0:  # a one-dimensional path: keep the y axis readable
            span = max(float(np.abs(t.coords[:, 0]).max()), 1e-6)
            ax.set_ylim(-span, span)
        ratio = t.explained_variance_ratio + [0.0, 0.0]
        ax.set_xlabel(f"PC1 ({ratio[0]:.0%})")
        ax.set_ylabel(f"PC2 ({ratio[1]:.0%})")
        ax.set_title(f"{t.task_id}\n{t.prompt[:34]}…" if len(t.prompt) > 36 else f"{t.task_id}\n{t.prompt}", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.yaxis.set_major_locator(MaxNLocator(5))
    if img is not None:
        fig.colorbar(img, ax=list(axes.flat), label="suffix score (best so far)")
    fig.suptitle(f"Control trajectory across iterations — {plotting.model_label(trajectories[0].model_id)}\n"
                 f"(state 0 = no control; layers {trajectories[0].layers[0]}-{trajectories[0].layers[-1]}, "
                 "last prompt token, per-layer residual-normalised)", fontsize=9)
    return fig
