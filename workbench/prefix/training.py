"""Training a prefix controller on synthesised SelfControl data.

:func:`train_prefix`: MSE between the hidden states of the *uncontrolled*
model with the prefix (at the prompt positions, which follow it) and the
stored controlled hidden states from :mod:`workbench.prefix.synthesis`.
Measured on SmolLM2-135M: the first prompt token's massive activation makes up
>95% of that MSE, so a ``relative`` loss (each position's error over its norm)
is offered too, and both errors are reported. Records are filtered first
(score improved, hidden-state shift small), with the reasons counted.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import InputError, NumericalError
from ..selfcontrol.suffix import right_pad
from .controller import PrefixController
from .synthesis import MANIFEST, STATE_POINT, Record, load_records, read_manifest

if TYPE_CHECKING:
    from ..model.chat_model import HookedChatModel


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
    prompts, mask, _ = right_pad([r.prompt_ids for r in records], model.pad_token_id, model.device)
    cache: dict[str, Tensor] = {}

    def make(name: str):
        def keep(x: Tensor, hook: Any) -> Tensor:
            cache[name] = x
            return x

        return keep

    # the controller becomes the model's applied prefix (its live parameters, so gradients reach them)
    with controller.applied(model) if controller is not None else contextlib.nullcontext():
        ids, mask, layout = model.rows_layout(prompts, mask)
        with model.declared(layout), model.bridge.hooks(fwd_hooks=[(h, make(h)) for h in hook_names]):
            model.bridge(ids, attention_mask=mask)
    states = torch.stack([cache[h][:, n:].to(model.device) for h in hook_names], dim=1)  # layers may sit on several devices
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

