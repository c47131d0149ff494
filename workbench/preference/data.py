"""SelfControl as a data generator: preference pairs of a steered answer over the model's own.

Why: the paper trains the model on its own SelfControl answers by DPO, and
compares with pairs from instructed prompting. Per prompt, ``chosen`` is the
controlled answer (``mode="selfcontrol"``) or the answer the model gives when
the behaviour is asked for in words (``mode="prompt"``, :meth:`Task.instructed`,
the evaluation's ``prompt`` method); ``rejected`` is the plain answer. Both
answers are judged alike: suffix score and NLL under the clean model *given the
plain prompt*, and a pair is kept only when ``chosen`` beats ``rejected`` by at
least ``min_gain`` and passes the search's fluency guard (not degenerate, NLL
within ``fluency_margin`` of the plain answer's; an instructed answer's NLL is
taken under its own, instructed prompt, as the plain answer's is under the
plain one, since under the plain prompt it is unlikely for saying other things,
not for being broken). Every dropped prompt is counted by its reason.

Output folder (resumable; nothing is lost on interruption):

- ``prompts.jsonl``: one line per finished prompt, kept or dropped, with both
  answers, scores, NLLs and the verdict; appended and fsynced, the run's log;
- ``pairs.jsonl``: the kept pairs in TRL's conversational preference format
  (:mod:`~workbench.preference.pairs`), rewritten atomically from the log;
- ``manifest.json``: settings, counts and drop reasons, rewritten atomically;
- ``run.json``: the settings fingerprint; a rerun with other settings is refused.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from ..errors import InputError
from ..selfcontrol.search import (
    SelfControlConfig,
    SelfControlResult,
    config_dict,
    default_batch_prompts,
    fluency_problem,
    self_control_many,
)
from ..selfcontrol.suffix import score_responses
from ..selfcontrol.tasks import Task, get_task
from ..store import (
    append_jsonl,
    atomic_write_json,
    check_fingerprint,
    folder_lock,
    model_fingerprint,
    read_jsonl,
    record_key,
)
from .pairs import PAIRS_FILE, pair, write_pairs

if TYPE_CHECKING:
    from ..model.chat_model import HookedChatModel

LOG = "prompts.jsonl"
MANIFEST = "manifest.json"
FORMAT = 1
MODES = ("selfcontrol", "prompt")
KEPT = "kept"


@dataclass
class PreferenceData:
    """What :func:`preference_data` wrote: the folder, its manifest and the per-prompt log."""

    out_dir: Path
    manifest: dict[str, Any]
    records: list[dict[str, Any]]

    @property
    def n_kept(self) -> int:
        return self.manifest["n_kept"]

    @property
    def dropped(self) -> dict[str, int]:
        return self.manifest["dropped"]

    def summary(self) -> str:
        m = self.manifest
        drops = ", ".join(f"{reason} {n}" for reason, n in m["dropped"].items()) or "none"
        gain = f"; mean gain of the kept pairs {m['mean_gain_kept']:+.4f}" if m["n_kept"] else ""
        return (f"{m['n_prompts']} prompts ({m['mode']}): {m['n_kept']} pairs kept, dropped: {drops}{gain}; "
                f"{self.out_dir / PAIRS_FILE}")


def controlled_answers(model: HookedChatModel, prompts: Sequence[str], task: Task, config: SelfControlConfig) -> list[SelfControlResult]:
    """SelfControl's search on every prompt, batched (``self_control_many``): the one place the search runs for the data."""
    return self_control_many(model, list(prompts), task, config, batch_size=len(prompts), progress=False)


