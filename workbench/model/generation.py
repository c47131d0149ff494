"""Batched generation in token ids, with every registered hook active during prefill.

Why not ``bridge.generate``: on a small model the bridge's per-token Python
overhead makes it ~1.5x slower than HF-native generation. Controls act on
prompt positions only, which a KV cache touches once, in the prefill. So the
prefill runs through the bridge (all hooks fire) and each cached decode step
runs through the hook-free twin that shares the bridge's weights.
``hooks_during_decode=True`` (or ``use_cache=False``) routes every step
through the bridge instead, for hooks that must see generated tokens. Every
bridge forward declares where each row's prompt sits (``model.declared``), so
controls land on their own prompt's tokens whatever the left padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import InputError
from .chat_model import HookedChatModel
from .layout import ForwardLayout


@dataclass
class Generation:
    """New tokens per sequence (end-of-sequence token removed) and their text."""

    prompts: list[list[int]]
    tokens: list[list[int]]
    texts: list[str] = field(default_factory=list)
    branches: int = 1

    def __len__(self) -> int:
        return len(self.tokens)


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device, head: Sequence[int] = ()
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Left-pad prompts to one length; return ids and the 0/1 attention mask.

    ``head`` ids go before the padding, at positions ``[0, len(head))`` of every row.
    """
    width = max(len(p) for p in prompts)
    n = len(head)
    ids = torch.full((len(prompts), n + width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    if n:
        ids[:, :n] = torch.as_tensor(list(head), device=device)
        mask[:, :n] = 1
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, n + width - len(prompt):] = torch.as_tensor(list(prompt), device=device)
            mask[row, n + width - len(prompt):] = 1
    return ids, mask


def positions(mask: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """Position ids that start at 0 at each row's first real token."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _normalise_prompts(model: HookedChatModel, prompts: Any) -> list[list[int]]:
    if isinstance(prompts, str):
        raise InputError("generate() takes token ids; use model.chat_ids(text) to format a chat prompt")
    if isinstance(prompts, Tensor):
        prompts = prompts.tolist() if prompts.ndim == 2 else [prompts.tolist()]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):
        raise InputError("pass a list of prompts (a list of token-id lists), e.g. [model.chat_ids(text)]")
    if not prompts:
        raise InputError("no prompts given")
    prompts = [list(p) for p in prompts]
    for p in prompts:
        if len(p) == 0:
            raise InputError("empty prompt: every prompt needs at least one token")
    return prompts


def next_token(
    logits: Float[Tensor, "batch d_vocab"],
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | list[tuple[Tensor, torch.Generator]] | None,
) -> Int[Tensor, " batch"]:
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-6)
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    if isinstance(generator, list):  # (rows, generator) per seed group: each group draws from its own stream
        out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
        for rows, gen in generator:
            out[rows] = torch.multinomial(probs[rows], 1, generator=gen).squeeze(-1)
        return out
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: HookedChatModel,
    prompts: Sequence[Sequence[int]] | Tensor,
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | Sequence[int] | None = None,
    seed_groups: Sequence[int] | None = None,
    use_cache: bool = True,
    stop_at_eos: bool = True,
    branches: int = 1,
    hooks_during_decode: bool = False,
    progress: bool = False,
) -> Generation:
    """Generate continuations of token-id prompts (left-padded into one batch).

    ``branches`` > 1 forks each prompt on its top-``branches`` first tokens and
    continues each branch as usual; sequence ``i * branches + j`` is prompt
    ``i``, branch ``j``. Greedy by default; sampling is seeded by ``seed``.
    ``seed_groups`` (one group index per prompt) with one ``seed`` per group gives each
    group its own random stream, so a group samples the same tokens whatever else
    shares the batch (the batched search seeds per prompt, not per batch position).
    """
    prompts = _normalise_prompts(model, prompts)
    if max_new_tokens < 1:
        raise InputError("max_new_tokens must be at least 1")
    if branches < 1:
        raise InputError("branches must be at least 1")
    for p in prompts:
        model.check_length(model.prefix_len + len(p), max_new_tokens)
    device = model.device
    ids, mask = left_pad(prompts, model.pad_token_id, device, head=model.prefix_ids)
    layout = ForwardLayout.left_padded(prompts, prefix=model.prefix_len)
    generator: Any = None
    if do_sample:
        if seed_groups is None:
            if not (seed is None or isinstance(seed, int)):
                raise InputError("several seeds need seed_groups (one group index per prompt)")
            generator = torch.Generator(device=device)
            generator.manual_seed(0 if seed is None else seed)
        else:
            groups = list(seed_groups)
            seeds = [seed] if isinstance(seed, int) else list(seed or [0])
            if len(groups) != len(prompts) or min(groups) < 0 or max(groups) >= len(seeds):
                raise InputError(f"seed_groups must give each of the {len(prompts)} prompts a group < {len(seeds)} seeds")
            generator = []
            for g, sd in enumerate(seeds):
                rows = [r * branches + b for r, grp in enumerate(groups) if grp == g for b in range(branches)]
                if rows:
                    gen = torch.Generator(device=device)
                    gen.manual_seed(int(sd))
                    generator.append((torch.as_tensor(rows, device=device), gen))
    eos = torch.as_tensor(model.eos_token_ids or [-1], device=device)
    from transformers import DynamicCache

    cache = DynamicCache() if use_cache else None
    with model.declared(layout):
        logits = model.bridge(ids, attention_mask=mask, position_ids=positions(mask), past_key_values=cache)[:, -1]
    if branches > 1:
        first = logits.topk(branches, dim=-1).indices.reshape(-1)
        ids, mask = ids.repeat_interleave(branches, 0), mask.repeat_interleave(branches, 0)
        layout = layout.repeat(branches)
        if cache is not None:
            cache.batch_repeat_interleave(branches)
    else:
        first = next_token(logits, do_sample, temperature, top_k, top_p, generator)
    batch = ids.shape[0]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    out = torch.full((batch, max_new_tokens), model.pad_token_id, dtype=torch.long, device=device)
    token = first
    for step in tqdm(range(max_new_tokens), desc="generating", disable=not progress):
        token = torch.where(done, model.pad_token_id, token)
        out[:, step] = token
        if stop_at_eos:
            done |= torch.isin(token, eos)
            if bool(done.all()):
                break
        if step == max_new_tokens - 1:
            break
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, (~done).long()[:, None]], 1)
        pos = positions(mask)
        if cache is None:
            with model.declared(layout):
                logits = model.bridge(ids, attention_mask=mask, position_ids=pos)[:, -1]
        elif hooks_during_decode:
            with model.declared(layout.shifted(ids.shape[1] - 1)):
                logits = model.bridge(token[:, None], attention_mask=mask, position_ids=pos[:, -1:], past_key_values=cache)[:, -1]
        else:
            logits = model.decoder(
                input_ids=token[:, None], attention_mask=mask, position_ids=pos[:, -1:],
                past_key_values=cache, use_cache=True,
            ).logits[:, -1]
        token = next_token(logits, do_sample, temperature, top_k, top_p, generator)
    tokens = []
    eos_set = set(model.eos_token_ids)
    for row in out.tolist():
        seq = []
        for t in row[: step + 1]:
            if stop_at_eos and t in eos_set:
                break
            seq.append(t)
        tokens.append(seq)
    expanded = [p for p in prompts for _ in range(branches)]
    return Generation(prompts=expanded, tokens=tokens, texts=[model.decode(t) for t in tokens], branches=branches)
