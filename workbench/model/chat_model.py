"""The hooked chat model every other module works with.

It holds the TransformerBridge (classic hook names, raw HF weights), the
tokenizer, sizes read from the config (never assumed), and chat formatting
through the tokenizer's own template. Everything downstream stays in token ids.
"""

from __future__ import annotations

import contextlib
import operator
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import InputError
from .layout import ForwardLayout, PromptRef, RowPrompt

RESIDUAL_POINTS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")


class _Captured(Exception):
    """Raised by :meth:`HookedChatModel.capture` to end a forward once every wanted activation is seen."""
BLOCK_POINTS = (*RESIDUAL_POINTS, "hook_attn_out", "hook_mlp_out")


@dataclass(eq=False)
class HookedChatModel:
    """A chat LM behind TransformerLens hooks.

    ``bridge`` runs every forward that hooks must see (prefill, gradients).
    ``decoder`` is the same HF network sharing the bridge's weight tensors,
    without hook points: cached decode steps run through it so hooked
    generation costs what HF-native generation costs (see generation.py).
    """

    bridge: Any
    tokenizer: Any
    model_id: str
    decoder: torch.nn.Module
    source: str = ""
    cache_path: str | None = None
    extra: dict = field(default_factory=dict)
    # The forward now running declares where each row's prompt sits (see layout.py);
    # controls and prefixes read it to place themselves. None outside workbench forwards.
    layout: ForwardLayout | None = field(default=None, repr=False)
    # The applied prefix controller (explicit state, set by ``PrefixController.applied``):
    # every workbench forward puts its slots at columns [0, n) of every row.
    prefix: Any = field(default=None, repr=False)

    @property
    def prefix_len(self) -> int:
        """Prefix slots every workbench forward places before its rows (0 without an applied prefix)."""
        return int(self.prefix.n_tokens) if self.prefix is not None else 0

    @property
    def prefix_ids(self) -> list[int]:
        """The ids at the prefix slots (placeholders whose embeddings the applied prefix replaces)."""
        return [int(self.prefix.placeholder_id)] * self.prefix.n_tokens if self.prefix is not None else []

    @contextlib.contextmanager
    def declared(self, layout: ForwardLayout) -> Iterator[ForwardLayout]:
        """Declare where each row's prompt sits for the forwards run inside (restored after)."""
        if layout.prefix != self.prefix_len:
            raise InputError(f"the layout places {layout.prefix} prefix slots, the applied prefix has {self.prefix_len}")
        previous, self.layout = self.layout, layout
        try:
            yield layout
        finally:
            self.layout = previous

    def rows_layout(
        self, ids: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"] | None = None,
        prompt_lens: Sequence[int] | None = None,
    ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"] | None, ForwardLayout]:
        """Ids (prefix slots prepended) and the layout of a forward over ``ids`` whose rows start with their prompts.

        Each row's prompt starts at its first attended column (left or right padding) and is
        ``prompt_lens[row]`` tokens long (default: every attended token).
        """
        ids = ids if ids.ndim == 2 else ids[None]
        mask = attention_mask if attention_mask is None or attention_mask.ndim == 2 else attention_mask[None]
        valid = torch.ones_like(ids) if mask is None else mask
        starts = valid.argmax(-1).tolist()
        counts = valid.sum(-1).tolist()
        lens = counts if prompt_lens is None else [int(n) for n in prompt_lens]
        if len(lens) != ids.shape[0]:
            raise InputError(f"{len(lens)} prompt lengths for {ids.shape[0]} rows")
        rows_ids = ids.tolist()
        rows = []
        for row, (start, count, n) in enumerate(zip(starts, counts, lens, strict=True)):
            if not 0 < n <= count:
                raise InputError(f"row {row}: a prompt of {n} tokens in a row of {count} tokens")
            rows.append(RowPrompt(self.prefix_len + start, PromptRef.of(rows_ids[row][start:start + n])))
        n = self.prefix_len
        if n:
            head = torch.as_tensor(self.prefix_ids, device=ids.device).expand(ids.shape[0], n)
            ids = torch.cat([head, ids], 1)
            if mask is not None:
                mask = torch.cat([torch.ones_like(head), mask], 1)
        return ids, mask, ForwardLayout(tuple(rows), n)

    # ---- sizes -------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.decoder.config

    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.bridge.cfg.d_model)

    @property
    def n_ctx(self) -> int:
        return int(self.bridge.cfg.n_ctx)

    @property
    def d_vocab(self) -> int:
        return int(self.decoder.get_output_embeddings().weight.shape[0])

    @property
    def device(self) -> torch.device:
        """The input device: where token ids (and the workbench's input tensors) go.

        On one device, the device of the weights. Under a device map the input
        embedding's execution device (other layers may sit on other devices;
        hooks there receive activations on their own layer's device).
        """
        embed = self.decoder.get_input_embeddings()
        hook = getattr(embed, "_hf_hook", None)  # accelerate's placement hook, under a device map
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            execution = getattr(h, "execution_device", None)
            if execution is not None:
                return torch.device(execution)
        return next(embed.parameters()).device

    @property
    def device_map(self) -> dict[str, Any] | None:
        """Module name -> device when loaded with a device map (``None`` on one device)."""
        return getattr(self.decoder, "hf_device_map", None)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.decoder.parameters()).dtype

    @property
    def eos_token_ids(self) -> list[int]:
        ids = self.decoder.generation_config.eos_token_id
        if ids is None:
            ids = self.tokenizer.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        return ids

    @property
    def pad_token_id(self) -> int:
        """The id that fills padded positions: the pad token, else the first end-of-sequence id, else unk/bos, else 0.

        Every padded position is masked out of attention and never read, so any
        id in the vocabulary is sound; a model without pad and eos tokens (many
        base models) still pads.
        """
        candidates = (self.tokenizer.pad_token_id, *self.eos_token_ids, self.tokenizer.unk_token_id,
                      self.tokenizer.bos_token_id)
        return int(next((c for c in candidates if c is not None), 0))

    # ---- hook names --------------------------------------------------
    def hook_name(self, layer: int, point: str = "hook_resid_post") -> str:
        """Canonical hook name ``blocks.{layer}.{point}``, validated."""
        try:
            if isinstance(layer, bool):
                raise TypeError
            layer = operator.index(layer)  # ints and numpy ints; not "3", 3.0 or True
        except TypeError:
            raise InputError(f"a layer is an integer index, got {type(layer).__name__} {layer!r}") from None
        if not 0 <= layer < self.n_layers:
            raise InputError(f"layer {layer} out of range: the model has {self.n_layers} layers (0..{self.n_layers - 1})")
        name = f"blocks.{layer}.{point}"
        if name not in self.bridge.hook_dict:
            raise InputError(f"unknown hook point {point!r}; try one of {', '.join(BLOCK_POINTS)}")
        return name

    def hook_names(self, layers: Sequence[int] | None = None, point: str = "hook_resid_post") -> list[str]:
        """Hook names of ``layers`` (default: all), each validated; a layer named twice is refused.

        Every layer selection in the workbench is resolved here, so a repeated
        layer fails with a clear message instead of deep in the gradient code.
        """
        if layers is None:
            layers = range(self.n_layers)
        elif isinstance(layers, str) or not isinstance(layers, Iterable):
            raise InputError(f"layers must be a list of layer indices such as [0, 1, 2], got {layers!r}")
        layers = list(layers)
        names = [self.hook_name(layer, point) for layer in layers]
        chosen = [operator.index(layer) for layer in layers]  # valid indices: hook_name checked each
        repeated = sorted(layer for layer, count in Counter(chosen).items() if count > 1)
        if repeated:
            raise InputError(f"layer(s) {repeated} given more than once in {chosen}; name each layer once")
        return names

    # ---- chat formatting ---------------------------------------------
    def chat_ids(
        self,
        user_text: str,
        history: Sequence[dict[str, str]] | None = None,
        system: str | None = None,
    ) -> list[int]:
        """Token ids of a conversation ending with an open assistant turn."""
        if not isinstance(user_text, str) or not user_text.strip():
            raise InputError("empty prompt: pass a non-empty user message")
        messages = [{"role": "system", "content": system}] if system else []
        messages += list(history or []) + [{"role": "user", "content": user_text}]
        ids = self._template_ids(messages, add_generation_prompt=True)
        self.check_length(len(ids))
        return ids

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
        """The tokenizer's own chat template, as text (no tokenisation)."""
        from jinja2 import TemplateError

        if getattr(self.tokenizer, "chat_template", None) is None:
            raise InputError(f"{self.model_id} has no chat template; load an instruct/chat model")
        try:
            return self.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except TemplateError as err:  # the template's own raise_exception, e.g. Gemma 2 and Mixtral on a system turn
            roles = [m.get("role") for m in messages]
            raise InputError(f"the chat template of {self.model_id} refuses this conversation (roles {roles}): {err}. "
                             "Put the instruction into the user message instead.") from err

    def _template_ids(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        return self.encode(self.render(messages, add_generation_prompt))

    def encode(self, text: str) -> list[int]:
        """Tokenise template text verbatim (special tags parsed, no BOS added)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int] | Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def check_length(self, n_tokens: int, max_new_tokens: int = 0) -> None:
        if n_tokens == 0:
            raise InputError("empty prompt: no tokens to run")
        if n_tokens + max_new_tokens > self.n_ctx:
            raise InputError(
                f"prompt of {n_tokens} tokens + {max_new_tokens} new tokens exceeds the context "
                f"of {self.n_ctx} tokens for {self.model_id}; shorten the prompt or max_new_tokens"
            )

    def active_hooks(self) -> int:
        """Hooks registered on the bridge's hook points (controls, reading vectors, prefixes act there)."""
        return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in self.bridge.hook_dict.values())

    @torch.no_grad()
    def capture(
        self, ids: Int[Tensor, "batch pos"], hook_names: Sequence[str], attention_mask: Int[Tensor, "batch pos"] | None = None,
        prompt_lens: Sequence[int] | None = None,
    ) -> dict[str, Float[Tensor, "batch pos d_model"]]:
        """Activations at ``hook_names`` for one forward that stops once all of them are seen.

        Nothing after the last of them runs (later blocks, the unembedding: on a small
        model the vocabulary-sized matmul costs most of a forward). Hooks already
        registered on the bridge (a control, a prefix) act first, so the capture sees
        their effect; each row's prompt is its first ``prompt_lens[row]`` attended tokens
        (default: all of them). With an applied prefix its slots come first: the activations
        then start with them. Under a device map each activation stays on its layer's device.
        """
        wanted = set(hook_names)
        unknown = wanted - set(self.bridge.hook_dict)
        if unknown:
            raise InputError(f"unknown hook points {sorted(unknown)[:3]} on {self.model_id}")
        seen: dict[str, Tensor] = {}

        def make(name: str):  # by the name asked for: aliases (hook_resid_post) share one hook point
            def keep(x: Tensor, hook: Any) -> Tensor:
                seen[name] = x.detach().clone()
                if wanted <= seen.keys():
                    raise _Captured
                return x

            return keep

        ids, attention_mask, layout = self.rows_layout(ids, attention_mask, prompt_lens)
        try:
            with self.declared(layout), self.bridge.hooks(fwd_hooks=[(n, make(n)) for n in wanted]):
                self.bridge(ids, attention_mask=attention_mask)
        except _Captured:
            pass
        missing = wanted - seen.keys()
        if missing:
            raise InputError(f"hook points {sorted(missing)[:3]} did not fire in a forward of {self.model_id}")
        return {n: seen[n] for n in hook_names}

    @torch.no_grad()
    def run_with_cache(
        self, ids: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"] | None = None,
        prompt_lens: Sequence[int] | None = None, **kwargs: Any,
    ) -> tuple[Any, Any]:
        """``bridge.run_with_cache`` with the rows' prompts declared (as :meth:`capture`), so controls and prefixes apply."""
        ids, attention_mask, layout = self.rows_layout(ids, attention_mask, prompt_lens)
        with self.declared(layout):
            return self.bridge.run_with_cache(ids, attention_mask=attention_mask, **kwargs)

    def as_tensor(self, ids: Sequence[int] | Tensor) -> Int[Tensor, "batch pos"]:
        t = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return t.unsqueeze(0) if t.ndim == 1 else t

    # ---- convenience ---------------------------------------------------
    def generate(self, prompts: Any, **kwargs: Any) -> Any:
        """:func:`workbench.model.generation.generate` on this model; returns its ``Generation``.

        Imported on call: generation builds on the model, not the other way round.
        """
        from .generation import generate

        return generate(self, prompts, **kwargs)

    def chat(self, user_text: str, max_new_tokens: int = 64, **kwargs: Any) -> str:
        """Answer one user message (greedy by default) and return the text."""
        return self.generate([self.chat_ids(user_text)], max_new_tokens=max_new_tokens, **kwargs).texts[0]

    def info(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "source": self.source,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "n_ctx": self.n_ctx,
            "device": str(self.device),
            "device_map": self.device_map,
            "dtype": str(self.dtype).replace("torch.", ""),
            "cache_path": self.cache_path,
        }

    def __repr__(self) -> str:
        return f"HookedChatModel({self.model_id!r}, n_layers={self.n_layers}, d_model={self.d_model}, device={self.device}, dtype={self.dtype})"
