"""Prefix controllers as PEFT adapters, loadable with ``peft.PeftModel.from_pretrained`` and no workbench.

Two PEFT formats, because PEFT's generate treats them differently:

- ``prefix-tuning`` (default): per layer, the keys and values the workbench's prefix leaves in the KV
  cache at positions ``[0, n)``, computed by running the controller through the workbench itself
  (so residual vectors come along: they only change the prefix's own states, hence its cache).
  PEFT offsets the position ids that ``generate`` counts from the attention mask by ``n``, which is
  exactly the workbench's placement (prefix before the left padding, text positions counted from
  the mask), so greedy tokens match for single prompts and left-padded batches.
- ``prompt-tuning``: the virtual-token embeddings themselves (the controller's parameters, further
  trainable as prompt tuning). PEFT's prompt tuning drops the position ids under ``generate``
  ("Position ids are not supported ... Ignoring position ids") and the model counts positions over
  the padding, so a left-padded row's text sits ``pad`` positions further from the prefix than in
  the workbench: tokens match for a single prompt or rows of equal length only. Prompt tuning has no
  per-layer vectors, so a controller with residual vectors is refused.

Either way the adapter is made by PEFT itself (``get_peft_model`` on a weightless copy of the
model's architecture, then ``save_pretrained``): no hand-written adapter format.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import InputError
from .controller import PrefixController

if TYPE_CHECKING:
    from ..model.chat_model import HookedChatModel

PeftMethod = Literal["prefix-tuning", "prompt-tuning"]
PEFT_METHODS: tuple[str, ...] = ("prefix-tuning", "prompt-tuning")


@torch.no_grad()
def prefix_key_values(controller: PrefixController, model: HookedChatModel) -> Float[Tensor, "n_tokens kv"]:
    """The prefix's keys and values at every layer, as PEFT's prefix-tuning table ``[n_tokens, layer*2*kv_dim]``.

    One forward through the bridge with the controller applied, the prefix followed by one token
    (the prefix acts on forwards that cover more than its own positions), cropped to the prefix.
    Row layout: for each layer its keys then its values, each ``[kv_heads, head_dim]`` flattened.
    """
    from transformers import DynamicCache

    n = controller.n_tokens
    cache = DynamicCache()
    with controller.applied(model):
        ids, mask, layout = model.rows_layout(model.as_tensor([model.pad_token_id]))  # the slots, then one token
        with model.declared(layout):
            model.bridge(ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                         position_ids=torch.arange(n + 1, device=ids.device)[None], past_key_values=cache)
    per_layer = [t[0, :, :n] for layer in cache.layers for t in (layer.keys, layer.values)]  # each [kv_heads, n, head_dim]
    if len(per_layer) != 2 * model.n_layers:
        raise InputError(f"{model.model_id}: the KV cache has {len(per_layer) // 2} layers, the model {model.n_layers}; "
                         "export with method='prompt-tuning'")
    return torch.stack(per_layer).permute(2, 0, 1, 3).reshape(n, -1).float().cpu()


def export_peft(
    controller: PrefixController,
    model: HookedChatModel,
    out: str | Path,
    method: PeftMethod = "prefix-tuning",
) -> Path:
    """Write ``controller`` as a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    Load it in plain transformers: ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)``,
    where ``base`` is the model's folder or hub id (recorded as ``base_model_name_or_path``).
    """
    from peft import (
        PrefixTuningConfig,
        PromptTuningConfig,
        TaskType,
        get_peft_model,
        set_peft_model_state_dict,
    )
    from transformers import AutoModelForCausalLM

    if method not in PEFT_METHODS:
        raise InputError(f"unknown PEFT method {method!r}; use one of {', '.join(PEFT_METHODS)}")
    controller.check_model(model)
    if method == "prompt-tuning" and controller.residuals:
        raise InputError(
            f"this controller adds residual vectors at {len(controller.residuals)} hook(s) "
            f"({', '.join(list(controller.residuals)[:3])}...); PEFT prompt tuning has only input embeddings, no "
            "per-layer vectors. Export with method 'prefix-tuning' (it carries them as per-layer keys and values) "
            "or train a controller without --residual-layers")
    n = controller.n_tokens
    common = dict(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n, base_model_name_or_path=model.source or model.model_id)
    if method == "prefix-tuning":
        config = PrefixTuningConfig(prefix_projection=False, **common)
        weights = prefix_key_values(controller, model)
    else:
        config = PromptTuningConfig(token_dim=model.d_model, num_transformer_submodules=1, **common)
        weights = controller.embeddings.detach().float().cpu()
    with torch.device("meta"):  # the architecture only: PEFT reads its sizes, no weights are allocated
        skeleton = AutoModelForCausalLM.from_config(model.config)
    peft_model = get_peft_model(skeleton, config)
    encoder = peft_model.prompt_encoder["default"].embedding
    if tuple(encoder.weight.shape) != tuple(weights.shape):
        raise InputError(f"PEFT expects a {tuple(encoder.weight.shape)} table for {model.model_id}, "
                         f"the controller gives {tuple(weights.shape)}")
    encoder.to_empty(device="cpu")
    set_peft_model_state_dict(peft_model, {"prompt_embeddings": weights})
    out = Path(out)
    peft_model.save_pretrained(out)
    return out
