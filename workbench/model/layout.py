"""Where each row's prompt sits in a forward: the one mechanism controls and prefixes use to find their positions.

Why: a control is found for one prompt and must land on that prompt's tokens,
wherever padding, prefix slots or batching put them. Every forward the
workbench runs (generation's prefill and bridge decode steps, scoring,
gradients, ``capture``, ``run_with_cache``) declares a :class:`ForwardLayout`
on the model while it runs (``with model.declared(layout): ...``); a control's
hook reads it and places each row's deltas at exactly that row's prompt
positions, after checking that the row holds the prompt the control belongs
to (length and a hash of the ids). Columns are indices into the padded input
tensor of the *whole* sequence (prefill included); ``offset`` is the column of
this forward's first input, so a cached decode step (offset past the prompt)
is left alone.

Prefix slots: an applied prefix controller is model state (``model.prefix``);
every workbench forward puts its ``n`` slots at columns ``[0, n)`` of every
row, before any padding, and declares ``prefix=n``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..errors import InputError


def prompt_key(ids: Sequence[int]) -> str:
    """A short hash of a prompt's token ids: a control records it to recognise its prompt."""
    return hashlib.sha1(",".join(str(int(i)) for i in ids).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PromptRef:
    """Which prompt: its length and the hash of its ids (``None`` when only the length is known)."""

    length: int
    key: str | None = None

    @classmethod
    def of(cls, ids: Sequence[int]) -> PromptRef:
        return cls(len(ids), prompt_key(ids))

    def matches(self, other: PromptRef) -> bool:
        if self.length != other.length:
            return False
        return self.key is None or other.key is None or self.key == other.key

    def describe(self) -> str:
        return f"a {self.length}-token prompt" + (f" (ids hash {self.key})" if self.key else "")


@dataclass(frozen=True)
class RowPrompt:
    """One row's prompt: first column ``start`` and its :class:`PromptRef`."""

    start: int
    prompt: PromptRef

    @property
    def end(self) -> int:
        return self.start + self.prompt.length


@dataclass(frozen=True)
class ForwardLayout:
    """Per row of a forward, where its prompt sits; ``prefix`` slots at ``[0, prefix)``; ``offset``: first input column."""

    rows: tuple[RowPrompt, ...]
    prefix: int = 0
    offset: int = 0

    @classmethod
    def left_padded(cls, prompts: Sequence[Sequence[int]], prefix: int = 0) -> ForwardLayout:
        """Prompts left-padded to one width after ``prefix`` slots (generation's layout, see ``left_pad``)."""
        width = max(len(p) for p in prompts)
        return cls(tuple(RowPrompt(prefix + width - len(p), PromptRef.of(p)) for p in prompts), prefix)

    @classmethod
    def right_padded(cls, prompts: Sequence[Sequence[int]], prefix: int = 0) -> ForwardLayout:
        """Each row starts with ``prefix`` slots then its prompt (scoring's and gradients' layout)."""
        return cls(tuple(RowPrompt(prefix, PromptRef.of(p)) for p in prompts), prefix)

    def repeat(self, n: int) -> ForwardLayout:
        """Each row repeated ``n`` times in place (rows forked into branches)."""
        return replace(self, rows=tuple(r for r in self.rows for _ in range(n)))

    def shifted(self, offset: int) -> ForwardLayout:
        """The same rows seen by a forward whose first input is column ``offset`` (a cached step)."""
        return replace(self, offset=offset)

    def check_batch(self, batch: int) -> None:
        if len(self.rows) != batch:
            raise InputError(f"the forward has {batch} rows but declares prompts for {len(self.rows)}")


def refuse_undeclared(what: str) -> InputError:
    return InputError(
        f"{what} is applied, but this forward does not declare where its prompts sit: run it through the workbench "
        "(model.generate, score_responses, suffix_gradients, model.capture, model.run_with_cache) "
        "or inside `with model.declared(ForwardLayout(...))`"
    )
