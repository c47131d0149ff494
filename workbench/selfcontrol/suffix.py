"""Suffix score and suffix gradients.

Score: run the model on ``prompt + response + suffix`` (token ids) and read the
next-token logits z at the end: ``sigmoid((z[target] - z[contrast]) / T)``;
several suffixes combine by weighted mean. Gradient: one forward and one
backward for all hook points at once, of a loss on that score, with respect
to the residual stream at the prompt positions.

Sequences are right-padded so the prompt sits at positions ``[0, pos)`` in
every row (causal attention makes right padding harmless to earlier tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import InputError, NumericalError
from .control import Control
from .steps import SINK_RATIO, StepGeometry, gradient_step
from .tasks import CompiledSuffix, Task, get_task

if TYPE_CHECKING:
    from ..model.chat_model import HookedChatModel

Loss = Literal["score", "ce"]
StepMode = Literal["relative", "absolute"]
DEFAULT_TEMPERATURE = 10.0
UNEMBED_IN = "unembed.hook_in"


def as_suffixes(model: HookedChatModel, suffixes: Task | str | Sequence[CompiledSuffix]) -> list[CompiledSuffix]:
    if isinstance(suffixes, Task | str):
        return get_task(suffixes).compile(model)
    suffixes = list(suffixes)
    if not suffixes or not all(isinstance(s, CompiledSuffix) for s in suffixes):
        raise InputError("pass a Task, a task id, or a list of compiled suffixes (task.compile(model))")
    return suffixes


def right_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], Int[Tensor, " batch"]]:
    """Right-pad rows; return ids, attention mask and each row's last index."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(list(row), device=device)
        mask[i, : len(row)] = 1
    last = torch.as_tensor([len(r) - 1 for r in rows], device=device)
    return ids, mask, last


def _gap_scores(
    logits: Float[Tensor, "batch d_vocab"], suffixes: Sequence[CompiledSuffix], temperature: float
) -> Float[Tensor, "batch n_suffix"]:
    """Per row (one row per suffix, suffix-major within a response) the sigmoid score."""
    target = torch.as_tensor([s.target_id for s in suffixes], device=logits.device)
    contrast = torch.as_tensor([s.contrast_id for s in suffixes], device=logits.device)
    rows = logits.float().view(-1, len(suffixes), logits.shape[-1])
    idx = torch.arange(len(suffixes), device=logits.device)
    gap = rows[:, idx, target] - rows[:, idx, contrast]
    return torch.sigmoid(gap / temperature)


def _weights(suffixes: Sequence[CompiledSuffix], device: torch.device) -> Tensor:
    w = torch.as_tensor([s.weight for s in suffixes], dtype=torch.float32, device=device)
    if (w < 0).any() or w.sum() <= 0:
        raise InputError("suffix weights must be non-negative with a positive sum")
    return w / w.sum()


@dataclass
class ResponseScores:
    """Suffix score and fluency of each response, from one batched clean forward."""

    scores: Float[Tensor, " batch"]
    per_suffix: Float[Tensor, "batch n_suffix"]
    nll: Float[Tensor, " batch"]  # mean token NLL of the response given the prompt (inf if empty)


