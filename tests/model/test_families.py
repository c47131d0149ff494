"""The model families the architecture matrix builds: published prompt formats, special tokens, published shapes."""

import pytest
import torch

from workbench.model.families import FAMILIES, SHAPES, build_random_model, family_config

# One user turn with the generation prompt, as each model card documents it.
PUBLISHED = {
    "llama3": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
               "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "qwen2": ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
              "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    "qwen3": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "qwen3_moe": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "mistral": "<s>[INST] Hi[/INST]",
    "mixtral": "<s>[INST] Hi [/INST]",
    "gemma2": "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "gemma3": "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "phi3": "<|user|>\nHi<|end|>\n<|assistant|>\n",
    "gpt2": "Hi<|endoftext|>",
    "olmo2": "<|endoftext|><|user|>\nHi\n<|assistant|>\n",
}


def test_every_family_has_a_published_format():
    assert set(PUBLISHED) == set(FAMILIES)


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_template_renders_the_published_prompt_with_single_token_specials(family_model, arch):
    model = family_model(arch)
    text = model.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text == PUBLISHED[arch]
    for token in FAMILIES[arch].special_tokens():
        assert len(model.encode(token)) == 1, token
    assert model.decode(model.chat_ids("Hi"), skip_special_tokens=False) == PUBLISHED[arch]


def test_qwen3_history_drops_the_thinking_block(family_model):
    """Qwen 3's template keeps only the answer of earlier assistant turns, as published."""
    model = family_model("qwen3")
    text = model.render([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nA"},
                         {"role": "user", "content": "Q2"}], add_generation_prompt=True)
    assert "hm" not in text and "<|im_start|>assistant\nA<|im_end|>" in text


@pytest.mark.parametrize("shape, params", [("llama-3.2-1b", 1_235_814_400), ("llama-3.1-8b", 8_030_261_248)])
def test_published_shapes_have_the_published_parameter_count(family_model, shape, params):
    """Benchmark shapes on random weights (built on the meta device here: no memory)."""
    config = family_config("llama3", family_model("llama3").tokenizer, shape)
    model = build_random_model(config, device="meta", init_std=None)
    assert sum(p.numel() for p in model.parameters()) == params
    assert config.vocab_size == SHAPES[shape][1]["vocab_size"] and next(model.parameters()).device == torch.device("meta")
