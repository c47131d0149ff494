"""Model families as data: config class, chat template and special tokens, to build random models of any of them.

Why: the workbench must work on the 1-8B instruct models users run (Llama 3,
Qwen 2.5/3, Mistral, Gemma 2/3, Phi-3, OLMo 2, mixture-of-experts models), but
no model hub is reachable here. A :class:`Family` records what makes a family
different for the workbench: its transformers config class, its chat template
in the published format (special tokens, where the template puts a BOS token,
how it treats system messages), its end-of-sequence ids and whether it has a
pad token. :func:`save_random_model` writes a folder that ``load_model(folder)``
loads exactly as it loads a downloaded model: random weights from the family's
config class, a tokenizer with that family's special tokens and template, and
a ``generation_config.json`` with the family's stop ids.

The tokenizers are the embedded SmolLM2 byte-level BPE vocabulary with the
family's special tokens added (the real vocabularies are not available
offline); what the workbench depends on, special tokens, templates and
single-token answers, is the family's own. Shapes: ``tiny`` (a few layers of
width 64, for tests) or the config of a published model (``SHAPES``, for
benchmarks on random weights).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError

# ---------------------------------------------------------------- chat templates (published formats)
# Tool-calling branches of the published templates are left out; everything a
# plain conversation renders is kept as published.

LLAMA3_TEMPLATE = (  # meta-llama/Llama-3.1-8B-Instruct (3.3 too; 3.2 writes the current date into the header)
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = \"26 Jul 2024\" %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = \"\" %}{%- endif %}"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}"
    "{{- system_message }}"
    "{{- \"<|eot_id|>\" }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

QWEN2_TEMPLATE = (  # Qwen/Qwen2.5-7B-Instruct
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\") %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

QWEN3_TEMPLATE = (  # Qwen/Qwen3-8B (also Qwen3-30B-A3B): thinking blocks, last-query bookkeeping
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}"
    "{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == \"user\" and message.content is string %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.content is string %}{%- set content = message.content %}{%- else %}{%- set content = '' %}{%- endif %}"
    "{%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == \"assistant\" %}"
    "{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is string %}{%- set reasoning_content = message.reasoning_content %}"
    "{%- else %}{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}"
    "{%- if loop.last or (not loop.last and reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

MISTRAL_TEMPLATE = (  # mistralai/Mistral-7B-Instruct-v0.3: the system message joins the last user turn
    "{%- if messages[0][\"role\"] == \"system\" %}"
    "{%- set system_message = messages[0][\"content\"] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- set ns = namespace() %}{%- set ns.index = 0 %}"
    "{%- for message in loop_messages %}"
    "{%- if (message[\"role\"] == \"user\") != (ns.index % 2 == 0) %}"
    "{{- raise_exception(\"After the optional system message, conversation roles must alternate user/assistant/user/assistant/...\") }}"
    "{%- endif %}{%- set ns.index = ns.index + 1 %}"
    "{%- endfor %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message[\"role\"] == \"user\" %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- \"[INST] \" + system_message + \"\\n\\n\" + message[\"content\"] + \"[/INST]\" }}"
    "{%- else %}{{- \"[INST] \" + message[\"content\"] + \"[/INST]\" }}{%- endif %}"
    "{%- elif message[\"role\"] == \"assistant\" %}"
    "{{- \" \" + message[\"content\"]|trim + eos_token}}"
    "{%- else %}"
    "{{- raise_exception(\"Only user and assistant roles are supported, with the exception of an initial optional system message!\") }}"
    "{%- endif %}"
    "{%- endfor %}"
)

MIXTRAL_TEMPLATE = (  # mistralai/Mixtral-8x7B-Instruct-v0.1: no system role
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

GEMMA2_TEMPLATE = (  # google/gemma-2-2b-it: no system role, assistant is "model"
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

GEMMA3_TEMPLATE = (  # google/gemma-3-1b-it: the system message prefixes the first user turn
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = \"\" -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\\n'}}{%- endif -%}"
)

PHI3_TEMPLATE = (  # microsoft/Phi-3-mini-4k-instruct (2024-07 update)
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

GPT2_TEMPLATE = (  # GPT-2 has no chat format; transformers' former default for GPT2Tokenizer
    "{% for message in messages %}{{ message.content }}{{ eos_token }}{% endfor %}"
)

OLMO2_TEMPLATE = (  # allenai/OLMo-2-1124-7B-Instruct (Tulu format)
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{% if not loop.last %}{{ '<|assistant|>\\n'  + message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ '<|assistant|>\\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}"
)

# ---------------------------------------------------------------- families

_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)


@dataclass(frozen=True)
class Family:
    """What makes a model family different for the workbench.

    ``bos``/``eos``/``pad``/``unk``: the tokenizer's special tokens (``None``: the family has none);
    ``stop``: ``generation_config.eos_token_id`` (several for most instruct models);
    ``add_bos``: the tokenizer's own encoding prepends ``bos`` (as Llama 3's and Gemma's do);
    ``specials``: further special tokens the template uses; ``tiny``: config arguments of
    the family's tiny test shape; ``example``: the published model whose format this is;
    ``scales_embeddings``: the network multiplies token embeddings by sqrt(d_model) (Gemma).
    """

    name: str
    config_class: str
    chat_template: str
    eos: str | None
    stop: tuple[str, ...]
    bos: str | None = None
    pad: str | None = None
    unk: str | None = None
    add_bos: bool = False
    specials: tuple[str, ...] = ()
    tie_word_embeddings: bool = True
    tiny: dict[str, Any] = field(default_factory=lambda: dict(_TINY))
    example: str = ""
    scales_embeddings: bool = False

    def special_tokens(self) -> list[str]:
        """Every special token of the family, each once, in a stable order."""
        tokens = [t for t in (self.bos, self.eos, self.pad, self.unk, *self.stop, *self.specials) if t]
        return list(dict.fromkeys(tokens))


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama3", "LlamaConfig", LLAMA3_TEMPLATE, eos="<|eot_id|>", bos="<|begin_of_text|>", add_bos=True,
           stop=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
           specials=("<|start_header_id|>", "<|end_header_id|>"), tie_word_embeddings=True,
           example="meta-llama/Llama-3.1-8B-Instruct"),
    Family("qwen2", "Qwen2Config", QWEN2_TEMPLATE, eos="<|im_end|>", pad="<|endoftext|>",
           stop=("<|im_end|>", "<|endoftext|>"), specials=("<|im_start|>",), tie_word_embeddings=True,
           example="Qwen/Qwen2.5-0.5B-Instruct"),
    Family("qwen3", "Qwen3Config", QWEN3_TEMPLATE, eos="<|im_end|>", pad="<|endoftext|>",
           stop=("<|im_end|>", "<|endoftext|>"), specials=("<|im_start|>", "<think>", "</think>"),
           tie_word_embeddings=False, tiny={**_TINY, "head_dim": 16}, example="Qwen/Qwen3-8B"),
    Family("mistral", "MistralConfig", MISTRAL_TEMPLATE, eos="</s>", bos="<s>", unk="<unk>", add_bos=True,
           stop=("</s>",), specials=("[INST]", "[/INST]"), tie_word_embeddings=False,
           tiny={**_TINY, "head_dim": 16, "sliding_window": None}, example="mistralai/Mistral-7B-Instruct-v0.3"),
    Family("gemma2", "Gemma2Config", GEMMA2_TEMPLATE, eos="<eos>", bos="<bos>", pad="<pad>", unk="<unk>", add_bos=True,
           stop=("<eos>", "<end_of_turn>"), specials=("<start_of_turn>",), tie_word_embeddings=True,
           tiny={**_TINY, "head_dim": 16, "sliding_window": 16, "query_pre_attn_scalar": 16},
           example="google/gemma-2-2b-it", scales_embeddings=True),
    Family("gemma3", "Gemma3TextConfig", GEMMA3_TEMPLATE, eos="<eos>", bos="<bos>", pad="<pad>", unk="<unk>",
           add_bos=True, stop=("<eos>", "<end_of_turn>"), specials=("<start_of_turn>",), tie_word_embeddings=True,
           tiny={**_TINY, "head_dim": 16, "sliding_window": 16, "query_pre_attn_scalar": 16,
                 "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]},
           example="google/gemma-3-1b-it", scales_embeddings=True),
    Family("phi3", "Phi3Config", PHI3_TEMPLATE, eos="<|endoftext|>", bos="<s>", pad="<|endoftext|>", unk="<unk>",
           stop=("<|endoftext|>", "<|assistant|>", "<|end|>"), specials=("<|system|>", "<|user|>"),
           tie_word_embeddings=False, tiny={**_TINY, "num_key_value_heads": 4, "original_max_position_embeddings": 512},
           example="microsoft/Phi-3-mini-4k-instruct"),
    Family("gpt2", "GPT2Config", GPT2_TEMPLATE, eos="<|endoftext|>", bos="<|endoftext|>", unk="<|endoftext|>",
           stop=("<|endoftext|>",), tie_word_embeddings=True,
           tiny=dict(n_embd=64, n_inner=128, n_layer=3, n_head=4, n_positions=512), example="openai-community/gpt2"),
    Family("olmo2", "Olmo2Config", OLMO2_TEMPLATE, eos="<|endoftext|>", bos="<|endoftext|>", pad="<|pad|>",
           stop=("<|endoftext|>",), tie_word_embeddings=False, tiny={**_TINY, "num_key_value_heads": 4},
           example="allenai/OLMo-2-1124-7B-Instruct"),
    Family("qwen3_moe", "Qwen3MoeConfig", QWEN3_TEMPLATE, eos="<|im_end|>", pad="<|endoftext|>",
           stop=("<|im_end|>", "<|endoftext|>"), specials=("<|im_start|>", "<think>", "</think>"),
           tie_word_embeddings=False,
           tiny={**_TINY, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                 "decoder_sparse_step": 1, "norm_topk_prob": True},
           example="Qwen/Qwen3-30B-A3B"),
    Family("mixtral", "MixtralConfig", MIXTRAL_TEMPLATE, eos="</s>", bos="<s>", unk="<unk>", add_bos=True,
           stop=("</s>",), specials=("[INST]", "[/INST]"), tie_word_embeddings=False,
           tiny={**_TINY, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
           example="mistralai/Mixtral-8x7B-Instruct-v0.1"),
]}

# Published configs for benchmarks on random weights (no download); vocab_size is raised to
# at least the tokenizer's size.
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-3.2-1b": ("llama3", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                                    max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                    rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "llama-3.1-8b": ("llama3", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                                    max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                    rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
}


def get_family(name: str | Family) -> Family:
    if isinstance(name, Family):
        return name
    if name not in FAMILIES:
        raise InputError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


# ---------------------------------------------------------------- tokenizer
def build_tokenizer(family: str | Family, folder: str | Path) -> Any:
    """Write the family's tokenizer into ``folder`` (SmolLM2's BPE vocabulary plus the family's special tokens)."""
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    from .loading import ensure_embedded_cache

    fam = get_family(family)
    backend = Tokenizer.from_file(str(ensure_embedded_cache(progress=False) / "tokenizer.json"))
    missing = [t for t in fam.special_tokens() if backend.token_to_id(t) is None]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    if fam.add_bos:
        bos_id = backend.token_to_id(fam.bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos} $B", special_tokens=[(fam.bos, bos_id)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=fam.bos, eos_token=fam.eos, pad_token=fam.pad, unk_token=fam.unk,
        chat_template=fam.chat_template, model_max_length=1 << 30)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


