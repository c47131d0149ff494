"""Suffix score and suffix gradients.

Score: run the model on ``prompt + response + suffix`` (token ids) and read the
next-token logits z at the end: ``sigmoid((z[target] - z[contrast]) / T)``;
several suffixes combine by weighted mean. Gradient: one forward and one
backward for all hook points at once, of a loss on that score, with respect
to the residual stream at the prompt positions.

Sequences are right-padded so the prompt sits at positions ``[0, pos)`` in
every row, after an applied prefix's slots (causal attention makes right
padding harmless to earlier tokens); each forward declares its rows' prompts
(``model.declared``) so a control lands on its own prompt in every row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import InputError, NumericalError
from ..model.layout import ForwardLayout, PromptRef
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
    batch_size: int | None = 16,
) -> ResponseScores:
    """Score (prompt, response) pairs on the model as it stands; also each response's mean NLL.

    With no hook active (the search's clean judge) each distinct prompt of a chunk
    runs once and its KV cache is shared by all its rows (several prompts: left-padded
    into one prefill), and a repeated (prompt, response) pair is scored once. Under active
    hooks (a control being scored, an applied prefix)
    every row runs in full, right-padded, its prompt declared so the control acts at
    that row's prompt positions. ``batch_size``: rows (pairs x suffixes) per forward
    (``None``: all in one).
    """
    suffixes = as_suffixes(model, suffixes)
    if len(prompts) == 1 and len(responses) > 1:
        prompts = list(prompts) * len(responses)
    if len(prompts) != len(responses):
        raise InputError(f"{len(prompts)} prompts for {len(responses)} responses")
    if any(len(p) == 0 for p in prompts):
        raise InputError("empty prompt")
    weights = _weights(suffixes, model.device)
    clean = model.active_hooks() == 0
    pairs = [(tuple(p), tuple(r)) for p, r in zip(prompts, responses, strict=True)]
    unique = list(dict.fromkeys(pairs))
    if clean and len(unique) < len(pairs):  # small steps often leave the answer unchanged: score each pair once
        once = score_responses(model, [p for p, _ in unique], [r for _, r in unique], suffixes, temperature=temperature,
                               batch_size=batch_size)
        where = torch.as_tensor([unique.index(pair) for pair in pairs], device=once.scores.device)
        return ResponseScores(once.scores[where], once.per_suffix[where], once.nll[where])
    scores, per, nlls = [], [], []
    per_chunk = len(prompts) if batch_size is None else max(1, batch_size // len(suffixes))
    for start in range(0, len(prompts), per_chunk):
        chunk = list(zip(prompts[start:start + per_chunk], responses[start:start + per_chunk], strict=True))
        for p, r in chunk:
            for s in suffixes:
                model.check_length(model.prefix_len + len(p) + len(r) + len(s.ids))
        rows_meta = [(list(p), list(r), s) for p, r in chunk for s in suffixes]
        # the logits wanted per row, by position u in (prompt + response + suffix) predicting token u + 1:
        # the last one (the score), and on each pair's first row those predicting the response (its NLL)
        wanted = [[len(p) + len(r) + len(s.ids) - 1] + (list(range(len(p) - 1, len(p) + len(r) - 1)) if k == 0 else [])
                  for i, (p, r, s) in enumerate(rows_meta) for k in [i % len(suffixes)]]
        distinct = list(dict.fromkeys(tuple(p) for p, _ in chunk))
        if clean and len(distinct) < len(chunk):
            got = _forward_shared_prompts(model, distinct, [distinct.index(tuple(p)) for p, _, _ in rows_meta],
                                          [r + list(s.ids) for _, r, s in rows_meta], wanted)
        else:
            ids, mask, _ = right_pad([p + r + list(s.ids) for p, r, s in rows_meta], model.pad_token_id, model.device)
            ids, mask, layout = model.rows_layout(ids, mask, [len(p) for p, _, _ in rows_meta])
            n = model.prefix_len
            with model.declared(layout):
                flat = _logits_at(model, [i for i, us in enumerate(wanted) for _ in us], [n + u for us in wanted for u in us],
                                  ids, attention_mask=mask)
            got = _split(flat, wanted)
        s = _gap_scores(torch.stack([g[0] for g in got]), suffixes, temperature)
        per.append(s.to(model.device))
        scores.append(s.to(model.device) @ weights)
        for j, (_, r) in enumerate(chunk):
            if len(r) == 0:
                nlls.append(torch.tensor(float("inf"), device=model.device))
                continue
            row = got[j * len(suffixes)][1:].float()
            tok = torch.as_tensor(list(r), device=row.device)
            nlls.append(-row.log_softmax(-1).gather(-1, tok[:, None]).mean().to(model.device))
    return ResponseScores(torch.cat(scores), torch.cat(per), torch.stack(nlls))


def _logits_at(
    model: HookedChatModel, rows: Sequence[int], cols: Sequence[int], ids: Int[Tensor, "batch pos"], **forward: Any
) -> Float[Tensor, "n d_vocab"]:
    """The logits of the bridge forward over ``ids`` at ``(rows[k], cols[k])`` only.

    The unembedding is applied to those positions alone (the vocabulary-sized matmul
    costs most of a forward on a small model and is not needed elsewhere).
    """
    r, c = torch.as_tensor(list(rows), dtype=torch.long), torch.as_tensor(list(cols), dtype=torch.long)
    if UNEMBED_IN not in model.bridge.hook_dict:
        logits = model.bridge(ids, **forward)
        return logits[r.to(logits.device), c.to(logits.device)]
    with model.bridge.hooks(fwd_hooks=[(UNEMBED_IN, lambda x, hook: x[r.to(x.device), c.to(x.device)][None])]):
        return model.bridge(ids, **forward)[0]


def _split(flat: Tensor, wanted: list[list[int]]) -> list[Tensor]:
    out, at = [], 0
    for us in wanted:
        out.append(flat[at: at + len(us)])
        at += len(us)
    return out


def _forward_shared_prompts(
    model: HookedChatModel, prompts: list[tuple[int, ...]], owner: list[int], rests: list[list[int]],
    wanted: list[list[int]],
) -> list[Float[Tensor, "n d_vocab"]]:
    """Per row the logits at positions ``wanted[i]`` of ``prompt + rest``, each distinct prompt's KV computed once.

    The distinct prompts run left-padded in one prefill; row ``i`` continues prompt
    ``owner[i]`` from its cache. Position ``len(prompt) - 1`` comes from the prefill.
    """
    from transformers import DynamicCache

    from ..model.generation import left_pad, positions

    cache = DynamicCache()
    head_ids, head_mask = left_pad(prompts, model.pad_token_id, model.device)
    layout = ForwardLayout.left_padded(prompts)
    width = head_ids.shape[1]
    with model.declared(layout):
        head = _logits_at(model, range(len(prompts)), [width - 1] * len(prompts), head_ids, attention_mask=head_mask,
                          position_ids=positions(head_mask), past_key_values=cache)
    index = torch.as_tensor(owner, device=model.device)
    if len(prompts) == 1:
        cache.batch_repeat_interleave(len(rests))
    else:
        cache.batch_select_indices(index)
    ids, mask, _ = right_pad(rests, model.pad_token_id, model.device)
    full_mask = torch.cat([head_mask[index], mask], 1)
    lens = [len(prompts[o]) for o in owner]
    pos = torch.as_tensor(lens, device=model.device)[:, None] + torch.arange(ids.shape[1], device=model.device)
    rest_wanted = [[u - n for u in us if u >= n] for us, n in zip(wanted, lens, strict=True)]
    with model.declared(ForwardLayout(tuple(layout.rows[o] for o in owner)).shifted(width)):
        flat = _logits_at(model, [i for i, us in enumerate(rest_wanted) for _ in us], [c for us in rest_wanted for c in us],
                          ids, attention_mask=full_mask, position_ids=pos, past_key_values=cache)
    rest = _split(flat, rest_wanted)
    out = []
    for i, (us, n) in enumerate(zip(wanted, lens, strict=True)):
        parts, k = [], 0
        for u in us:
            if u == n - 1:
                parts.append(head[owner[i]].to(flat.device))
            else:
                parts.append(rest[i][k])
                k += 1
        out.append(torch.stack(parts))
    return out


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
    prompt: PromptRef | None = None  # the prompt the gradient was taken on; its steps belong to it

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
        return Control(gradient_step(self.grads, self.resid_norms, eta, mode, geometry, sink_ratio), self.model_id,
                       prompts=self._prompts())

    def _prompts(self) -> list[PromptRef]:
        return [self.prompt or PromptRef(self.prompt_len)]


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
    return suffix_gradients_many(model, [prompt_ids], [response_ids], suffixes, controls=[control], loss=loss,
                                 point=point, layers=layers, clip=clip, top_k=top_k, temperature=temperature)[0]


def suffix_gradients_many(
    model: HookedChatModel,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    suffixes: Task | str | Sequence[CompiledSuffix],
    *,
    controls: Sequence[Control | None] | None = None,
    loss: Loss = "score",
    point: str = "hook_resid_post",
    layers: Sequence[int] | None = None,
    clip: float | None = 1.0,
    top_k: int | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
) -> list[SuffixGradients]:
    """:func:`suffix_gradients` of several prompts in one forward and one backward (rows = prompts x suffixes).

    Rows never attend to each other, so the gradient of the summed losses with respect to
    prompt ``i``'s positions is prompt ``i``'s own gradient.
    """
    suffixes = as_suffixes(model, suffixes)
    if loss not in ("score", "ce"):
        raise InputError(f"loss must be 'score' or 'ce', not {loss!r}")
    prompts = [list(p) for p in prompts]
    if not prompts or len(responses) != len(prompts):
        raise InputError(f"{len(prompts)} prompts for {len(responses)} responses")
    if any(len(p) == 0 for p in prompts):
        raise InputError("empty prompt")
    controls = list(controls) if controls is not None else [None] * len(prompts)
    if len(controls) != len(prompts):
        raise InputError(f"{len(controls)} controls for {len(prompts)} prompts")
    names = model.hook_names(layers, point)
    refs = [PromptRef.of(p) for p in prompts]
    for c, ref in zip(controls, refs, strict=True):
        if c is None:
            continue
        c.check_model(model)
        if c.batched or not c.prompts[0].matches(ref):
            raise InputError(f"the control belongs to {c.prompts[0].describe()}, the prompt is {ref.describe()}")
    n_suffix, width = len(suffixes), max(len(p) for p in prompts)
    rows = [p + list(r) + list(s.ids) for p, r in zip(prompts, responses, strict=True) for s in suffixes]
    for row in rows:
        model.check_length(model.prefix_len + len(row))
    ids, mask, last = right_pad(rows, model.pad_token_id, model.device)
    ids, mask, layout = model.rows_layout(ids, mask, [len(p) for p in prompts for _ in suffixes])
    last = last + model.prefix_len
    device = model.device

    def start_of(c: Control | None, n: str, length: int) -> Tensor:
        d = c.deltas.get(n) if c is not None else None
        d = torch.zeros(length, model.d_model, device=device) if d is None else d.detach().float().to(device)
        return torch.nn.functional.pad(d, (0, 0, 0, width - length))

    leaves = {n: torch.stack([start_of(c, n, len(p)) for c, p in zip(controls, prompts, strict=True)]).requires_grad_(True)
              for n in names}
    # the leaves act as one batched control (one row per prompt, each forked over its suffix rows)
    moving = Control(dict(leaves), model.model_id, prompts=refs)
    others = {n for c in controls if c is not None for n in c.deltas} - set(names)
    fixed = []
    if others:
        kept = [c.restrict([n for n in c.hook_names if n in others]) if c is not None and set(c.deltas) & others
                else Control.zeros(model, p, sorted(others)) for c, p in zip(controls, prompts, strict=True)]
        fixed = Control.stack(kept).hooks(model)
    # residual norms at each prompt position, read from each prompt's first suffix row after the addition
    first = torch.as_tensor([i * n_suffix for i, p in enumerate(prompts) for _ in p], device=device)
    cols = torch.as_tensor([model.prefix_len + j for p in prompts for j in range(len(p))], device=device)
    slot = (torch.as_tensor([i for i, p in enumerate(prompts) for _ in p], device=device),
            torch.as_tensor([j for p in prompts for j in range(len(p))], device=device))
    resid_norms: dict[str, Tensor] = {}

    def observe(name: str, add):
        def observed(resid: Tensor, hook: Any) -> Tensor:
            out = add(resid, hook)
            norms = torch.zeros(len(prompts), width, device=device)
            norms[slot] = out[first.to(out.device), cols.to(out.device)].detach().float().norm(dim=-1).to(device)
            resid_norms[name] = norms
            return out

        return observed

    rows_idx = torch.arange(len(rows), device=device)
    # The loss reads one position per row: unembed only that one, which spares the
    # vocabulary-sized matmul (forward and backward) at every other position.
    only_last = [(UNEMBED_IN, lambda x, hook: x[rows_idx.to(x.device), last.to(x.device)][:, None])] \
        if UNEMBED_IN in model.bridge.hook_dict else []
    hooks = [(n, observe(n, h)) for n, h in moving.hooks(model)] + fixed + only_last
    with torch.enable_grad(), model.declared(layout), model.bridge.hooks(fwd_hooks=hooks):
        logits = model.bridge(ids, attention_mask=mask)
        logits = (logits[:, -1] if only_last else logits[rows_idx, last]).float().to(device)
        weights = _weights(suffixes, device)
        gaps = _gap_scores(logits, suffixes, temperature)  # [prompt, suffix]
        score = gaps @ weights
        if loss == "score":
            values = -score
        else:
            target = torch.as_tensor([s.target_id for s in suffixes] * len(prompts), device=device)
            ce = torch.nn.functional.cross_entropy(logits, target, reduction="none").view(len(prompts), n_suffix)
            values = ce @ weights
        if not torch.isfinite(values).all():
            raise NumericalError(f"the suffix loss is {values.tolist()}: the control has pushed the model into NaN/inf; "
                                 "use smaller steps")
        grads = torch.autograd.grad(values.sum(), list(leaves.values()))
    out = []
    for i, (p, ref) in enumerate(zip(prompts, refs, strict=True)):
        length = len(p)
        per = [g[i, :length] for g in grads]
        raw = torch.stack([g.norm(dim=-1) for g in per])
        if not torch.isfinite(raw).all():
            raise NumericalError("the suffix gradient contains NaN or inf; use smaller steps or a float32 model")
        processed = []
        for g, norm in zip(per, raw, strict=True):
            if clip is not None:
                g = torch.where((norm > clip)[:, None], g / norm.clamp_min(1e-30)[:, None] * clip, g)
            processed.append(g)
        if top_k is not None:
            norms = torch.stack([g.norm(dim=-1) for g in processed]).flatten()
            keep = torch.zeros_like(norms, dtype=torch.bool)
            keep[norms.topk(min(top_k, norms.numel())).indices] = True
            keep = keep.view(len(processed), length)
            processed = [g * k[:, None] for g, k in zip(processed, keep, strict=True)]
        out.append(SuffixGradients(
            grads={n: g.detach().to(model.dtype) for n, g in zip(names, processed, strict=True)},
            raw_norms=raw.detach(),
            resid_norms=torch.stack([resid_norms[n][i, :length] for n in names]),
            loss=float(values[i].item()),
            score=float(score[i].item()),
            prompt_len=length,
            model_id=model.model_id,
            prompt=ref,
        ))
    return out
