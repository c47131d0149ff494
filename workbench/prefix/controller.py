"""Prefix Controller: SelfControl compressed into a few trained virtual tokens.

Why: a search costs several generations per prompt; a prefix trained to
reproduce the controlled hidden states costs nothing at inference but a few
extra positions in the prefill. It enters through the model's own hooks:
``applied(model)`` puts placeholder ids at positions ``[0, n)`` of every
generated row (``model.prefix_ids``) and the embedding hook swaps their
embeddings for the trained ones; optional per-layer residual vectors are added
at those positions. Decode steps run with the KV cache as usual: the prefix is
already in the cache, so generation speed is unchanged.

Training (:func:`train_prefix`): MSE between the hidden states of the
*uncontrolled* model with the prefix (at the prompt positions, which follow
it) and the stored controlled hidden states from :mod:`workbench.synthesis`.
Measured on SmolLM2-135M: the first prompt token's massive activation makes up
>95% of that MSE, so a ``relative`` loss (each position's error over its norm)
is offered too, and both errors are reported.
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import InputError, NumericalError
from ..selfcontrol.suffix import right_pad
from ..store import load_artifact, save_artifact
from .synthesis import MANIFEST, STATE_POINT, Record, load_records, read_manifest

if TYPE_CHECKING:
    from ..model.chat_model import HookedChatModel

KIND = "prefix_controller"
IDS_HOOK = "embed.hook_in"
EMBED_HOOKS = ("hook_embed", "embed.hook_out")


def embed_hooks(model: HookedChatModel) -> tuple[str, str]:
    """(hook seeing the input ids, hook on the token embeddings) on this bridge."""
    names = model.bridge.hook_dict
    embed = next((n for n in EMBED_HOOKS if n in names), None)
    if IDS_HOOK not in names or embed is None:
        raise InputError(f"{model.model_id}: the bridge has no {IDS_HOOK!r}/{EMBED_HOOKS} hooks for a prefix controller")
    return IDS_HOOK, embed


@dataclass
class PrefixController:
    """``embeddings``: ``[n_tokens, d_model]``; ``residuals[hook]``: ``[n_tokens, d_model]`` added at that hook."""

    embeddings: Float[Tensor, "n_tokens d_model"]
    model_id: str
    placeholder_id: int
    residuals: dict[str, Float[Tensor, "n_tokens d_model"]] = field(default_factory=dict)
    layers: list[int] | None = None  # layers the training loss looked at (None: all)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] < 1:
            raise InputError(f"prefix embeddings must be [n_tokens >= 1, d_model], got {tuple(self.embeddings.shape)}")
        for name, r in self.residuals.items():
            if r.shape != self.embeddings.shape:
                raise InputError(f"residual at {name} has shape {tuple(r.shape)}, the prefix {tuple(self.embeddings.shape)}")

    # ---- construction -------------------------------------------------------------
    @classmethod
    def init(
        cls,
        model: HookedChatModel,
        n_tokens: int = 2,
        *,
        residual_layers: Sequence[int] | None = (),
        init_text: str | None = None,
        layers: Sequence[int] | None = None,
    ) -> PrefixController:
        """A fresh controller. Embeddings start as the chat template's first token (default) or ``init_text``'s tokens.

        The default matters on SmolLM2: its first token (``<|im_start|>``) carries a massive
        activation (norm ~25k vs ~200 elsewhere); a prefix of ``\\n`` tokens erased it at the
        prompt's first position (MSE to the clean states ~14000), one of ``<|im_start|>`` kept it (~1).
        ``residual_layers=None`` puts trainable residual vectors at every layer.
        """
        if n_tokens < 1:
            raise InputError("a prefix needs at least one virtual token")
        embed = model.decoder.get_input_embeddings().weight
        ids = model.encode(init_text) if init_text else model.chat_ids("x")[:1]
        if not ids:
            raise InputError("init_text has no tokens")
        ids = [ids[i % len(ids)] for i in range(n_tokens)]
        emb = embed[torch.as_tensor(ids, device=embed.device)].detach().float().clone()
        names = model.hook_names(residual_layers) if residual_layers is None or len(residual_layers) else []
        residuals = {n: torch.zeros_like(emb) for n in names}
        if layers is not None:
            model.hook_names(layers)  # validates the range
        return cls(emb, model.model_id, model.pad_token_id, residuals, list(layers) if layers is not None else None)

    # ---- properties ---------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.embeddings.shape[1])

    def parameters(self) -> list[Tensor]:
        return [self.embeddings, *self.residuals.values()]

    def state(self) -> dict[str, Tensor]:
        return {"embeddings": self.embeddings, **{f"residual.{n}": r for n, r in self.residuals.items()}}

    def clone(self) -> PrefixController:
        return PrefixController(self.embeddings.detach().clone(), self.model_id, self.placeholder_id,
                                {n: r.detach().clone() for n, r in self.residuals.items()},
                                None if self.layers is None else list(self.layers), copy.deepcopy(self.meta))

    # ---- application --------------------------------------------------------------
    def hooks(self, model: HookedChatModel) -> list[tuple[str, Any]]:
        """Hooks that act only on forwards whose first ``n`` ids are the placeholder and that cover more than them.

        So a one-token cached decode step, or a forward without the prefix
        (e.g. the clean judge), is left alone.
        """
        n = self.n_tokens
        ids_hook, embed_hook = embed_hooks(model)
        active = {"on": False}

        def check(ids: Tensor, hook: Any) -> Tensor:
            active["on"] = ids.shape[1] > n and bool((ids[:, :n] == self.placeholder_id).all())
            return ids

        def replace(x: Tensor, hook: Any) -> Tensor:
            if not active["on"]:
                return x
            head = self.embeddings.to(device=x.device, dtype=x.dtype).expand(x.shape[0], n, x.shape[-1])
            return torch.cat([head, x[:, n:]], dim=1)

        def make(r: Tensor):
            def add(x: Tensor, hook: Any) -> Tensor:
                if not active["on"]:
                    return x
                return torch.cat([x[:, :n] + r.to(device=x.device, dtype=x.dtype), x[:, n:]], dim=1)

            return add

        return [(ids_hook, check), (embed_hook, replace)] + [(name, make(r)) for name, r in self.residuals.items()]

    @contextlib.contextmanager
    def applied(self, model: HookedChatModel) -> Iterator[HookedChatModel]:
        """``with controller.applied(model): model.generate(prompts)`` — prompts without the prefix; it is added."""
        self.check_model(model)
        if model.prefix_ids:
            raise InputError("a prefix is already applied to this model; compose controllers instead of nesting them")
        model.prefix_ids = [self.placeholder_id] * self.n_tokens
        try:
            with model.bridge.hooks(fwd_hooks=self.hooks(model)):
                yield model
        finally:
            model.prefix_ids = []

    def check_model(self, model: HookedChatModel) -> None:
        if self.model_id != model.model_id:
            raise InputError(f"this prefix controller was trained for {self.model_id!r}, not {model.model_id!r}")
        if self.d_model != model.d_model:
            raise InputError(f"this prefix controller has d_model {self.d_model}, the model {model.d_model}")
        unknown = [n for n in self.residuals if n not in model.bridge.hook_dict]
        if unknown:
            raise InputError(f"hooks {unknown[:3]} do not exist on {model.model_id}")

    # ---- composition ----------------------------------------------------------------
    @classmethod
    def compose(cls, controllers: Sequence[PrefixController], weights: Sequence[float] | None = None) -> PrefixController:
        """Weighted average of parameters, ``sum(w_i p_i) / sum(w_i)``; weights ``(1, 0)`` give the first exactly."""
        controllers = list(controllers)
        if not controllers:
            raise InputError("compose needs at least one controller")
        weights = [1.0] * len(controllers) if weights is None else [float(w) for w in weights]
        if len(weights) != len(controllers):
            raise InputError(f"{len(weights)} weights for {len(controllers)} controllers")
        total = sum(weights)
        if total == 0:
            raise InputError("composition weights sum to zero")
        first = controllers[0]
        for c in controllers[1:]:
            if c.model_id != first.model_id:
                raise InputError(f"controllers for different models: {first.model_id!r} vs {c.model_id!r}")
            if c.embeddings.shape != first.embeddings.shape:
                raise InputError(f"controllers of different sizes: {tuple(first.embeddings.shape)} vs {tuple(c.embeddings.shape)}")
            if set(c.residuals) != set(first.residuals):
                raise InputError("controllers with residual vectors at different layers cannot be averaged")
            if c.placeholder_id != first.placeholder_id:
                raise InputError("controllers with different placeholder ids cannot be averaged")

        def mix(tensors: list[Tensor]) -> Tensor:
            out = weights[0] * tensors[0].detach()
            for w, t in zip(weights[1:], tensors[1:], strict=True):
                out = out + w * t.detach().to(out.device)
            return out / total

        return cls(
            mix([c.embeddings for c in controllers]), first.model_id, first.placeholder_id,
            {n: mix([c.residuals[n] for c in controllers]) for n in first.residuals},
            first.layers,
            {"composed_from": [c.meta.get("training", {}).get("task") for c in controllers], "weights": weights},
        )

    # ---- persistence ------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        return save_artifact(folder, KIND, {k: v.detach().float() for k, v in self.state().items()}, {
            "model_id": self.model_id, "d_model": self.d_model, "n_tokens": self.n_tokens,
            "placeholder_id": self.placeholder_id, "residual_hooks": list(self.residuals),
            "layers": self.layers, "training": self.meta.get("training", {}),
            "meta": {k: v for k, v in self.meta.items() if k != "training"},
        })

    @classmethod
    def load(cls, folder: str | Path, model: HookedChatModel | None = None) -> PrefixController:
        """Load a saved controller; with ``model``, refuse one made for another model."""
        tensors, config = load_artifact(folder, KIND, model=model)
        device = model.device if model is not None else "cpu"
        meta = dict(config.get("meta") or {})
        meta["training"] = config.get("training", {})
        return cls(tensors["embeddings"].to(device), config["model_id"], int(config["placeholder_id"]),
                   {n: tensors[f"residual.{n}"].to(device) for n in config["residual_hooks"]},
                   config.get("layers"), meta)


# ---- training -----------------------------------------------------------------------------
Loss = Literal["mse", "relative"]


@dataclass
class TrainingReport:
    """What training saw and reached, on the held-out prompts at the chosen layers.

    ``mse``: per-element mean squared error (the paper's objective).
    ``relative``: mean over (layer, position) of ``|h - t|^2 / |t|^2``: on SmolLM2 the
    first token's massive activation (norm ~25k) makes up >95% of the plain MSE,
    so this one says how well the other positions are matched.
    """

    data_dir: str
    task: str
    loss: str
    n_records: int
    n_kept: int
    filtered: dict[str, int]
    n_train: int
    n_val: int
    layers: list[int]
    epochs: list[dict[str, float]]
    best_epoch: int
    best_val_mse: float
    baseline_val_mse: float  # stored controlled states vs the clean model without prefix
    init_val_mse: float  # the untrained prefix
    best_val_relative: float
    baseline_val_relative: float
    init_val_relative: float
    seconds: float
    settings: dict[str, Any]
    val_keys: list[str] = field(default_factory=list)

    @property
    def improvement(self) -> float:
        """Fraction of the no-prefix MSE removed by the prefix (1 = perfect, 0 = none, < 0 worse)."""
        return 1.0 - self.best_val_mse / self.baseline_val_mse if self.baseline_val_mse > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "improvement": self.improvement}

    def summary(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in self.filtered.items()) or "none"
        return (f"{self.n_kept}/{self.n_records} records kept (filtered: {reasons}); {self.n_train} train, {self.n_val} held out; "
                f"loss {self.loss}, best epoch {self.best_epoch}, {self.seconds:.1f} s\n"
                f"held-out MSE:          no prefix {self.baseline_val_mse:.4g}, untrained prefix {self.init_val_mse:.4g}, "
                f"trained {self.best_val_mse:.4g}\n"
                f"held-out relative err: no prefix {self.baseline_val_relative:.4g}, untrained prefix "
                f"{self.init_val_relative:.4g}, trained {self.best_val_relative:.4g}")


def filter_records(
    records: Sequence[Record], *, require_gain: bool = True, max_shift_fraction: float | None = 0.5
) -> tuple[list[Record], dict[str, int]]:
    """Keep records whose score improved and whose hidden states moved less than a fraction of their norm."""
    kept, reasons = [], Counter()
    for r in records:
        if require_gain and not r.gain > 0:
            reasons["score not improved"] += 1
        elif max_shift_fraction is not None and r.max_shift_fraction > max_shift_fraction:
            reasons[f"shift > {max_shift_fraction:g} of norm"] += 1
        else:
            kept.append(r)
    return kept, dict(reasons)


def _batch_states(
    model: HookedChatModel,
    controller: PrefixController | None,
    records: Sequence[Record],
    hook_names: list[str],
) -> tuple[Float[Tensor, "batch layer pos d_model"], Tensor]:
    """Hidden states at the prompt positions (after the prefix, if any), right-padded, and the valid-position mask."""
    n = controller.n_tokens if controller is not None else 0
    head = [controller.placeholder_id] * n if controller is not None else []
    ids, mask, _ = right_pad([head + r.prompt_ids for r in records], model.pad_token_id, model.device)
    cache: dict[str, Tensor] = {}

    def make(name: str):
        def keep(x: Tensor, hook: Any) -> Tensor:
            cache[name] = x
            return x

        return keep

    hooks = (controller.hooks(model) if controller is not None else []) + [(h, make(h)) for h in hook_names]
    with model.bridge.hooks(fwd_hooks=hooks):
        model.bridge(ids, attention_mask=mask)
    states = torch.stack([cache[h][:, n:] for h in hook_names], dim=1)
    valid = mask[:, n:].bool()
    return states, valid


def _targets(records: Sequence[Record], rows: list[int], width: int, device: torch.device) -> Tensor:
    out = torch.zeros(len(records), len(rows), width, records[0].hidden.shape[-1], device=device)
    for i, r in enumerate(records):
        out[i, :, : r.hidden.shape[1]] = r.hidden[rows]  # on the device already when loaded with the model
    return out


def _errors(states: Tensor, targets: Tensor, valid: Tensor) -> dict[str, Tensor | int]:
    """Sums of squared and relative squared errors over valid positions, with their counts."""
    err = ((states.float() - targets) ** 2).sum(-1)  # batch layer pos
    norm = (targets**2).sum(-1).clamp_min(1e-12)
    mask = valid[:, None, :].to(err.dtype)
    n_vec = int(valid.sum()) * states.shape[1]
    return {"sse": (err * mask).sum(), "rel": (err / norm * mask).sum(), "n_elem": n_vec * states.shape[-1], "n_vec": n_vec}


@torch.no_grad()
def evaluate_errors(
    model: HookedChatModel,
    controller: PrefixController | None,
    records: Sequence[Record],
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """``{"mse", "relative"}`` between the model's states (with ``controller``, or clean if None) and the stored ones."""
    if not records:
        return {"mse": float("nan"), "relative": float("nan")}
    hook_names = model.hook_names(layers, STATE_POINT)
    rows = [records[0].state_hooks.index(h) for h in hook_names]
    sse = rel = 0.0
    n_elem = n_vec = 0
    for start in range(0, len(records), batch_size):
        chunk = list(records[start:start + batch_size])
        states, valid = _batch_states(model, controller, chunk, hook_names)
        e = _errors(states, _targets(chunk, rows, states.shape[2], model.device), valid)
        sse, rel = sse + float(e["sse"]), rel + float(e["rel"])
        n_elem, n_vec = n_elem + e["n_elem"], n_vec + e["n_vec"]
    return {"mse": sse / n_elem, "relative": rel / n_vec}


def train_prefix(
    model: HookedChatModel,
    data_dir: str | Path,
    *,
    n_tokens: int = 2,
    layers: Sequence[int] | None = None,
    residual_layers: Sequence[int] | None = (),
    epochs: int = 20,
    lr: float = 3e-3,
    batch_size: int = 8,
    weight_decay: float = 0.0,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_shift_fraction: float | None = 0.5,
    require_gain: bool = True,
    init_text: str | None = None,
    loss: Loss = "mse",
    warmup: float = 0.2,
    records: Sequence[Record] | None = None,
    progress: bool = True,
) -> tuple[PrefixController, TrainingReport]:
    """Train a prefix on synthesised data; keep the epoch with the lowest held-out loss.

    ``layers``: where the loss looks (default all); ``residual_layers``: where
    trainable residual vectors sit at the prefix positions (``()`` none, ``None`` all).
    ``loss``: ``"mse"`` (the paper's) or ``"relative"`` (each position's error over its norm, see
    :class:`TrainingReport`); the kept epoch is the one with the lowest held-out value of it.
    ``warmup``: fraction of the steps over which the learning rate rises linearly to ``lr``.
    ``records`` skips reading ``data_dir`` again (already loaded records).
    """
    start_time = time.perf_counter()
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise InputError("epochs and batch_size must be >= 1 and lr > 0")
    if not 0 <= warmup <= 1:
        raise InputError("warmup must be a fraction in [0, 1]")
    if not 0 <= val_fraction < 1:
        raise InputError("val_fraction must be in [0, 1)")
    if loss not in ("mse", "relative"):
        raise InputError(f"loss must be 'mse' or 'relative', not {loss!r}")
    if records is None:
        manifest, loaded = load_records(data_dir, model)
    else:
        loaded = list(records)
        manifest = read_manifest(data_dir) if (Path(data_dir) / MANIFEST).exists() else {}
    if not loaded:
        raise InputError(f"{data_dir} holds no finished records yet")
    kept, reasons = filter_records(loaded, require_gain=require_gain, max_shift_fraction=max_shift_fraction)
    if not kept:
        raise InputError(f"no record passes the filters ({reasons}); synthesise more prompts or relax "
                         "--max-shift-fraction / --keep-no-gain")
    order = list(range(len(kept)))
    random.Random(seed).shuffle(order)
    n_val = 0 if val_fraction == 0 or len(kept) < 2 else max(1, round(val_fraction * len(kept)))
    val = [kept[i] for i in order[:n_val]]
    train = [kept[i] for i in order[n_val:]]
    layer_list = list(range(model.n_layers)) if layers is None else sorted({int(x) for x in layers})
    hook_names = model.hook_names(layer_list, STATE_POINT)
    rows = [kept[0].state_hooks.index(h) for h in hook_names]

    controller = PrefixController.init(model, n_tokens, residual_layers=residual_layers, init_text=init_text,
                                       layers=None if layers is None else layer_list)
    params = controller.parameters()
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-len(train) // batch_size)
    # Linear warm-up: Adam's first steps move every coordinate by ~lr, which on SmolLM2 knocks
    # the attention-sink activation out and sends the MSE up a hundredfold before it recovers.
    warm = max(1, round(warmup * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warm))
    eval_set = val or train

    def held_out(c: PrefixController | None) -> dict[str, float]:
        return evaluate_errors(model, c, eval_set, layer_list, batch_size)

    baseline = held_out(None)
    best = init = held_out(controller)
    best_state, best_epoch = controller.clone(), 0
    history: list[dict[str, float]] = [{"epoch": 0, "train_loss": float("nan"), "val_mse": init["mse"],
                                        "val_relative": init["relative"]}]
    rng = random.Random(seed + 1)
    bar = tqdm(range(1, epochs + 1), desc=f"train prefix [{n_tokens} tokens]", disable=not progress, unit="epoch")
    for epoch in bar:
        rng.shuffle(train)
        total, count = 0.0, 0
        for b in range(0, len(train), batch_size):
            chunk = train[b:b + batch_size]
            optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                states, valid = _batch_states(model, controller, chunk, hook_names)
                e = _errors(states, _targets(chunk, rows, states.shape[2], model.device), valid)
                value, n = (e["sse"], e["n_elem"]) if loss == "mse" else (e["rel"], e["n_vec"])
                (value / n).backward()
            if not all(p.grad is None or torch.isfinite(p.grad).all() for p in params):
                raise NumericalError("the prefix gradient is NaN/inf; lower the learning rate")
            optimizer.step()
            schedule.step()
            total, count = total + float(value.detach()), count + n
        current = held_out(controller)
        history.append({"epoch": epoch, "train_loss": total / count, "val_mse": current["mse"],
                        "val_relative": current["relative"]})
        if current[loss] < best[loss]:
            best, best_state, best_epoch = current, controller.clone(), epoch
        bar.set_postfix(train=f"{total / count:.4g}", held_out=f"{current[loss]:.4g}", no_prefix=f"{baseline[loss]:.4g}")
    bar.close()
    settings = {"loss": loss, "n_tokens": n_tokens, "layers": layers if layers is None else layer_list,
                "residual_layers": None if residual_layers is None else list(residual_layers), "epochs": epochs,
                "lr": lr, "warmup": warmup, "batch_size": batch_size, "weight_decay": weight_decay, "val_fraction": val_fraction,
                "seed": seed, "max_shift_fraction": max_shift_fraction, "require_gain": require_gain,
                "init_text": init_text}
    report = TrainingReport(
        data_dir=str(data_dir), task=manifest.get("task", {}).get("id", "?"), n_records=len(loaded), n_kept=len(kept),
        filtered=reasons, n_train=len(train), n_val=len(val), layers=layer_list, epochs=history, best_epoch=best_epoch,
        loss=loss, best_val_mse=best["mse"], baseline_val_mse=baseline["mse"], init_val_mse=init["mse"],
        best_val_relative=best["relative"], baseline_val_relative=baseline["relative"],
        init_val_relative=init["relative"],
        seconds=time.perf_counter() - start_time, settings=settings, val_keys=[r.key for r in val],
    )
    # one source for what training reached; the per-epoch history and held-out keys stay in the report only
    best_state.meta["training"] = {
        **{k: v for k, v in report.to_dict().items() if k not in ("epochs", "val_keys")},
        "synthesis_config": manifest.get("config"), "question": manifest.get("task", {}).get("question"),
    }
    return best_state, report

