"""DPO on preference pairs with TRL's ``DPOTrainer``; the result is a plain model folder.

Why a plain folder: ``load_model(out)`` then loads the trained model like any local model
(config, safetensors weights, tokenizer files with the chat template, generation config), so
every workbench tool (evaluation, SelfControl itself) runs on it unchanged, and so does any
other stack. Training runs on a fresh plain transformers model
(:func:`~workbench.model.loading.load_hf_model`): the hooked model's bridge rewires its HF model
in place, and ``tiny-random`` exists only in memory. The reference model is the base, always:
an explicit copy for full fine-tuning, the adapter-free base for LoRA, whose adapter is merged
into the saved weights. ``dpo.json`` next to the weights records the settings, the per-step
loss and reward margin, and the margin on the training pairs after training.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from .pairs import COLUMNS, pairs_path, read_pairs

REPORT_FILE = "dpo.json"
FORMAT = 1


@dataclass
class DPOSettings:
    """Every knob of a DPO run (recorded in ``dpo.json``)."""

    epochs: float = 3.0
    lr: float = 5e-6
    beta: float = 0.1
    lora_rank: int | None = None  # None: full fine-tuning; else LoRA of this rank on every linear layer
    lora_alpha: float | None = None  # default: 2 * rank
    batch_size: int = 4
    max_length: int | None = 1024
    seed: int = 0

    def check(self) -> None:
        if self.epochs <= 0 or self.lr <= 0 or self.beta <= 0 or self.batch_size < 1:
            raise InputError("epochs, lr and beta must be positive and batch_size at least 1")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise InputError("lora rank must be at least 1 (leave it out for full fine-tuning)")


@dataclass
class DPOReport:
    """What a DPO run did: per logged step TRL's loss and reward statistics, and the end state."""

    out_dir: Path
    base_model: str
    data: str
    n_pairs: int
    settings: DPOSettings
    steps: list[dict[str, float]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)  # on the training pairs, after training
    seconds: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def losses(self) -> list[float]:
        return [s["loss"] for s in self.steps]

    @property
    def margins(self) -> list[float]:
        return [s["reward_margin"] for s in self.steps]

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "out_dir": str(self.out_dir), "base_model": self.base_model, "data": self.data,
                "n_pairs": self.n_pairs, "settings": asdict(self.settings), "steps": self.steps, "final": self.final,
                "seconds": round(self.seconds, 2), "versions": self.versions}

    def summary(self) -> str:
        first, last = self.steps[0], self.steps[-1]
        return (f"DPO on {self.n_pairs} pairs, {len(self.steps)} steps: loss {first['loss']:.4f} -> {last['loss']:.4f}; "
                f"reward margin on the training pairs after training {self.final.get('reward_margin', float('nan')):+.4f} "
                f"(accuracy {self.final.get('reward_accuracy', float('nan')):.0%}); saved to {self.out_dir}")


# TRL's log keys -> ours
_STEP_KEYS = {"loss": "loss", "rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy",
              "rewards/chosen": "chosen_reward", "rewards/rejected": "rejected_reward", "learning_rate": "lr",
              "grad_norm": "grad_norm", "epoch": "epoch"}


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"python": platform.python_version(), **{p: version(p) for p in ("torch", "transformers", "trl", "peft")}}


def train_dpo(
    data: str | Path,
    out: str | Path,
    *,
    model: str | None = None,
    settings: DPOSettings | None = None,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> DPOReport:
    """Train ``model`` (a name as for ``load_model``; default the embedded model) by DPO on ``data``, save to ``out``.

    ``data``: a folder holding ``pairs.jsonl`` or a ``.jsonl`` file (see :mod:`workbench.preference.pairs`).
    ``overrides`` set :class:`DPOSettings` fields. Trains in float32 on ``device`` (default: CUDA when
    present). The folder appears only when training finished: an interrupted run leaves nothing half-written.
    """
    unknown = set(overrides) - set(DPOSettings.__dataclass_fields__)
    if unknown:
        raise InputError(f"unknown DPO settings {sorted(unknown)}; use {sorted(DPOSettings.__dataclass_fields__)}")
    settings = DPOSettings(**{**asdict(settings or DPOSettings()), **overrides})
    settings.check()
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out} exists and is not empty: choose another output folder or pass overwrite=True (--overwrite)")
    rows = read_pairs(data)  # bad input fails here, before the slow imports below
    import datasets
    from peft import LoraConfig
    from transformers import PrinterCallback
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer

    from ..model.loading import load_hf_model, resolve_device

    dev = resolve_device(device)
    start = time.perf_counter()
    plain = load_hf_model(model, dtype="float32", progress=progress)
    if getattr(plain.tokenizer, "chat_template", None) is None:
        raise InputError(f"{plain.model_id} has no chat template: DPO on chat pairs needs an instruct/chat model")
    if not progress:
        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
    policy = plain.model
    lora = None
    reference = None
    if settings.lora_rank is None:
        reference = copy.deepcopy(policy).eval()  # the base, frozen: TRL would reload it from the config's path
        reference.requires_grad_(False)
    else:
        lora = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha or 2 * settings.lora_rank,
                          lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    train = datasets.Dataset.from_list([{k: r[k] for k in COLUMNS} for r in rows])
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-tmp-") as tmp:
        config = DPOConfig(
            output_dir=os.path.join(tmp, "trainer"), num_train_epochs=settings.epochs, learning_rate=settings.lr,
            beta=settings.beta, per_device_train_batch_size=settings.batch_size, per_device_eval_batch_size=settings.batch_size,
            max_length=settings.max_length, seed=settings.seed, data_seed=settings.seed, logging_steps=1,
            save_strategy="no", report_to="none", disable_tqdm=not progress, use_cpu=dev.type == "cpu",
            dataloader_num_workers=0,
        )
        trainer = DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=train,
                             processing_class=plain.tokenizer, peft_config=lora)
        if not progress:
            trainer.remove_callback(PrinterCallback)  # Trainer prints every log line when its bar is off
        trainer.train()
        steps = [{ours: float(entry[theirs]) for theirs, ours in _STEP_KEYS.items() if theirs in entry} | {"step": entry["step"]}
                 for entry in trainer.state.log_history if "loss" in entry and "rewards/margins" in entry]
        evaluation = trainer.evaluate(eval_dataset=train)
        final = {ours: float(evaluation[f"eval_{theirs}"]) for theirs, ours in _STEP_KEYS.items()
                 if f"eval_{theirs}" in evaluation and ours not in ("lr", "grad_norm", "epoch")}
        trained = trainer.model.merge_and_unload() if lora is not None else trainer.model
        trained = trained.to("cpu").eval()
        trained.config.use_cache = True
        weights = Path(tmp, "model")
        trained.save_pretrained(weights)
        plain.tokenizer.save_pretrained(weights)
        report = DPOReport(out, plain.model_id, str(pairs_path(data)), len(rows), settings, steps, final,
                           time.perf_counter() - start, _versions())
        (weights / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(weights, out)
    return report


def read_report(folder: str | Path) -> dict[str, Any]:
    """The ``dpo.json`` a DPO run saved next to its weights."""
    path = Path(folder) / REPORT_FILE
    if not path.is_file():
        raise InputError(f"{folder} has no {REPORT_FILE}: not a folder written by `workbench dpo`")
    return json.loads(path.read_text())
