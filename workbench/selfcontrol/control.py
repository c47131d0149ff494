"""A control: per-hook additions to the residual stream at prompt positions.

With a KV cache the addition is needed only in the prefill, where prompt
positions are computed; generated tokens feel it through attention. The hook
adds each row's delta at the columns where the running forward declares that
row's prompt (``model.layout``, see :mod:`workbench.model.layout`): after left
padding, after prefix slots, in every step of uncached generation, and not in
cached decode steps (the prompt is in the cache), so cached and uncached
generation agree. A forward whose row holds another prompt is refused.
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
from ..model.layout import ForwardLayout, PromptRef, refuse_undeclared
from ..store import load_artifact, save_artifact

if TYPE_CHECKING:
    from ..model.chat_model import HookedChatModel

KIND = "control"


def layer_of(hook_name: str) -> int:
    """The block index of a canonical hook name (``blocks.{l}.…``)."""
    return int(hook_name.split(".")[1])


@dataclass
class Control:
    """``deltas[hook_name]``: ``[pos, d_model]`` (one prompt) or ``[batch, pos, d_model]`` (one prompt per row).

    ``prompts`` records the prompt each row belongs to (length and a hash of its ids;
    see :class:`~workbench.model.layout.PromptRef`). Batched rows may belong to prompts
    of different lengths: row ``r``'s delta is ``deltas[n][r, :prompts[r].length]``, zeros after.
    Applying a control to a forward whose row holds another prompt is refused.
    """

    deltas: dict[str, Float[Tensor, "... pos d_model"]]
    model_id: str
    meta: dict[str, Any] = field(default_factory=dict)
    prompts: list[PromptRef] | None = None

    def __post_init__(self) -> None:
        if not self.deltas:
            raise InputError("a control needs at least one hook")
        shapes = {tuple(t.shape[:-1]) for t in self.deltas.values()}
        if len(shapes) > 1:
            raise InputError(f"all deltas of a control must cover the same prompt positions, got {shapes}")
        self.deltas = dict(sorted(self.deltas.items(), key=lambda kv: (layer_of(kv[0]), kv[0])))
        width, rows = self.prompt_len, (next(iter(self.deltas.values())).shape[0] if self.batched else 1)
        if self.prompts is None:
            self.prompts = [PromptRef(width)] * rows
        self.prompts = [p if isinstance(p, PromptRef) else PromptRef(*p) for p in self.prompts]
        if len(self.prompts) != rows:
            raise InputError(f"a control with {rows} rows records {len(self.prompts)} prompts")
        if any(p.length > width or (not self.batched and p.length != width) for p in self.prompts):
            raise InputError(f"the deltas cover {width} positions, the prompts have {[p.length for p in self.prompts]} tokens")

    # ---- construction ----------------------------------------------------
    @classmethod
    def zeros(cls, model: HookedChatModel, prompt: Sequence[int] | int, hook_names: Sequence[str] | None = None) -> Control:
        """A zero control for ``prompt`` (its token ids; a bare length binds it by length only)."""
        if hook_names is not None and len(hook_names) == 0:
            raise InputError("an empty hook selection: name at least one hook (None means all)")
        ref = PromptRef(int(prompt)) if isinstance(prompt, int) else PromptRef.of(prompt)
        names = list(hook_names) if hook_names is not None else model.hook_names()
        return cls({n: torch.zeros(ref.length, model.d_model, device=model.device, dtype=model.dtype) for n in names},
                   model.model_id, prompts=[ref])

    def bind(self, prompt_ids: Sequence[int]) -> Control:
        """The same deltas recorded as belonging to ``prompt_ids`` (refused if the length differs)."""
        ref = PromptRef.of(prompt_ids)
        if self.batched or ref.length != self.prompt_len:
            raise InputError(f"this control covers {self.prompt_len} positions, the prompt has {ref.length} tokens")
        return Control(dict(self.deltas), self.model_id, dict(self.meta), [ref])

    @classmethod
    def stack(cls, controls: Sequence[Control]) -> Control:
        """One batched control from several (one row each; batched ones give all their rows), for batched forwards.

        Rows may belong to prompts of different lengths (deltas zero-padded after each row's
        prompt) and act on different hooks (e.g. layer windows): a row without a hook gets zeros there.
        """
        controls = list(controls)
        if not controls:
            raise InputError("nothing to stack")
        first = controls[0]
        for c in controls[1:]:
            if c.model_id != first.model_id:
                raise InputError(f"controls for different models: {first.model_id!r} vs {c.model_id!r}")
        names = sorted({n for c in controls for n in c.deltas}, key=lambda n: (layer_of(n), n))
        width = max(c.prompt_len for c in controls)
        like = next(iter(first.deltas.values()))

        def rows(c: Control, name: str) -> Tensor:
            d = c.deltas.get(name)
            if d is None:
                d = torch.zeros(*(c.deltas[c.hook_names[0]].shape), dtype=like.dtype, device=like.device)
            d = d if d.ndim == 3 else d[None]
            return torch.nn.functional.pad(d, (0, 0, 0, width - d.shape[1]))

        return cls({n: torch.cat([rows(c, n) for c in controls]) for n in names}, first.model_id,
                   prompts=[p for c in controls for p in c.prompts])

    def row(self, index: int) -> Control:
        """Row ``index`` of a batched control as a one-prompt control."""
        if not self.batched:
            if index != 0:
                raise InputError("a one-prompt control has only row 0")
            return self
        ref = self.prompts[index]
        return Control({n: d[index, : ref.length] for n, d in self.deltas.items()}, self.model_id, dict(self.meta), [ref])

    # ---- properties --------------------------------------------------------
    @property
    def hook_names(self) -> list[str]:
        return list(self.deltas)

    @property
    def prompt_len(self) -> int:
        """Positions the deltas cover (the longest row's prompt when batched)."""
        return int(next(iter(self.deltas.values())).shape[-2])

    @property
    def batched(self) -> bool:
        return next(iter(self.deltas.values())).ndim == 3

    def norms(self) -> Float[Tensor, "layer pos"]:
        """Norm of the addition per hook (row) and prompt position (column)."""
        return torch.stack([d.float().norm(dim=-1) for d in self.deltas.values()])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Control:
        return Control({n: d.to(device=device, dtype=dtype) for n, d in self.deltas.items()}, self.model_id,
                       dict(self.meta), list(self.prompts))

    def restrict(self, hook_names: Sequence[str]) -> Control:
        """The same control on a subset of hooks (e.g. a window of layers)."""
        if len(hook_names) == 0:
            raise InputError("an empty hook selection: name at least one hook")
        missing = set(hook_names) - set(self.deltas)
        if missing:
            raise InputError(f"control has no delta at {sorted(missing)}")
        return Control({n: self.deltas[n] for n in hook_names}, self.model_id, dict(self.meta), list(self.prompts))

    # ---- arithmetic (composition) -----------------------------------------
    def _merged_prompts(self, other: Control) -> list[PromptRef]:
        if not isinstance(other, Control):
            raise InputError(f"cannot combine a Control with {type(other).__name__}")
        if other.model_id != self.model_id:
            raise InputError(f"controls for different models: {self.model_id!r} vs {other.model_id!r}")
        if other.prompt_len != self.prompt_len or len(other.prompts) != len(self.prompts):
            raise InputError(f"controls for prompts of different lengths: {self.prompt_len} vs {other.prompt_len} tokens")
        for a, b in zip(self.prompts, other.prompts, strict=True):
            if not a.matches(b):
                raise InputError(f"controls for different prompts: {a.describe()} vs {b.describe()}")
        return [a if a.key is not None else b for a, b in zip(self.prompts, other.prompts, strict=True)]

    def _check_compatible(self, other: Control) -> None:
        self._merged_prompts(other)

    def __add__(self, other: Control) -> Control:
        prompts = self._merged_prompts(other)
        names = sorted(set(self.deltas) | set(other.deltas), key=lambda n: (layer_of(n), n))
        out = {}
        for n in names:
            a, b = self.deltas.get(n), other.deltas.get(n)
            out[n] = a + b if a is not None and b is not None else (a if a is not None else b).clone()
        return Control(out, self.model_id, prompts=prompts)

    def __mul__(self, scale: float) -> Control:
        return Control({n: d * float(scale) for n, d in self.deltas.items()}, self.model_id, dict(self.meta), list(self.prompts))

    __rmul__ = __mul__

    def __neg__(self) -> Control:
        return self * -1.0

    def __sub__(self, other: Control) -> Control:
        return self + (-other)

    # ---- application --------------------------------------------------------
    def placement(
        self, layout: ForwardLayout | None, batch: int, seq: int
    ) -> tuple[list[int], list[int], list[int], list[int]] | None:
        """(forward row, column, control row, prompt position) of every addition in a forward, or None.

        Forward row ``b`` takes control row 0 (one-prompt control), ``b`` (one row each) or
        ``b // k`` (each row forked ``k`` times, e.g. into branches); each must hold that row's
        prompt. Rows whose prompt lies before the forward's first column (in the KV cache) get nothing.
        """
        if layout is None:
            raise refuse_undeclared("a control")
        layout.check_batch(batch)
        n_rows = len(self.prompts)
        if batch % n_rows:
            raise InputError(f"a control for {n_rows} prompts cannot be applied to a forward of {batch} rows")
        fork = batch // n_rows
        lo, hi = layout.offset, layout.offset + seq
        fr: list[int] = []
        fp: list[int] = []
        cr: list[int] = []
        cp: list[int] = []
        for b, row in enumerate(layout.rows):
            if row.end <= lo:
                continue
            r = b // fork
            want = self.prompts[r]
            if not want.matches(row.prompt):
                raise InputError(f"row {b} of this forward holds {row.prompt.describe()}, but the control (row {r}) "
                                 f"belongs to {want.describe()}: a control applies only to the prompt it was found for")
            if row.start < lo or row.end > hi:
                raise InputError(f"row {b}'s prompt spans columns {row.start}-{row.end}, the forward covers only {lo}-{hi}")
            length = want.length
            fr += [b] * length
            fp += range(row.start - lo, row.end - lo)
            cr += [r] * length
            cp += range(length)
        return (fr, fp, cr, cp) if fr else None

    def hooks(self, model: HookedChatModel) -> list[tuple[str, Any]]:
        """(hook name, function) pairs for ``bridge.hooks``: each adds the deltas at the declared prompt positions."""
        memo: dict[str, Any] = {"key": None}

        def where(resid: Tensor) -> tuple[Tensor, ...] | None:
            layout = model.layout
            key = (layout, resid.shape[0], resid.shape[1], resid.device)
            if memo["key"] is None or memo["key"][0] is not layout or memo["key"][1:] != key[1:]:
                found = self.placement(layout, resid.shape[0], resid.shape[1])
                memo["key"] = key
                memo["value"] = None if found is None else tuple(torch.as_tensor(x, device=resid.device) for x in found)
            return memo["value"]

        def make(delta: Tensor):
            def add(resid: Tensor, hook: Any) -> Tensor:
                found = where(resid)
                if found is None:
                    return resid
                fr, fp, cr, cp = found
                d = delta.to(device=resid.device, dtype=resid.dtype)
                values = d[cr, cp] if d.ndim == 3 else d[cp]
                return resid.index_put((fr, fp), values, accumulate=True)

            return add

        return [(name, make(delta)) for name, delta in self.deltas.items()]

    @contextlib.contextmanager
    def applied(self, model: HookedChatModel) -> Iterator[HookedChatModel]:
        """``with control.applied(model): model.generate([prompt_ids])`` — each row must hold the control's prompt."""
        self.check_model(model)
        with model.bridge.hooks(fwd_hooks=self.hooks(model)):
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
                              "d_model": int(next(iter(self.deltas.values())).shape[-1]), "meta": self.meta,
                              "prompts": [[p.length, p.key] for p in self.prompts]})

    @classmethod
    def load(cls, folder: str | Path, model: HookedChatModel | None = None) -> Control:
        tensors, config = load_artifact(folder, KIND, model=model, required=("hook_names",),
                                        tensor_names=lambda c: c["hook_names"])
        if model is not None:
            tensors = {n: t.to(device=model.device, dtype=model.dtype) for n, t in tensors.items()}
        prompts = [PromptRef(int(n), k) for n, k in config["prompts"]] if config.get("prompts") else None
        return cls({n: tensors[n] for n in config["hook_names"]}, config["model_id"], config.get("meta", {}), prompts)
