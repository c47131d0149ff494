"""How a suffix gradient becomes a step (a delta added to the residual stream).

A *relative* step moves each prompt position by ``|eta|`` times a norm, along
the position's unit gradient. Which norm is the step geometry:

- ``position`` (the original rule): the position's own residual norm. On
  models with massive activations this spends the step on the attention
  sink: on SmolLM2-135M the first template token's residual norm is ~25,000
  from layer 11 on against ~150-600 elsewhere, so 99% of a found control's
  energy sat on position 0 (issue 15).
- ``layer-median``: the median residual norm over the prompt's positions at
  that layer, for every position: a robust per-layer scale that no single
  position can inflate.
- ``sink-median``: the position's own norm, except at massive-activation
  positions, which get the layer median.
- ``sink-off``: the position's own norm; massive-activation positions get no
  step at all.

Massive-activation rule (detected per model, layer and prompt, from the
residual norms the gradient pass measured): a position is a *sink* at a
layer when its residual norm exceeds ``sink_ratio`` (default
:data:`SINK_RATIO` = 12) times the median norm over the prompt's positions at
that layer. Measured on SmolLM2-135M over 15 emotion test prompts: the first
token is 15.9-172x the median at layers 11-28, 8-9x at layer 29 and
5-10.3x at layers 1-8 (an ordinary first-token elevation); every other
position stays below 8.6x. 12 separates the massive activations from the
rest on both sides; 10 would sit on the first token's layer-2 value. A model
without massive activations has no sinks, and the two sink rules then equal
``position``.

Steps and the dtype (issue 11, point 5): adding a delta smaller than half a
unit in the last place of a residual element to that element leaves it
unchanged. bfloat16 keeps 8 significant bits (a value's spacing is 0.4-0.8%
of it), so a relative step of 0.1% of the residual norm mostly rounds away
(measured on the tiny model: cosine 0.62 between applied and intended delta).
:func:`dtype_steps` therefore starts the step ladder at the dtype's machine
epsilon (bf16: 2^-7 = 0.78%, fp16: 2^-10 = 0.098%, fp32: 1.2e-7) and warns
once per dtype when a requested step was below it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal, get_args

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..errors import InputError

if TYPE_CHECKING:
    from ..model.chat_model import HookedChatModel
    from .control import Control

StepGeometry = Literal["position", "layer-median", "sink-median", "sink-off"]
GEOMETRIES: tuple[str, ...] = get_args(StepGeometry)
SINK_RATIO = 12.0
"""A position whose residual norm exceeds this many times the layer's median is a massive-activation sink."""

_warned: set[str] = set()


def check_geometry(geometry: str) -> StepGeometry:
    if geometry not in GEOMETRIES:
        raise InputError(f"step geometry must be one of {', '.join(GEOMETRIES)}, not {geometry!r}")
    return geometry  # type: ignore[return-value]


def sink_mask(resid_norms: Float[Tensor, "layer pos"], ratio: float = SINK_RATIO) -> Bool[Tensor, "layer pos"]:
    """Massive-activation positions per layer: norm > ``ratio`` x the median norm of that layer's positions."""
    if ratio <= 1:
        raise InputError(f"the sink ratio must be > 1 (a multiple of the median norm), got {ratio}")
    norms = resid_norms.float()
    median = norms.median(dim=-1, keepdim=True).values
    return norms > ratio * median


def step_scales(
    resid_norms: Float[Tensor, "layer pos"], geometry: StepGeometry = "position", ratio: float = SINK_RATIO
) -> Float[Tensor, "layer pos"]:
    """The norm each position's unit gradient is multiplied by (times ``eta``) under ``geometry``."""
    check_geometry(geometry)
    norms = resid_norms.float()
    if geometry == "position":
        return norms
    median = norms.median(dim=-1, keepdim=True).values.expand_as(norms)
    if geometry == "layer-median":
        return median.clone()
    sinks = sink_mask(norms, ratio)
    if geometry == "sink-median":
        return torch.where(sinks, median, norms)
    return torch.where(sinks, torch.zeros_like(norms), norms)