# ---------------------------------------------------------------- config and weights
def family_config(family: str | Family, tokenizer: Any, shape: str | dict[str, Any] = "tiny", **overrides: Any) -> Any:
    """The family's transformers config for ``shape`` (``"tiny"``, a ``SHAPES`` name, or config arguments)."""
    import transformers

    fam = get_family(family)
    if isinstance(shape, str):
        if shape == "tiny":
            args = dict(fam.tiny)
        elif shape in SHAPES:
            shape_family, args = SHAPES[shape]
            if shape_family != fam.name:
                raise InputError(f"shape {shape!r} is a {shape_family} shape, not {fam.name}")
            args = dict(args)
        else:
            raise InputError(f"unknown shape {shape!r}; use 'tiny', one of {sorted(SHAPES)} or a dict of config arguments")
    else:
        args = dict(shape)
    args.setdefault("tie_word_embeddings", fam.tie_word_embeddings)
    args.update(overrides)
    args["vocab_size"] = max(int(args.get("vocab_size", 0)), len(tokenizer))

    def token_id(token: str | None) -> int | None:
        return None if token is None else tokenizer.convert_tokens_to_ids(token)

    config = getattr(transformers, fam.config_class)(
        bos_token_id=token_id(fam.bos), eos_token_id=token_id(fam.eos), pad_token_id=token_id(fam.pad), **args)
    return config