def _answers(model: HookedChatModel, prompts: list[list[int]], cfg: SelfControlConfig) -> list[list[int]]:
    """The answers to ``prompts`` with the search's decoding, in one left-padded generation (rows do not depend on
    their batch in float32, as the search's own original answers, made batched, do not)."""
    gen = model.generate(prompts, max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                         temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
    return [list(t) for t in gen.tokens]


def _candidates(model: HookedChatModel, prompts: Sequence[str], task: Task, cfg: SelfControlConfig, mode: str,
                style: str) -> list[dict[str, Any]]:
    """Per prompt the chosen and rejected answers with their scores and NLLs under the clean model, plain prompt."""
    if mode == "selfcontrol":
        return [{"chosen_ids": r.response_ids, "rejected_ids": r.original_ids, "chosen_score": r.score,
                 "rejected_score": r.initial_score, "chosen_nll": r.nll, "rejected_nll": r.original_nll,
                 "iterations_accepted": r.iterations_accepted, "iterations_run": len(r.iterations)}
                for r in controlled_answers(model, prompts, task, cfg)]
    suffixes = task.compile(model, task.questions(cfg.paraphrases))
    plain = [model.chat_ids(p) for p in prompts]
    instructed = [model.chat_ids(user, system=system) for user, system in (task.instructed(p, style) for p in prompts)]
    rejected, chosen = _answers(model, plain, cfg), _answers(model, instructed, cfg)
    n = len(prompts)
    # both answers under the plain prompt (scores, NLLs); the instructed one also under its own prompt (fluency)
    scored = score_responses(model, plain + plain + instructed, chosen + rejected + chosen, suffixes,
                             temperature=cfg.score_temperature)
    return [{"chosen_ids": chosen[i], "rejected_ids": rejected[i], "chosen_score": float(scored.scores[i]),
             "rejected_score": float(scored.scores[n + i]), "chosen_nll": float(scored.nll[i]),
             "rejected_nll": float(scored.nll[n + i]), "chosen_nll_own_prompt": float(scored.nll[2 * n + i])}
            for i in range(n)]


def verdict(chosen: str, rejected: str, chosen_ids: list[int], gain: float, chosen_nll: float, rejected_nll: float,
            cfg: SelfControlConfig, min_gain: float) -> str:
    """``"kept"``, or why the pair is dropped (the first reason that applies)."""
    if chosen.strip() == rejected.strip():
        return "same answer"
    reason = fluency_problem(chosen_ids, chosen_nll, rejected_nll, replace(cfg, fluency_guard=True))
    if reason is not None:
        return reason
    if not gain > 0:
        return "no gain"
    if gain < min_gain:
        return "gain below min-gain"
    return KEPT


def reason_class(status: str) -> str:
    """The counted class of a verdict (``"disfluent: NLL 2.1 > ..."`` counts as ``"disfluent"``)."""
    return status.split(":", 1)[0]


def _write_outputs(folder: Path, fingerprint: dict[str, Any], records: list[dict[str, Any]], wanted: int,
                   seconds: float) -> dict[str, Any]:
    """Rewrite ``pairs.jsonl`` and ``manifest.json`` from the log, each atomically."""
    records = sorted(records, key=lambda r: r["index"])
    kept = [r for r in records if r["status"] == KEPT]
    write_pairs([pair(r["prompt"], r["chosen"], r["rejected"], task=fingerprint["task"]["id"], key=r["key"],
                      source=fingerprint["mode"], chosen_score=r["chosen_score"], rejected_score=r["rejected_score"],
                      gain=r["gain"], chosen_nll=r["chosen_nll"], rejected_nll=r["rejected_nll"]) for r in kept], folder)
    dropped = Counter(reason_class(r["status"]) for r in records if r["status"] != KEPT)
    manifest = {
        **fingerprint,
        "n_prompts": len(records), "n_requested": wanted, "n_kept": len(kept),
        "dropped": dict(sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0]))),
        "mean_gain_kept": sum(r["gain"] for r in kept) / len(kept) if kept else None,
        "mean_gain_all": sum(r["gain"] for r in records) / len(records) if records else None,
        "seconds_per_prompt": sum(r["seconds"] for r in records) / len(records) if records else None,
        "seconds_this_run": round(seconds, 2),
        "files": {"pairs": PAIRS_FILE, "log": LOG},
    }
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def preference_data(
    model: HookedChatModel,
    task: Task | str,
    prompts_or_split: str | Sequence[str],
    out_dir: str | Path,
    *,
    limit: int | None = None,
    min_gain: float = 0.0,
    baseline: str | None = None,
    prompt_style: str = "user",
    config: SelfControlConfig | None = None,
    batch_size: int | None = None,
    restart: bool = False,
    progress: bool = True,
) -> PreferenceData:
    """Preference pairs for ``task`` from a split name or a prompt list, into ``out_dir`` (resumable).

    ``baseline=None``: SelfControl's controlled answer is ``chosen``; ``baseline="prompt"``:
    the instructed answer is. ``min_gain``: the least suffix-score gain of ``chosen`` over
    ``rejected`` for a pair to be kept. ``config``: the search settings (and, for both modes,
    the decoding and the fluency margin). ``batch_size``: prompts searched at once (each batch is
    saved when done; default :func:`~workbench.selfcontrol.search.default_batch_prompts`). A rerun with the same settings skips finished prompts;
    with other settings it raises :class:`~workbench.errors.ResumeMismatchError` unless ``restart``.
    """
    task = get_task(task)
    if baseline not in (None, "prompt"):
        raise InputError(f"baseline must be 'prompt' (instructed prompting) or left out, not {baseline!r}")
    mode = "prompt" if baseline == "prompt" else "selfcontrol"
    if mode == "prompt":
        task.instructed("x", prompt_style)  # no instruction, or a bad style: refused before any work
    if not min_gain >= 0:
        raise InputError(f"min_gain must be >= 0, got {min_gain}")
    if batch_size is None:
        batch_size = default_batch_prompts(model)
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    source = prompts_or_split if isinstance(prompts_or_split, str) else "list"
    prompts = task.split(prompts_or_split) if isinstance(prompts_or_split, str) else list(prompts_or_split)
    if limit is not None:
        if limit < 1:
            raise InputError(f"limit must be at least 1, got {limit}")
        prompts = prompts[:limit]
    if not prompts:
        raise InputError("no prompts to make preference pairs from")
    cfg = replace(config or SelfControlConfig(), progress=False)
    fingerprint = {
        "kind": "preference-data", "format": FORMAT, "model": model_fingerprint(model), "task": task.judge_dict(),
        "mode": mode, "prompt_style": prompt_style if mode == "prompt" else None, "source": source,
        "min_gain": float(min_gain), "search": config_dict(cfg),
    }
    folder = Path(out_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with folder_lock(folder):
        check_fingerprint(folder, fingerprint, restart=restart, outputs=(LOG, PAIRS_FILE, MANIFEST))
        keys = [record_key(i, p) for i, p in enumerate(prompts)]
        # this run's prompts only: a rerun with a smaller limit leaves the rest in the log, out of the pairs
        wanted = set(keys)
        records = [r for r in read_jsonl(folder / LOG) if r["key"] in wanted]
        done = {r["key"] for r in records}
        todo = [(i, k, p) for i, (k, p) in enumerate(zip(keys, prompts, strict=True)) if k not in done]
        bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc=f"preference-data [{task.id}, {mode}]",
                   unit="prompt", disable=not progress)
        kept = sum(r["status"] == KEPT for r in records)
        for b in range(0, len(todo), batch_size):
            chunk = todo[b : b + batch_size]
            chunk_start = time.perf_counter()
            found = _candidates(model, [p for _, _, p in chunk], task, cfg, mode, prompt_style)
            seconds = (time.perf_counter() - chunk_start) / len(chunk)
            for (i, key, prompt), c in zip(chunk, found, strict=True):
                chosen_ids = c.pop("chosen_ids")
                chosen, rejected = model.decode(chosen_ids), model.decode(c.pop("rejected_ids"))
                gain = c["chosen_score"] - c["rejected_score"]
                # the guard compares each answer under the prompt that produced it: an instructed answer says
                # other things than the plain one, so under the plain prompt it is less likely without being broken
                fluency_nll = c.get("chosen_nll_own_prompt", c["chosen_nll"])
                status = verdict(chosen, rejected, chosen_ids, gain, fluency_nll, c["rejected_nll"], cfg, min_gain)
                record = {"key": key, "index": i, "prompt": prompt, "status": status, "chosen": chosen,
                          "rejected": rejected, "gain": gain, **c, "seconds": round(seconds, 3)}
                append_jsonl(folder / LOG, record)
                records.append(record)
                kept += status == KEPT
            _write_outputs(folder, fingerprint, records, len(prompts), time.perf_counter() - start)
            bar.set_postfix(kept=kept)
            bar.update(len(chunk))
        bar.close()
        manifest = _write_outputs(folder, fingerprint, records, len(prompts), time.perf_counter() - start)
    return PreferenceData(folder, manifest, sorted(records, key=lambda r: r["index"]))
