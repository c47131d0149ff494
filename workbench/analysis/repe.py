"""RepE reading vectors (Zou et al. 2023) and their cosine with suffix gradients.

A reading vector is, per layer, the direction in which hidden states of a
behaviour's examples differ from those of its opposite: each task's contrast
pairs give ``prompt + target_response`` and ``prompt + opposite_response`` as
a chat (user turn, assistant turn); the hidden state is read at the
response's last token (or averaged over its tokens). Per layer the direction
is the first principal component of the paired differences (PCA of the
differences and their negatives, i.e. uncentred, so the shared offset counts
as signal) with the sign that puts the target side higher, or the plain mean
difference. Comparing it with the suffix-gradient steering direction asks
whether SelfControl's self-judgement pushes along the same axis that
separates the behaviours in the representations.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from jaxtyping import Float
from sklearn.decomposition import PCA
from torch import Tensor
from tqdm.auto import tqdm

from .. import plotting
from ..errors import IncompatibleArtifactError, InputError
from ..selfcontrol.control import Control, layer_of
from ..selfcontrol.suffix import right_pad
from ..selfcontrol.tasks import ContrastPair, Task, get_task
from ..store import load_artifact, save_artifact
from .directions import GradientDirections, cosine_matrix, unit

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..model.chat_model import HookedChatModel

KIND = "reading_vector"
Method = Literal["pca", "mean"]
Token = Literal["last", "mean"]
States = dict[str, Float[Tensor, "n d_model"]]


def split_pairs(pairs: Sequence[ContrastPair], test_fraction: float = 0.33, seed: int = 0) -> tuple[list[ContrastPair], list[ContrastPair]]:
    """A seeded shuffle into (fit, held-out) pairs; at least one pair on each side."""
    pairs = list(pairs)
    if len(pairs) < 2:
        raise InputError(f"need at least 2 contrast pairs to hold some out, got {len(pairs)}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_test = min(len(pairs) - 1, max(1, round(test_fraction * len(pairs))))
    return [pairs[i] for i in order[n_test:]], [pairs[i] for i in order[:n_test]]


@torch.no_grad()
def pair_states(
    model: HookedChatModel,
    pairs: Sequence[ContrastPair],
    hook_names: Sequence[str],
    *,
    token: Token = "last",
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[States, States, dict[str, float]]:
    """Hidden states of the target and opposite sides of each pair, and the mean residual norm per hook."""
    if not pairs:
        raise InputError("no contrast pairs: the task has none, pass pairs=[ContrastPair(...), ...]")
    if token not in ("last", "mean"):
        raise InputError(f"token must be 'last' or 'mean', not {token!r}")
    rows, spans = [], []
    for pair in pairs:
        prompt = model.chat_ids(pair.prompt)
        for response in (pair.target_response, pair.opposite_response):
            ids = model.encode(response)
            if not ids:
                raise InputError(f"empty response in contrast pair for prompt {pair.prompt!r}")
            rows.append(prompt + ids)
            spans.append((len(prompt), len(prompt) + len(ids)))
    states: dict[str, list[Tensor]] = {n: [] for n in hook_names}
    norms: dict[str, list[Tensor]] = {n: [] for n in hook_names}
    for start in tqdm(range(0, len(rows), batch_size), desc="reading states", disable=not progress, leave=False):
        chunk, chunk_spans = rows[start:start + batch_size], spans[start:start + batch_size]
        ids, mask, _ = right_pad(chunk, model.pad_token_id, model.device)
        cache = model.capture(ids, hook_names, attention_mask=mask)
        for n in hook_names:
            h = cache[n].float()
            for r, (a, b) in enumerate(chunk_spans):
                span = h[r, b - 1:b] if token == "last" else h[r, a:b]
                states[n].append(span.mean(0).cpu())
                norms[n].append(span.norm(dim=-1).mean().cpu())
    stacked = {n: torch.stack(v) for n, v in states.items()}
    target = {n: v[0::2] for n, v in stacked.items()}
    opposite = {n: v[1::2] for n, v in stacked.items()}
    scales = {n: float(torch.stack(v).mean()) for n, v in norms.items()}
    return target, opposite, scales


def reading_direction(
    differences: Float[Tensor, "n d_model"], method: Method = "pca"
) -> tuple[Float[Tensor, " d_model"], float]:
    """Unit direction of paired differences (target - opposite), signed so the mean difference projects positive.

    Returns the direction and, for PCA, the first component's share of the variance (NaN for ``mean``).
    """
    d = torch.as_tensor(differences).float()
    if d.ndim != 2 or d.shape[0] < 1:
        raise InputError(f"differences must be an [n, d_model] matrix, got {tuple(d.shape)}")
    if method == "mean":
        return unit(d.mean(0)), float("nan")
    if method != "pca":
        raise InputError(f"method must be 'pca' or 'mean', not {method!r}")
    x = torch.cat([d, -d]).double().numpy()  # symmetric: PCA about the origin, the offset stays signal
    if not np.any(x):
        return torch.zeros(d.shape[1]), float("nan")
    pca = PCA(n_components=1).fit(x)
    direction = torch.as_tensor(pca.components_[0], dtype=torch.float32)
    if float(d.mean(0) @ direction) < 0:
        direction = -direction
    return unit(direction), float(pca.explained_variance_ratio_[0])


@dataclass
class ReadingVector:
    """Unit reading directions per hook, with the mean residual norm each was read at."""

    directions: dict[str, Float[Tensor, " d_model"]]
    scales: dict[str, float]
    model_id: str
    task_id: str = "custom"
    method: str = "pca"
    point: str = "hook_resid_post"
    token: str = "last"
    explained: dict[str, float] = field(default_factory=dict)
    fit_accuracy: dict[int, float] = field(default_factory=dict)
    n_pairs: int = 0

    @property
    def hook_names(self) -> list[str]:
        return list(self.directions)

    @property
    def layers(self) -> list[int]:
        return [layer_of(n) for n in self.directions]

    def direction(self, layer: int) -> Float[Tensor, " d_model"]:
        for n, v in self.directions.items():
            if layer_of(n) == layer:
                return v
        raise InputError(f"no reading vector at layer {layer}; fitted layers: {self.layers}")

    # ---- fitting ----------------------------------------------------------
    @classmethod
    def from_states(
        cls, target: States, opposite: States, *, method: Method = "pca", scales: Mapping[str, float] | None = None,
        model_id: str = "", task_id: str = "custom", point: str = "hook_resid_post", token: str = "last",
    ) -> ReadingVector:
        """Fit from hidden states ``[n_pairs, d_model]`` per hook (row i of each side is pair i)."""
        if set(target) != set(opposite):
            raise InputError("target and opposite states must cover the same hooks")
        directions, explained = {}, {}
        for n in target:
            if target[n].shape != opposite[n].shape:
                raise InputError(f"at {n}: {tuple(target[n].shape)} target vs {tuple(opposite[n].shape)} opposite states")
            directions[n], explained[n] = reading_direction(target[n] - opposite[n], method)
        if scales is None:
            scales = {n: float(torch.cat([target[n], opposite[n]]).float().norm(dim=-1).mean()) for n in target}
        rv = cls(directions, dict(scales), model_id, task_id, method, point, token, explained, n_pairs=len(next(iter(target.values()))))
        rv.fit_accuracy = rv.accuracy_from_states(target, opposite)
        return rv

    @classmethod
    def fit(
        cls,
        model: HookedChatModel,
        task: Task | str,
        *,
        pairs: Sequence[ContrastPair] | None = None,
        layers: Sequence[int] | None = None,
        point: str = "hook_resid_post",
        method: Method = "pca",
        token: Token = "last",
        batch_size: int = 8,
        progress: bool = False,
    ) -> ReadingVector:
        """Fit on ``pairs`` (default: all of the task's contrast pairs; hold some out with :func:`split_pairs`)."""
        task = get_task(task)
        pairs = list(task.contrast_pairs if pairs is None else pairs)
        names = model.hook_names(layers, point)
        target, opposite, scales = pair_states(model, pairs, names, token=token, batch_size=batch_size, progress=progress)
        return cls.from_states(target, opposite, method=method, scales=scales, model_id=model.model_id,
                               task_id=task.id, point=point, token=token)

    # ---- evaluation ---------------------------------------------------------
    def accuracy_from_states(self, target: States, opposite: States) -> dict[int, float]:
        """Per layer, the fraction of pairs whose target side projects higher than its opposite side."""
        out = {}
        for n, d in self.directions.items():
            if n not in target:
                raise InputError(f"no states at {n}")
            gap = (target[n].float() - opposite[n].float()) @ d.float()
            out[layer_of(n)] = float((gap > 0).float().mean())
        return out

    def accuracy(self, model: HookedChatModel, pairs: Sequence[ContrastPair], batch_size: int = 8) -> dict[int, float]:
        """Held-out accuracy per layer on ``pairs`` (read at the same point and token as the fit)."""
        self.check_model(model)
        target, opposite, _ = pair_states(model, pairs, self.hook_names, token=self.token, batch_size=batch_size)  # type: ignore[arg-type]
        return self.accuracy_from_states(target, opposite)

    # ---- use as a steering vector ------------------------------------------------
    def as_control(
        self, model: HookedChatModel, prompt_len: int, coefficient: float, layers: Sequence[int] | None = None
    ) -> Control:
        """A control adding ``coefficient * scale_l * direction_l`` at every prompt position of ``layers``."""
        self.check_model(model)
        if prompt_len < 1:
            raise InputError("prompt_len must be >= 1")
        chosen = self.layers if layers is None else list(layers)
        deltas = {}
        for layer in chosen:
            name = model.hook_name(layer, self.point)
            if name not in self.directions:
                raise InputError(f"no reading vector at layer {layer}; fitted layers: {self.layers}")
            vec = float(coefficient) * self.scales[name] * self.directions[name].float()
            deltas[name] = vec.to(device=model.device, dtype=model.dtype).expand(prompt_len, -1).clone()
        return Control(deltas, model.model_id, {"source": "repe", "task": self.task_id, "coefficient": float(coefficient)})

    def check_model(self, model: HookedChatModel) -> None:
        if model.model_id != self.model_id:
            raise IncompatibleArtifactError(f"this reading vector was fitted on {self.model_id!r}, not {model.model_id!r}")

    # ---- persistence ------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        d_model = int(next(iter(self.directions.values())).shape[-1])
        return save_artifact(folder, KIND, {n: v.float() for n, v in self.directions.items()}, {
            "model_id": self.model_id, "d_model": d_model, "task_id": self.task_id, "method": self.method,
            "point": self.point, "token": self.token, "hook_names": self.hook_names, "scales": self.scales,
            "explained": self.explained, "fit_accuracy": {str(k): v for k, v in self.fit_accuracy.items()},
            "n_pairs": self.n_pairs,
        })

    @classmethod
    def load(cls, folder: str | Path, model: HookedChatModel | None = None) -> ReadingVector:
        tensors, config = load_artifact(folder, KIND, model=model, required=("hook_names", "scales"),
                                        tensor_names=lambda c: c["hook_names"])
        return cls(
            directions={n: tensors[n] for n in config["hook_names"]}, scales=config["scales"], model_id=config["model_id"],
            task_id=config.get("task_id", "custom"), method=config.get("method", "pca"),
            point=config.get("point", "hook_resid_post"), token=config.get("token", "last"),
            explained=config.get("explained", {}), fit_accuracy={int(k): v for k, v in config.get("fit_accuracy", {}).items()},
            n_pairs=config.get("n_pairs", 0),
        )


# ------------------------------------------------------------------ cosine with suffix gradients
@dataclass
class RepeCosine:
    """Cosine between reading vectors (rows) and suffix-gradient steering directions (columns), per layer."""

    model_id: str
    layers: list[int]
    reading_tasks: list[str]
    gradient_tasks: list[str]
    matrix: np.ndarray  # [layer, reading task, gradient task]: reading vector vs the task's mean direction
    per_prompt: dict[str, np.ndarray]  # task -> [layer, prompt]: its reading vector vs each prompt's direction
    accuracy: dict[str, dict[int, float]] = field(default_factory=dict)  # held-out reading accuracy
    d_model: int = 0

    def same_task(self) -> dict[str, np.ndarray]:
        """Per task present on both sides, its cosine per layer."""
        return {t: self.matrix[:, i, self.gradient_tasks.index(t)]
                for i, t in enumerate(self.reading_tasks) if t in self.gradient_tasks}

    def cross_task(self) -> np.ndarray:
        """Per layer, the mean cosine between a task's reading vector and *other* tasks' directions."""
        mask = np.array([[r != g for g in self.gradient_tasks] for r in self.reading_tasks])
        return np.array([np.nanmean(m[mask]) if mask.any() and np.isfinite(m[mask]).any() else np.nan for m in self.matrix])

    def layer_band(self, band: Sequence[int] | None = None) -> np.ndarray:
        """Task × task matrix averaged over ``band`` layers (default: the middle third)."""
        band = list(band) if band is not None else self.layers[len(self.layers) // 3: 2 * len(self.layers) // 3 + 1]
        idx = [self.layers.index(layer) for layer in band if layer in self.layers]
        if not idx:
            raise InputError(f"none of layers {band} is available; layers: {self.layers}")
        return np.nanmean(self.matrix[idx], axis=0)

    def to_dict(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "layers": self.layers, "reading_tasks": self.reading_tasks,
                "gradient_tasks": self.gradient_tasks, "matrix": self.matrix.tolist(),
                "same_task": {t: v.tolist() for t, v in self.same_task().items()},
                "cross_task": self.cross_task().tolist(),
                "per_prompt": {t: v.tolist() for t, v in self.per_prompt.items()},
                "accuracy": {t: {str(k): v for k, v in a.items()} for t, a in self.accuracy.items()},
                "chance_band": self.chance()}

    def chance(self) -> float:
        """Two standard deviations of the cosine between random directions in ``d_model`` dimensions."""
        return float(2 / np.sqrt(self.d_model)) if self.d_model else float("nan")

    def plot(self, band: Sequence[int] | None = None) -> Figure:
        """Same-task cosine per layer with chance band; task × task matrix over a band of layers; held-out accuracy."""
        from .directions import plot_cosine_matrix

        panels = 3 if self.accuracy else 2
        fig, axes = plotting.figure(1, panels, width=4.6, height=3.8)
        fig.get_layout_engine().set(wspace=0.12)
        ax = axes[0, 0]
        colors = plotting.task_colors(self.reading_tasks + self.gradient_tasks)
        for t, values in self.same_task().items():
            ax.plot(self.layers, values, marker="o", ms=2.5, color=colors[t], label=t)
            if t in self.per_prompt and self.per_prompt[t].shape[1] > 1:
                spread = self.per_prompt[t]
                ax.fill_between(self.layers, np.nanmin(spread, 1), np.nanmax(spread, 1), color=colors[t], alpha=0.12)
        ax.plot(self.layers, self.cross_task(), color="black", ls="--", lw=1, label="other tasks (mean)")
        c = self.chance()
        if np.isfinite(c):
            ax.axhspan(-c, c, color="gray", alpha=0.2, label="random ±2σ")
        ax.axhline(0, color="black", lw=0.5)
        plotting.layer_axis(ax, self.layers)
        ax.set_ylabel("cos(reading vector, steering direction)")
        ax.set_title("same task per layer (band: prompts' min-max)", fontsize=9)
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=3)
        band_layers = list(band) if band is not None else self.layers[len(self.layers) // 3: 2 * len(self.layers) // 3 + 1]
        plot_cosine_matrix(self.layer_band(band_layers), self.reading_tasks, self.gradient_tasks, ax=axes[0, 1],
                           title=f"cosine, mean over layers {band_layers[0]}-{band_layers[-1]}", label="cosine")
        axes[0, 1].set_ylabel("reading vector of")
        axes[0, 1].set_xlabel("suffix-gradient direction of")
        if self.accuracy:
            ax = axes[0, 2]
            for t, acc in self.accuracy.items():
                ax.plot(list(acc), list(acc.values()), marker="o", ms=2.5, color=colors[t], label=t)
            ax.axhline(0.5, color="gray", ls=":", lw=1, label="chance")
            ax.set_ylim(-0.02, 1.02)
            plotting.layer_axis(ax, self.layers)
            ax.set_ylabel("held-out pair accuracy")
            ax.set_title("reading vector accuracy (held-out pairs)", fontsize=9)
            ax.legend(fontsize=6.5, loc="lower right")
        fig.suptitle(f"RepE reading vectors vs suffix-gradient directions — {plotting.model_label(self.model_id)}",
                     fontsize=10)
        return fig


def gradient_cosines(
    reading: Mapping[str, ReadingVector] | Sequence[ReadingVector],
    directions: GradientDirections,
    accuracy: Mapping[str, Mapping[int, float]] | None = None,
) -> RepeCosine:
    """Cosine per layer between each reading vector and each task's (mean) suffix-gradient direction."""
    vectors = dict(reading) if isinstance(reading, Mapping) else {r.task_id: r for r in reading}
    if not vectors:
        raise InputError("no reading vectors")
    # layers where every gradient direction is zero (the last block's, at prompt positions) say nothing
    layers = [layer for layer in directions.layers if all(layer in rv.layers for rv in vectors.values())
              and bool(directions.at_layer(layer).norm(dim=-1).gt(0).any())]
    if not layers:
        raise InputError("reading vectors and non-zero gradient directions share no layer")
    by_task = directions.by_task()
    grad_tasks = list(by_task)
    matrix = np.zeros((len(layers), len(vectors), len(grad_tasks)))
    per_prompt = {}
    for li, layer in enumerate(layers):
        gi = directions.layer_index(layer)
        rv_mat = torch.stack([rv.direction(layer).float() for rv in vectors.values()])
        matrix[li] = cosine_matrix(rv_mat, torch.stack([by_task[t][gi] for t in grad_tasks])).numpy()
    for t, rv in vectors.items():
        idx = [i for i, s in enumerate(directions.tasks) if s == t]
        if idx:
            per_prompt[t] = np.stack([
                cosine_matrix(rv.direction(layer).float()[None], directions.vectors[idx, directions.layer_index(layer)])[0].numpy()
                for layer in layers
            ])
    d_model = int(directions.vectors.shape[-1])
    return RepeCosine(directions.model_id, layers, list(vectors), grad_tasks, matrix, per_prompt,
                      {k: dict(v) for k, v in (accuracy or {}).items()}, d_model)