def gradient_step(
    grads: Mapping[str, Float[Tensor, "pos d_model"]],
    resid_norms: Float[Tensor, "layer pos"],
    eta: float,
    mode: str = "relative",
    geometry: StepGeometry = "position",
    ratio: float = SINK_RATIO,
) -> dict[str, Float[Tensor, "pos d_model"]]:
    """Deltas ``eta * scale * unit(g)`` per hook (``relative``) or ``eta * g`` (``absolute``).

    In ``absolute`` mode the gradient's own size is the step, so only ``sink-off``
    (drop the sink positions) has a meaning there; the two median rules are refused.
    """
    check_geometry(geometry)
    if mode == "absolute":
        if geometry in ("layer-median", "sink-median"):
            raise InputError(f"step geometry {geometry!r} rescales relative steps; use step_mode='relative'")
        keep = ~sink_mask(resid_norms, ratio) if geometry == "sink-off" else None
        return {n: eta * (g if keep is None else g * keep[i][:, None].to(g.dtype))
                for i, (n, g) in enumerate(grads.items())}
    if mode != "relative":
        raise InputError(f"step mode must be 'relative' or 'absolute', not {mode!r}")
    scales = step_scales(resid_norms, geometry, ratio)
    out = {}
    for i, (name, g) in enumerate(grads.items()):
        norm = g.norm(dim=-1, keepdim=True)
        unit = torch.where(norm > 0, g / norm.clamp_min(1e-30), torch.zeros_like(g))
        out[name] = eta * unit * scales[i][:, None].to(device=g.device, dtype=g.dtype)
    return out


def sink_energy_share(
    deltas: Mapping[str, Float[Tensor, "pos d_model"]], sinks: Bool[Tensor, "layer pos"]
) -> float:
    """Fraction of the control's squared norm that lies on sink (layer, position) entries (0 for a zero control)."""
    energy = torch.stack([d.float().pow(2).sum(-1) for d in deltas.values()])
    total = float(energy.sum())
    return float(energy[sinks.to(energy.device)].sum()) / total if total > 0 else 0.0


def split_norms(
    norms: Float[Tensor, "layer pos"], sinks: Bool[Tensor, "layer pos"]
) -> tuple[Float[Tensor, " layer"], Float[Tensor, " layer"]]:
    """Per layer, the norm over sink positions and over all other positions (for plots that show the sink apart)."""
    norms = norms.float()
    on = torch.where(sinks, norms, torch.zeros_like(norms)).pow(2).sum(-1).sqrt()
    off = torch.where(sinks, torch.zeros_like(norms), norms).pow(2).sum(-1).sqrt()
    return on, off


# ---- the dtype -------------------------------------------------------------------------------------
def step_floor(dtype: torch.dtype) -> float:
    """The smallest relative step the dtype resolves: its machine epsilon (a value's spacing is eps/2..eps of it)."""
    return float(torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0


def dtype_steps(steps: Sequence[float], dtype: torch.dtype, mode: str = "relative") -> list[float]:
    """The step ladder moved up so that its smallest step is at or above the dtype's resolution.

    Relative steps only (an absolute step's size relative to the residual is not
    known here). The ladder keeps its ratios: ``[-0.001, -0.002, ...]`` in
    bfloat16 becomes ``[-2^-7, -2^-6, ...]``, so the search still tries the
    smallest step that survives the addition first. Warns once per dtype.
    """
    steps = [float(s) for s in steps]
    if mode != "relative" or not steps:
        return steps
    floor = step_floor(dtype)
    smallest = min(abs(s) for s in steps)
    if smallest >= floor or smallest == 0:
        return steps
    key = str(dtype)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"a relative step of {smallest:g} is below the resolution of {key} ({floor:.3g} of a value): the "
            f"addition would mostly round away; the step ladder starts at {floor:.3g} instead",
            stacklevel=2,
        )
    factor = floor / smallest
    return [s * factor for s in steps]


@torch.no_grad()
def applied_cosine(model: HookedChatModel, control: Control, prompt_ids: Sequence[int], hook_name: str) -> float:
    """Cosine between the delta ``control`` asks for at ``hook_name`` and the change it makes to the residual there.

    Below the dtype's resolution the addition rounds away and the cosine drops (1.0 means the delta survived).
    Read with no control upstream of ``hook_name`` (e.g. a control on that one hook), so the change is the addition's.
    """
    ids = model.as_tensor(list(prompt_ids))
    clean = model.capture(ids, [hook_name])[hook_name][0].float()
    with control.applied(model):
        moved = model.capture(ids, [hook_name])[hook_name][0].float()
    want = control.deltas[hook_name].float().to(moved.device)
    return float(torch.nn.functional.cosine_similarity((moved - clean).flatten(), want.flatten(), dim=0))