def build_random_model(
    config: Any, *, dtype: torch.dtype = torch.float32, seed: int = 0, init_std: float | None = 0.2,
    embedding_std: float | None = None, device: str | torch.device | None = None,
) -> Any:
    """A causal LM with random weights from ``config``, seeded.

    ``init_std``: every matrix drawn from N(0, std²) (0.2 keeps a tiny model's activations and
    gradients from vanishing); ``None`` keeps the architecture's own initialisation.
    ``embedding_std``: the input embedding's own std (default ``init_std``).
    """
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if init_std is not None:
            for p in model.parameters():
                if p.ndim == 2:
                    torch.nn.init.normal_(p, std=init_std)
            if embedding_std is not None:
                torch.nn.init.normal_(model.get_input_embeddings().weight, std=embedding_std)
    return model.eval()


def save_random_model(
    family: str | Family,
    folder: str | Path,
    *,
    shape: str | dict[str, Any] = "tiny",
    seed: int = 0,
    init_std: float | None = 0.2,
    dtype: torch.dtype = torch.float32,
    stop: tuple[str, ...] | None = None,
    **overrides: Any,
) -> Path:
    """Write a random model of ``family`` as a Hugging Face folder: weights, config, tokenizer, generation config.

    ``stop`` replaces the family's end-of-sequence tokens in ``generation_config.json``
    (``()`` writes none); ``overrides`` go to the config (e.g. ``tie_word_embeddings=False``).
    """
    from transformers import GenerationConfig

    fam = get_family(family)
    folder = Path(folder)
    tokenizer = build_tokenizer(fam, folder)
    config = family_config(fam, tokenizer, shape, **overrides)
    # A network that multiplies embeddings by sqrt(d_model) gets them that much smaller, so its residual
    # stream starts at the others' scale; else it is the current token's embedding, and with tied
    # weights a random Gemma repeats one token whatever it is given.
    embedding_std = init_std / config.hidden_size**0.5 if fam.scales_embeddings and init_std is not None else None
    model = build_random_model(config, dtype=dtype, seed=seed, init_std=init_std, embedding_std=embedding_std)
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in (fam.stop if stop is None else stop)]
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, pad_token_id=config.pad_token_id,
        eos_token_id=(stop_ids[0] if len(stop_ids) == 1 else stop_ids) if stop_ids else None)
    model.save_pretrained(folder)
    (folder / "workbench-family.json").write_text(json.dumps({"family": fam.name, "example": fam.example,
                                                              "shape": shape, "seed": seed}))
    return folder
