"""Prefix Controller: SelfControl compressed into a few trained virtual tokens.

Why: a search costs several generations per prompt; a prefix trained to
reproduce the controlled hidden states costs nothing at inference but a few
extra positions in the prefill. It enters through the model's own hooks:
``applied(model)`` makes it model state (``model.prefix``); every workbench
forward then puts placeholder slots at columns ``[0, n)`` of every row and
declares them (``model.layout.prefix``), and the embedding hook swaps their
embeddings for the trained ones; optional per-layer residual vectors are added
at those positions. Nothing is inferred from the ids (the placeholder is the
pad token, on SmolLM2 also the end-of-turn token). Decode steps run with the KV cache as usual: the prefix is
already in the cache, so generation speed is unchanged. Training lives in
:mod:`workbench.prefix.training`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import InputError
from ..model.layout import refuse_undeclared
from ..store import load_artifact, save_artifact

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
        The start is the value at the hook the prefix replaces, not the raw embedding matrix:
        Gemma scales embeddings by sqrt(d_model) before that hook, and under a device map the
        matrix may be offloaded. ``residual_layers=None`` puts trainable residual vectors at every layer.
        """
        if n_tokens < 1:
            raise InputError("a prefix needs at least one virtual token")
        ids = model.encode(init_text) if init_text else model.chat_ids("x")[:1]
        if not ids:
            raise InputError("init_text has no tokens")
        ids = [ids[i % len(ids)] for i in range(n_tokens)]
        _, embed_hook = embed_hooks(model)
        emb = model.capture(model.as_tensor(ids), [embed_hook])[embed_hook][0].float().clone()
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
        """Hooks that replace the embeddings (and add the residuals) at the prefix slots the forward declares.

        Every workbench forward under :meth:`applied` places the slots at columns ``[0, n)``
        of every row and says so (``model.layout.prefix``); a cached step past them is left alone.
        """
        n = self.n_tokens
        _, embed_hook = embed_hooks(model)

        def active(x: Tensor) -> bool:
            layout = model.layout
            if layout is None:
                raise refuse_undeclared("a prefix controller")
            if layout.prefix != n:
                raise InputError(f"this forward places {layout.prefix} prefix slots, the applied prefix has {n}")
            if layout.offset >= n:
                return False  # the slots are in the KV cache already
            if layout.offset > 0 or x.shape[1] < n:
                raise InputError(f"a forward from column {layout.offset} covers only part of the {n} prefix slots")
            return True

        def replace(x: Tensor, hook: Any) -> Tensor:
            if not active(x):
                return x
            head = self.embeddings.to(device=x.device, dtype=x.dtype).expand(x.shape[0], n, x.shape[-1])
            return torch.cat([head, x[:, n:]], dim=1)

        def make(r: Tensor):
            def add(x: Tensor, hook: Any) -> Tensor:
                if not active(x):
                    return x
                return torch.cat([x[:, :n] + r.to(device=x.device, dtype=x.dtype), x[:, n:]], dim=1)

            return add

        return [(embed_hook, replace)] + [(name, make(r)) for name, r in self.residuals.items()]

    @contextlib.contextmanager
    def applied(self, model: HookedChatModel) -> Iterator[HookedChatModel]:
        """``with controller.applied(model): model.generate(prompts)`` — prompts without the prefix; every forward adds it.

        The controller becomes model state (``model.prefix``): generation, scoring, gradients,
        ``capture`` and ``run_with_cache`` all put its slots first and it replaces them.
        """
        self.check_model(model)
        if model.prefix is not None:
            raise InputError("a prefix is already applied to this model; compose controllers instead of nesting them")
        model.prefix = self
        try:
            with model.bridge.hooks(fwd_hooks=self.hooks(model)):
                yield model
        finally:
            model.prefix = None

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
        tensors, config = load_artifact(
            folder, KIND, model=model, required=("placeholder_id", "residual_hooks"),
            tensor_names=lambda c: ["embeddings", *(f"residual.{n}" for n in c["residual_hooks"])])
        device = model.device if model is not None else "cpu"
        meta = dict(config.get("meta") or {})
        meta["training"] = config.get("training", {})
        return cls(tensors["embeddings"].to(device), config["model_id"], int(config["placeholder_id"]),
                   {n: tensors[f"residual.{n}"].to(device) for n in config["residual_hooks"]},
                   config.get("layers"), meta)
