"""Ablations of a found control: which layers carry it, and how much the wording of the suffix matters.

Layers: keep the control only on a window of consecutive layers, regenerate
under it and score the response with the clean model's suffix score; score
against the window's position and width shows where the control does its
work (a window over all layers is the full control).

Suffixes: the task's question and its paraphrases each define a suffix. Per
prompt, compare their first-iteration steering directions (cosine per
layer) and run SelfControl with each: the score each reaches under its own
wording, and the score its response gets under the main question.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm.auto import tqdm

from .. import plotting
from ..errors import InputError
from ..selfcontrol.control import Control, layer_of
from ..selfcontrol.search import SelfControlConfig, SelfControlResult, evaluate_controls
from ..selfcontrol.suffix import score_responses
from ..selfcontrol.tasks import Task, get_task
from .control_cache import CachedResult, analysis_config, cached_self_control_many
from .directions import cosine_matrix, plot_cosine_matrix, steering_direction

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..model.chat_model import HookedChatModel


# ------------------------------------------------------------------ layer windows
def window_control(control: Control, layers: Sequence[int]) -> Control:
    """``control`` restricted to the hooks of ``layers`` (via :meth:`Control.restrict`)."""
    wanted = set(layers)
    names = [n for n in control.hook_names if layer_of(n) in wanted]
    if not names:
        raise InputError(f"the control has no hook at layers {sorted(wanted)}")
    return control.restrict(names)


def default_windows(layers: Sequence[int], widths: Sequence[int] | None = None, stride: int | None = None) -> list[tuple[int, int]]:
    """(start layer, width) pairs: for each width, windows sliding by ``stride``, plus the full window."""
    layers = sorted(layers)
    n = len(layers)
    widths = sorted({w for w in (widths or (max(1, n // 6), max(1, n // 3), max(1, n // 2))) if 1 <= w <= n})
    stride = stride or max(1, n // 10)
    out = []
    for w in widths:
        starts = list(range(0, n - w + 1, stride))
        if starts[-1] != n - w:
            starts.append(n - w)  # always reach the last layers
        out += [(layers[s], w) for s in starts]
    out.append((layers[0], n))
    return list(dict.fromkeys(out))


def _search_config(result: CachedResult | SelfControlResult) -> SelfControlConfig:
    """The settings the search ran with (a cached record keeps them as JSON)."""
    if isinstance(result, SelfControlResult):
        return result.config
    config = dict(result.config)
    if config.get("layers") is not None:
        config["layers"] = tuple(config["layers"])
    return SelfControlConfig(**config)


def generate_and_score(
    model: HookedChatModel,
    prompt_ids: Sequence[int],
    controls: Sequence[Control],
    task: Task,
    cfg: SelfControlConfig,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[list[float], list[list[int]]]:
    """Generation under each control as the search generates, scored by the clean suffix score; best branch kept."""
    suffixes = task.compile(model, task.questions(cfg.paraphrases))
    scores: list[float] = []
    responses: list[list[int]] = []
    for start in tqdm(range(0, len(controls), batch_size), desc="windows", disable=not progress, leave=False):
        for options in evaluate_controls(model, list(prompt_ids), controls[start:start + batch_size], suffixes, cfg, cfg.seed):
            responses.append(list(options[0][0]))  # options are sorted best first
            scores.append(options[0][1])
    return scores, responses


@dataclass
class LayerAblation:
    """Suffix score of the response generated with the control kept only on each window of layers."""

    model_id: str
    task_id: str
    prompt: str
    layers: list[int]
    windows: list[tuple[int, int]]  # (start layer, width)
    scores: list[float]
    responses: list[str]
    full_score: float  # all layers (regenerated here)
    none_score: float  # no control (regenerated here)
    search_score: float  # what the search reported

    def grid(self) -> tuple[list[int], list[int], np.ndarray]:
        """(widths, start layers, scores[width, start]) with NaN where no window was run."""
        widths = sorted({w for _, w in self.windows})
        starts = sorted({s for s, _ in self.windows})
        m = np.full((len(widths), len(starts)), np.nan)
        for (s, w), score in zip(self.windows, self.scores, strict=True):
            m[widths.index(w), starts.index(s)] = score
        return widths, starts, m

    def to_dict(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "task": self.task_id, "prompt": self.prompt, "layers": self.layers,
                "full_score": self.full_score, "none_score": self.none_score, "search_score": self.search_score,
                "windows": [{"start": s, "width": w, "end": s + w - 1, "score": sc, "gain": sc - self.none_score,
                             "response": r} for (s, w), sc, r in zip(self.windows, self.scores, self.responses, strict=True)]}

    def rows(self) -> list[dict[str, Any]]:
        return [{"model": self.model_id, "task": self.task_id, "prompt": self.prompt, **{k: v for k, v in w.items() if k != "response"}}
                for w in self.to_dict()["windows"]]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerAblation:
        """Back from :meth:`to_dict` (e.g. a study's JSON), to re-plot without regenerating."""
        windows = data["windows"]
        return cls(data["model_id"], data["task"], data["prompt"], data["layers"], [(w["start"], w["width"]) for w in windows],
                   [w["score"] for w in windows], [w["response"] for w in windows], data["full_score"], data["none_score"],
                   data["search_score"])


def layer_window_ablation(
    model: HookedChatModel,
    result: CachedResult | SelfControlResult,
    task: Task | str,
    *,
    windows: Sequence[tuple[int, int]] | None = None,
    widths: Sequence[int] | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> LayerAblation:
    """Score with the found control kept on each (start layer, width) window only; generation follows the search's settings."""
    task = get_task(task)
    prompt_ids, control, cfg = result.prompt_ids, result.control, _search_config(result)
    layers = sorted(layer_of(n) for n in control.hook_names)
    windows = [tuple(w) for w in windows] if windows is not None else default_windows(layers, widths, stride)
    controls = []
    for start, width in windows:
        if width < 1 or start not in layers or layers.index(start) + width > len(layers):
            raise InputError(f"window (start {start}, width {width}) does not fit the control's layers {layers[0]}-{layers[-1]}")
        i = layers.index(start)
        controls.append(window_control(control, layers[i:i + width]))
    full = (layers[0], len(layers))
    extra = [control * 0.0] + ([] if full in windows else [control])  # no control; all layers unless a window is
    scores, responses = generate_and_score(model, prompt_ids, controls + extra, task, cfg, batch_size, progress)
    n = len(windows)
    full_score = scores[windows.index(full)] if full in windows else scores[n + 1]
    return LayerAblation(model.model_id, task.id, result.prompt, layers, windows, scores[:n],
                         [model.decode(r) for r in responses[:n]], full_score, scores[n], result.score)


def plot_layer_ablation(ablations: LayerAblation | Sequence[LayerAblation]) -> Figure:
    """Left: score gain over no control per window (width × start). Right: gain against window centre per width."""
    items = [ablations] if isinstance(ablations, LayerAblation) else list(ablations)
    if not items:
        raise InputError("no ablations to plot")
    widths, starts, _ = items[0].grid()
    grids = np.stack([a.grid()[2] - a.none_score for a in items])
    gains = np.where(np.isfinite(grids).any(0), np.nansum(grids, 0) / np.maximum(np.isfinite(grids).sum(0), 1), np.nan)
    full = float(np.mean([a.full_score - a.none_score for a in items]))
    fig, axes = plotting.figure(1, 2, width=4.6, height=3.4)
    ax = axes[0, 0]
    v = max(1e-6, float(np.nanmax(np.abs(gains))))
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#b0b0b0")  # grey: windows not run
    img = ax.imshow(np.ma.masked_invalid(gains), aspect="auto", origin="lower", cmap=cmap, vmin=-v, vmax=v)
    ax.grid(False)
    ax.set_xticks(range(len(starts)))
    ax.set_xticklabels(starts)
    ax.set_yticks(range(len(widths)))
    ax.set_yticklabels(widths)
    ax.set_xlabel("first layer of the window")
    ax.set_ylabel("window width (layers)")
    fig.colorbar(img, ax=ax, label="score gain over no control")
    ax.set_title(f"full control: {full:+.4f} (grey: not run)", fontsize=9)
    ax = axes[0, 1]
    for wi, w in enumerate(widths):
        ok = np.isfinite(gains[wi])
        centres = np.asarray(starts, dtype=float)[ok] + (w - 1) / 2
        ax.plot(centres, gains[wi][ok], marker="o", ms=3, label=f"width {w}")
    ax.axhline(full, color="black", ls="--", lw=1, label="all layers")
    ax.axhline(0, color="gray", lw=0.6)
    plotting.layer_axis(ax, items[0].layers, label="window centre (layer)")
    ax.set_ylabel("score gain over no control")
    ax.legend(fontsize=7)
    fig.suptitle(f"Layer-window ablation — {plotting.model_label(items[0].model_id)}, task {items[0].task_id} "
                 f"({len(items)} prompt{'s' if len(items) > 1 else ''})", fontsize=10)
    return fig


# ------------------------------------------------------------------ suffix wording
def question_variants(task: Task, questions: Sequence[str] | None = None, paraphrases: bool = False) -> list[Task]:
    """One task per question (the main question first); the main one is ``task`` itself so cached runs are shared."""
    questions = list(questions) if questions is not None else task.questions(paraphrases=True)
    out = []
    for i, q in enumerate(questions):
        if q == task.question and not paraphrases:
            out.append(task)
        else:
            out.append(dataclasses.replace(task, question=q, paraphrases=(), id=f"{task.id}#q{i}"))
    return out


@dataclass
class SuffixAblation:
    """Per prompt: steering-direction cosines between wordings, and the score SelfControl reaches with each."""

    model_id: str
    task_id: str
    questions: list[str]
    prompts: list[str]
    layers: list[int]
    cosines: np.ndarray  # [prompt, layer, question, question]
    initial_scores: np.ndarray  # [prompt, question]: the original response under each wording
    final_scores: np.ndarray  # [prompt, question]: reached with that wording
    main_scores: np.ndarray  # [prompt, question]: that run's response scored under the main question
    responses: list[list[str]]

    def informative_layers(self) -> list[int]:
        """Layers whose directions are non-zero (the last block's gradient at prompt positions is exactly zero)."""
        return [layer for i, layer in enumerate(self.layers) if np.isfinite(self.cosines[:, i]).all()]

    def mean_cosine(self) -> np.ndarray:
        idx = [self.layers.index(layer) for layer in self.informative_layers()]
        return np.nanmean(self.cosines[:, idx], axis=(0, 1))

    def layer_profile(self) -> np.ndarray:
        """Per layer, the mean cosine between different wordings."""
        q = len(self.questions)
        off = ~np.eye(q, dtype=bool)
        out = []
        for i in range(len(self.layers)):
            values = self.cosines[:, i][:, off]
            out.append(float(np.nanmean(values)) if q > 1 and np.isfinite(values).any() else np.nan)
        return np.array(out)

    def to_dict(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "task": self.task_id, "questions": self.questions, "prompts": self.prompts,
                "layers": self.layers, "mean_cosine": self.mean_cosine().tolist(), "layer_profile": self.layer_profile().tolist(),
                "initial_scores": self.initial_scores.tolist(), "final_scores": self.final_scores.tolist(),
                "main_scores": self.main_scores.tolist(), "responses": self.responses}

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for p, prompt in enumerate(self.prompts):
            for q, question in enumerate(self.questions):
                out.append({"model": self.model_id, "task": self.task_id, "prompt": prompt, "question_index": q,
                            "question": question, "initial_score": float(self.initial_scores[p, q]),
                            "final_score": float(self.final_scores[p, q]),
                            "gain": float(self.final_scores[p, q] - self.initial_scores[p, q]),
                            "main_question_score": float(self.main_scores[p, q]),
                            "main_question_gain": float(self.main_scores[p, q] - self.initial_scores[p, 0])})
        return out

    def plot(self) -> Figure:
        """Cosine between wordings (mean over prompts and layers), its profile over layers, and gains per wording."""
        fig, axes = plotting.figure(1, 3, width=4.0, height=3.5)
        labels = ["main"] + [f"para {i}" for i in range(1, len(self.questions))]
        plot_cosine_matrix(self.mean_cosine(), labels, ax=axes[0, 0], vmax=1.0,
                           title="steering-direction cosine (mean over layers, prompts)")
        ax = axes[0, 1]
        ax.plot(self.layers, self.layer_profile(), marker="o", ms=3)
        ax.axhline(0, color="gray", lw=0.6)
        plotting.layer_axis(ax, self.layers)
        ax.set_ylabel("mean cosine between wordings")
        ax.set_title("agreement of wordings per layer", fontsize=9)
        ax = axes[0, 2]
        x = np.arange(len(self.questions))
        own = (self.final_scores - self.initial_scores).mean(0)
        main = (self.main_scores - self.initial_scores[:, :1]).mean(0)
        ax.bar(x - 0.2, own, width=0.4, label="own wording")
        ax.bar(x + 0.2, main, width=0.4, label="main question")
        ax.axhline(0, color="gray", lw=0.6)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=30, ha="right")
        ax.set_ylabel("score gain (mean over prompts)")
        ax.set_title("gain reached with each wording", fontsize=9)
        ax.legend(fontsize=7)
        fig.suptitle(f"Suffix ablation — {plotting.model_label(self.model_id)}, task {self.task_id} "
                     f"({len(self.prompts)} prompts, {len(self.questions)} wordings)", fontsize=10)
        return fig


def suffix_ablation(
    model: HookedChatModel,
    task: Task | str,
    *,
    prompts: Sequence[str] | None = None,
    n_prompts: int = 2,
    split: str = "train",
    questions: Sequence[str] | None = None,
    config: SelfControlConfig | None = None,
    position: str = "last",
    cache_root: str | None = None,
    progress: bool = True,
    batch_prompts: int | None = None,
    **overrides: Any,
) -> SuffixAblation:
    """Compare the task's wordings (default: its question and paraphrases) on ``prompts``."""
    task = get_task(task)
    cfg = analysis_config(config, **overrides)
    variants = question_variants(task, questions, cfg.paraphrases)
    if len(variants) < 1:
        raise InputError("no questions to compare")
    prompts = list(prompts) if prompts is not None else task.split(split)[:n_prompts]
    if not prompts:
        raise InputError("no prompts")
    main_suffix = task.compile(model, [variants[0].question])
    cos, init, final, main, responses = [], [], [], [], []
    layers: list[int] = []
    ids_of = [model.chat_ids(p) for p in prompts]
    # every wording's searches of all prompts together (batched across prompts)
    per_variant = [cached_self_control_many(model, ids_of, variant, cfg, root=cache_root, batch_size=batch_prompts,
                                            progress=progress) for variant in variants]
    bar = tqdm(total=len(prompts), desc=f"suffix ablation [{task.id}]", disable=not progress, leave=False)
    for p_index, ids in enumerate(ids_of):
        runs = [records[p_index] for records in per_variant]
        bar.update()
        response = runs[0].original_ids  # the answer every wording's search starts from (main question's branch)
        dirs = []
        for variant in variants:
            vec, names, _ = steering_direction(model, ids, response, variant, config=cfg, position=position)  # type: ignore[arg-type]
            dirs.append(vec)
        layers = [layer_of(n) for n in names]
        stacked = torch.stack(dirs)  # [question, layer, d]
        cos.append(np.stack([cosine_matrix(stacked[:, li]).numpy() for li in range(len(layers))]))
        init.append([r.initial_score for r in runs])
        final.append([r.score for r in runs])
        main.append(score_responses(model, [ids], [r.response_ids for r in runs], main_suffix,
                                    temperature=cfg.score_temperature).scores.tolist())
        responses.append([r.response for r in runs])
    bar.close()
    return SuffixAblation(model.model_id, task.id, [v.question for v in variants], prompts, layers, np.stack(cos),
                          np.asarray(init), np.asarray(final), np.asarray(main), responses)