@torch.no_grad()
def score_responses(
    model: HookedChatModel,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    suffixes: Task | str | Sequence[CompiledSuffix],
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    batch_size: int = 16,
) -> ResponseScores:
    """Score (prompt, response) pairs on the uncontrolled model; also each response's mean NLL.

    When every pair shares one prompt (the search scoring its candidates) and no
    hook is active, the prompt runs once and its KV cache is shared by all rows.
    Under active hooks (a control being scored) every row runs in full, so a
    control still acts at the prompt positions.
    """
    suffixes = as_suffixes(model, suffixes)
    if len(prompts) == 1 and len(responses) > 1:
        prompts = list(prompts) * len(responses)
    if len(prompts) != len(responses):
        raise InputError(f"{len(prompts)} prompts for {len(responses)} responses")
    if any(len(p) == 0 for p in prompts):
        raise InputError("empty prompt")
    weights = _weights(suffixes, model.device)
    shared = len(prompts) > 1 and len({tuple(p) for p in prompts}) == 1 and model.active_hooks() == 0
    scores, per, nlls = [], [], []
    per_chunk = max(1, batch_size // len(suffixes))
    for start in range(0, len(prompts), per_chunk):
        chunk = list(zip(prompts[start:start + per_chunk], responses[start:start + per_chunk], strict=True))
        for p, r in chunk:
            for s in suffixes:
                model.check_length(len(p) + len(r) + len(s.ids))
        if shared:
            logits, offset = _forward_shared_prompt(model, chunk[0][0], [list(r) + list(s.ids) for _, r in chunk for s in suffixes])
        else:
            ids, mask, _ = right_pad([list(p) + list(r) + list(s.ids) for p, r in chunk for s in suffixes],
                                     model.pad_token_id, model.device)
            logits, offset = model.bridge(ids, attention_mask=mask), 0
        # row i's token at absolute position t is predicted by logits[i, t - 1 - offset]
        ends = [len(p) + len(r) + len(s.ids) - 1 - offset for p, r in chunk for s in suffixes]
        s = _gap_scores(logits[torch.arange(len(ends)), torch.as_tensor(ends, device=model.device)], suffixes, temperature)
        per.append(s)
        scores.append(s @ weights)
        for j, (p, r) in enumerate(chunk):
            if len(r) == 0:
                nlls.append(torch.tensor(float("inf"), device=model.device))
                continue
            row = logits[j * len(suffixes), len(p) - 1 - offset: len(p) + len(r) - 1 - offset].float()
            tok = torch.as_tensor(list(r), device=model.device)
            nlls.append(-row.log_softmax(-1).gather(-1, tok[:, None]).mean())
    return ResponseScores(torch.cat(scores), torch.cat(per), torch.stack(nlls))


def _forward_shared_prompt(
    model: HookedChatModel, prompt: Sequence[int], rests: list[list[int]]
) -> tuple[Float[Tensor, "batch pos d_vocab"], int]:
    """Logits over ``prompt[-1:] + rest`` per row, the prompt's KV computed once.

    Returns the logits and the offset ``len(prompt) - 1`` of their first position.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    head = model.bridge(model.as_tensor(list(prompt)), past_key_values=cache)[:, -1:]
    cache.batch_repeat_interleave(len(rests))
    ids, mask, _ = right_pad(rests, model.pad_token_id, model.device)
    n = len(prompt)
    full_mask = torch.cat([torch.ones(len(rests), n, dtype=mask.dtype, device=mask.device), mask], 1)
    pos = torch.arange(n, n + ids.shape[1], device=model.device).expand(len(rests), -1)
    logits = model.bridge(ids, attention_mask=full_mask, position_ids=pos, past_key_values=cache)
    return torch.cat([head.expand(len(rests), -1, -1), logits], 1), n - 1


def suffix_score(
    model: HookedChatModel,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    suffixes: Task | str | Sequence[CompiledSuffix],
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    batch_size: int = 16,
) -> Float[Tensor, " batch"]:
    """``sigmoid((z[target] - z[contrast]) / T)`` per (prompt, response), weighted mean over suffixes."""
    return score_responses(model, prompts, responses, suffixes, temperature=temperature, batch_size=batch_size).scores


@dataclass
class SuffixGradients:
    """Gradients of the suffix loss at prompt positions, keyed by canonical hook name."""

    grads: dict[str, Float[Tensor, "pos d_model"]]  # after clipping / top-k
    raw_norms: Float[Tensor, "layer pos"]  # before clipping
    resid_norms: Float[Tensor, "layer pos"]  # residual norm at each hook (with the current control)
    loss: float
    score: float
    prompt_len: int
    model_id: str

    @property
    def hook_names(self) -> list[str]:
        return list(self.grads)

    def norms(self) -> Float[Tensor, "layer pos"]:
        return torch.stack([g.norm(dim=-1) for g in self.grads.values()])

    def step(
        self, eta: float, mode: StepMode = "relative", geometry: StepGeometry = "position", sink_ratio: float = SINK_RATIO
    ) -> Control:
        """The update ``eta * g`` as a control (sign convention: h <- h + eta * grad(loss)).

        ``absolute``: the (clipped) gradient times eta, as in the authors' code.
        ``relative``: each position's gradient scaled to unit norm times ``eta`` times a
        residual norm, so ``eta=-0.01`` moves a position by 1% of that norm downhill whatever
        the model's scale; ``geometry`` says which norm and ``sink_ratio`` which positions are
        massive-activation sinks (:mod:`workbench.selfcontrol.steps`).
        """
        return Control(gradient_step(self.grads, self.resid_norms, eta, mode, geometry, sink_ratio), self.model_id)


def suffix_gradients(
    model: HookedChatModel,
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    suffixes: Task | str | Sequence[CompiledSuffix],
    *,
    control: Control | None = None,
    loss: Loss = "score",
    point: str = "hook_resid_post",
    layers: Sequence[int] | None = None,
    clip: float | None = 1.0,
    top_k: int | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
) -> SuffixGradients:
    """One forward + one backward: d loss / d residual at every chosen hook, prompt positions only.

    ``loss="score"`` is minus the (weighted mean) suffix score; ``"ce"`` the
    cross-entropy toward the target token over the full vocabulary. ``control``
    (the current Δ) is applied while the gradient is taken. Per hook and
    position, gradients with norm above ``clip`` are scaled to unit norm;
    ``top_k`` keeps only the k largest (hook, position) entries.
    """
    suffixes = as_suffixes(model, suffixes)
    if loss not in ("score", "ce"):
        raise InputError(f"loss must be 'score' or 'ce', not {loss!r}")
    prompt_len = len(prompt_ids)
    if prompt_len == 0:
        raise InputError("empty prompt")
    names = model.hook_names(layers, point)
    if control is not None:
        control.check_model(model)
        if control.prompt_len != prompt_len:
            raise InputError(f"control covers {control.prompt_len} positions, the prompt has {prompt_len}")
    rows = [list(prompt_ids) + list(response_ids) + list(s.ids) for s in suffixes]
    for row in rows:
        model.check_length(len(row))
    ids, mask, last = right_pad(rows, model.pad_token_id, model.device)
    leaves = {}
    for n in names:
        start = control.deltas[n].detach() if control is not None and n in control.deltas else None
        base = torch.zeros(prompt_len, model.d_model, device=model.device, dtype=torch.float32) if start is None else start.float()
        leaves[n] = base.clone().requires_grad_(True)
    resid_norms: dict[str, Tensor] = {}

    def make(name: str):
        def add(resid: Tensor, hook) -> Tensor:
            head = resid[:, :prompt_len] + leaves[name].to(resid.dtype)
            resid_norms[name] = head[0].detach().float().norm(dim=-1)
            return torch.cat([head, resid[:, prompt_len:]], dim=1)

        return add

    fixed = [h for h in (control.hooks() if control is not None else []) if h[0] not in leaves]
    rows_idx = torch.arange(len(rows), device=model.device)
    # The loss reads one position per row: unembed only that one, which spares the
    # vocabulary-sized matmul (forward and backward) at every other position.
    only_last = [(UNEMBED_IN, lambda x, hook: x[rows_idx, last][:, None])] if UNEMBED_IN in model.bridge.hook_dict else []
    with torch.enable_grad(), model.bridge.hooks(fwd_hooks=[(n, make(n)) for n in names] + fixed + only_last):
        logits = model.bridge(ids, attention_mask=mask)
        logits = (logits[:, -1] if only_last else logits[rows_idx, last]).float()
        weights = _weights(suffixes, model.device)
        scores = _gap_scores(logits, suffixes, temperature)[0]
        if loss == "score":
            value = -(scores * weights).sum()
        else:
            target = torch.as_tensor([s.target_id for s in suffixes], device=model.device)
            value = (torch.nn.functional.cross_entropy(logits, target, reduction="none") * weights).sum()
        if not torch.isfinite(value):
            raise NumericalError(f"the suffix loss is {value.item()}: the control has pushed the model into NaN/inf; use smaller steps")
        grads = torch.autograd.grad(value, list(leaves.values()))
    raw = torch.stack([g.norm(dim=-1) for g in grads])
    if not torch.isfinite(raw).all():
        raise NumericalError("the suffix gradient contains NaN or inf; use smaller steps or a float32 model")
    processed = []
    for g, norm in zip(grads, raw, strict=True):
        if clip is not None:
            g = torch.where((norm > clip)[:, None], g / norm.clamp_min(1e-30)[:, None] * clip, g)
        processed.append(g)
    if top_k is not None:
        norms = torch.stack([g.norm(dim=-1) for g in processed]).flatten()
        keep = torch.zeros_like(norms, dtype=torch.bool)
        keep[norms.topk(min(top_k, norms.numel())).indices] = True
        keep = keep.view(len(processed), prompt_len)
        processed = [g * k[:, None] for g, k in zip(processed, keep, strict=True)]
    return SuffixGradients(
        grads={n: g.detach().to(model.dtype) for n, g in zip(names, processed, strict=True)},
        raw_norms=raw.detach(),
        resid_norms=torch.stack([resid_norms[n] for n in names]),
        loss=float(value.item()),
        score=float((scores * weights).sum().item()),
        prompt_len=prompt_len,
        model_id=model.model_id,
    )
