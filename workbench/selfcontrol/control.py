"""A control: per-hook additions to the residual stream at prompt positions.

With a KV cache the addition is needed only in the prefill, where prompt
positions are computed; generated tokens feel it through attention. The hook
adds the delta to the first ``pos`` positions of any forward that covers
them (prefill, or every step of uncached generation) and leaves one-token
cached decode steps alone, so cached and uncached generation agree.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import InputError
from ..store import load_artifact, save_artifact

if TYPE_CHECKING:
    from ..model.chat_model import HookedChatModel

KIND = "control"


def layer_of(hook_name: str) -> int:
    """The block index of a canonical hook name (``blocks.{l}.…``)."""
    return int(hook_name.split(".")[1])


@dataclass
class Control:
    """``deltas[hook_name]``: ``[pos, d_model]`` (one prompt) or ``[batch, pos, d_model]`` (one per row)."""

    deltas: dict[str, Float[Tensor, "... pos d_model"]]
    model_id: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shapes = {tuple(t.shape[-2:-1]) for t in self.deltas.values()}
        if len(shapes) > 1:
            raise InputError(f"all deltas of a control must cover the same prompt positions, got {shapes}")
        self.deltas = dict(sorted(self.deltas.items(), key=lambda kv: (layer_of(kv[0]), kv[0])))

    # ---- construction ----------------------------------------------------
    @classmethod
    def zeros(cls, model: HookedChatModel, prompt_len: int, hook_names: Sequence[str] | None = None) -> Control:
        names = list(hook_names or model.hook_names())
        return cls({n: torch.zeros(prompt_len, model.d_model, device=model.device, dtype=model.dtype) for n in names},
                   model.model_id)

    @classmethod
    def stack(cls, controls: Sequence[Control]) -> Control:
        """One batched control from several (one per batch row), for batched generation.

        Rows may act on different hooks (e.g. layer windows): a row without a hook gets zeros there.
        """
        first = controls[0]
        for c in controls[1:]:
            first._check_compatible(c)
        names = sorted({n for c in controls for n in c.deltas}, key=lambda n: (layer_of(n), n))
        like = next(iter(first.deltas.values()))

        def row(c: Control, name: str) -> Tensor:
            return c.deltas[name] if name in c.deltas else torch.zeros_like(like)

        return cls({n: torch.stack([row(c, n) for c in controls]) for n in names}, first.model_id)

    # ---- properties --------------------------------------------------------
    @property
    def hook_names(self) -> list[str]:
        return list(self.deltas)

    @property
    def prompt_len(self) -> int:
        return int(next(iter(self.deltas.values())).shape[-2])

    @property
    def batched(self) -> bool:
        return next(iter(self.deltas.values())).ndim == 3

    def norms(self) -> Float[Tensor, "layer pos"]:
        """Norm of the addition per hook (row) and prompt position (column)."""
        return torch.stack([d.float().norm(dim=-1) for d in self.deltas.values()])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Control:
        return Control({n: d.to(device=device, dtype=dtype) for n, d in self.deltas.items()}, self.model_id, dict(self.meta))

    def restrict(self, hook_names: Sequence[str]) -> Control:
        """The same control on a subset of hooks (e.g. a window of layers)."""
        missing = set(hook_names) - set(self.deltas)
        if missing:
            raise InputError(f"control has no delta at {sorted(missing)}")
        return Control({n: self.deltas[n] for n in hook_names}, self.model_id, dict(self.meta))

    # ---- arithmetic (composition) -----------------------------------------
    def _check_compatible(self, other: Control) -> None:
        if not isinstance(other, Control):
            raise InputError(f"cannot combine a Control with {type(other).__name__}")
        if other.model_id != self.model_id:
            raise InputError(f"controls for different models: {self.model_id!r} vs {other.model_id!r}")
        if other.prompt_len != self.prompt_len:
            raise InputError(f"controls for prompts of different lengths: {self.prompt_len} vs {other.prompt_len} tokens")

    def __add__(self, other: Control) -> Control:
        self._check_compatible(other)
        names = sorted(set(self.deltas) | set(other.deltas), key=lambda n: (layer_of(n), n))
        out = {}
        for n in names:
            a, b = self.deltas.get(n), other.deltas.get(n)
            out[n] = a + b if a is not None and b is not None else (a if a is not None else b).clone()
        return Control(out, self.model_id)

    def __mul__(self, scale: float) -> Control:
        return Control({n: d * float(scale) for n, d in self.deltas.items()}, self.model_id, dict(self.meta))

    __rmul__ = __mul__

    def __neg__(self) -> Control:
        return self * -1.0

    def __sub__(self, other: Control) -> Control:
        return self + (-other)

    # ---- application --------------------------------------------------------
    def hooks(self) -> list[tuple[str, Any]]:
        """(hook name, function) pairs for ``bridge.hooks`` / ``run_with_hooks``."""
        length = self.prompt_len

        def make(delta: Tensor):
            def add(resid: Tensor, hook: Any) -> Tensor:
                if resid.shape[1] < length:  # a cached decode step: the prompt is already in the cache
                    return resid
                d = delta.to(resid.dtype)
                if d.ndim == 3 and d.shape[0] != resid.shape[0]:  # rows forked into branches
                    d = d.repeat_interleave(resid.shape[0] // d.shape[0], dim=0)
                resid = resid.clone()
                resid[:, :length] = resid[:, :length] + d
                return resid

            return add

        return [(name, make(delta)) for name, delta in self.deltas.items()]

    @contextlib.contextmanager
    def applied(self, model: HookedChatModel) -> Iterator[HookedChatModel]:
        """``with control.applied(model): model.generate(...)`` — prompts must be ``prompt_len`` tokens."""
        self.check_model(model)
        with model.bridge.hooks(fwd_hooks=self.hooks()):
            yield model

    def check_model(self, model: HookedChatModel) -> None:
        if self.model_id != model.model_id:
            raise InputError(f"this control was made for {self.model_id!r}, not {model.model_id!r}")
        unknown = [n for n in self.deltas if n not in model.bridge.hook_dict]
        if unknown:
            raise InputError(f"hooks {unknown[:3]} do not exist on {model.model_id}")

    # ---- persistence ----------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        shapes = {n: list(d.shape) for n, d in self.deltas.items()}
        return save_artifact(folder, KIND, {n: d.detach() for n, d in self.deltas.items()},
                             {"model_id": self.model_id, "hook_names": self.hook_names, "shapes": shapes,
                              "d_model": int(next(iter(self.deltas.values())).shape[-1]), "meta": self.meta})

    @classmethod
    def load(cls, folder: str | Path, model: HookedChatModel | None = None) -> Control:
        tensors, config = load_artifact(folder, KIND, model=model, required=("hook_names",),
                                        tensor_names=lambda c: c["hook_names"])
        if model is not None:
            tensors = {n: t.to(device=model.device, dtype=model.dtype) for n, t in tensors.items()}
        return cls({n: tensors[n] for n in config["hook_names"]}, config["model_id"], config.get("meta", {}))
