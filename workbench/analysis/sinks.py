"""The attention sink, shown apart: which prompt positions carry massive activations, and plots that
do not let them dominate.

On SmolLM2-135M the first template token's residual norm is ~25,000 from layer
11 on (~150-600 elsewhere), so any norm summed over positions (a control's
norm, a gradient's) is that one token's from there on. The rule that decides
which positions are sinks is :func:`workbench.selfcontrol.steps.sink_mask`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..selfcontrol.control import Control, layer_of
from ..selfcontrol.steps import SINK_RATIO, sink_mask, split_norms

if TYPE_CHECKING:
    from ..model.chat_model import HookedChatModel


@torch.no_grad()
def residual_norms(
    model: HookedChatModel, prompt_ids: Sequence[int], hook_names: Sequence[str]
) -> Float[Tensor, "layer pos"]:
    """The clean model's residual norm at each hook and prompt position."""
    cache = model.capture(model.as_tensor(list(prompt_ids)), list(hook_names))
    return torch.stack([cache[n][0].float().norm(dim=-1).cpu() for n in hook_names])


def prompt_sinks(
    model: HookedChatModel, prompt_ids: Sequence[int], hook_names: Sequence[str], ratio: float = SINK_RATIO
) -> Bool[Tensor, "layer pos"]:
    """Massive-activation positions of this prompt at each hook (the steps module's rule on clean residual norms)."""
    return sink_mask(residual_norms(model, prompt_ids, hook_names), ratio)


def plot_control_norms(ax: Any, control: Control, sinks: Bool[Tensor, "layer pos"], label: str = "control") -> None:
    """A control's norm per layer, on the sink positions and on all other positions, as two lines (log scale)."""
    layers = [layer_of(n) for n in control.hook_names]
    norms = control.norms().float().cpu()
    if norms.ndim == 3:  # a batched control: its first row
        norms = norms[:, 0]
    on, off = split_norms(norms, sinks.cpu())
    ax.plot(layers, off.numpy(), marker="o", ms=3, label=f"{label}: other positions")
    if bool(sinks.any()):
        ax.plot(layers, on.numpy(), marker="s", ms=3, ls="--", label=f"{label}: sink position(s)")
    values = np.concatenate([on.numpy(), off.numpy()])
    if (values > 0).any():
        ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("control norm")
    ax.legend(fontsize=7)
