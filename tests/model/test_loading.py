import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from sigkill import killed

import workbench as wb
from workbench.model import loading


def test_tiny_model_sizes_come_from_config(tiny):
    assert tiny.n_layers == 3 and tiny.d_model == 64
    assert tiny.bridge.cfg.n_layers == tiny.decoder.config.num_hidden_layers
    info = tiny.info()
    assert info["model_id"] == "tiny-random" and info["n_layers"] == 3 and info["dtype"] == "float32"


def test_tiny_variants_differ_in_attention(tiny, tiny_mha):
    assert tiny.config.num_key_value_heads < tiny.config.num_attention_heads
    assert tiny_mha.config.num_key_value_heads == tiny_mha.config.num_attention_heads


def test_decoder_twin_shares_the_bridge_weights(tiny):
    bridge_ptrs = {p.data_ptr() for p in tiny.bridge.parameters()}
    decoder_ptrs = {p.data_ptr() for p in tiny.decoder.parameters()}
    assert decoder_ptrs and decoder_ptrs <= bridge_ptrs
    ids = tiny.as_tensor(tiny.chat_ids("hello there"))
    with torch.no_grad():
        torch.testing.assert_close(tiny.bridge(ids), tiny.decoder(ids).logits, atol=1e-5, rtol=1e-5)


def test_classic_hook_names_exist(tiny):
    for point in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out"):
        assert tiny.hook_name(2, point) == f"blocks.2.{point}"
    with pytest.raises(wb.InputError, match="out of range"):
        tiny.hook_name(3)
    with pytest.raises(wb.InputError, match="unknown hook point"):
        tiny.hook_name(0, "hook_nothing")


def test_chat_ids_use_the_template_and_reject_bad_prompts(tiny):
    ids = tiny.chat_ids("What is 2+2?")
    text = tiny.decode(ids, skip_special_tokens=False)
    assert "What is 2+2?" in text and text.endswith("<|im_start|>assistant\n")
    with_history = tiny.chat_ids("And 3+3?", history=[{"role": "user", "content": "What is 2+2?"},
                                                      {"role": "assistant", "content": "4"}])
    assert len(with_history) > len(ids)
    with pytest.raises(wb.InputError, match="empty prompt"):
        tiny.chat_ids("   ")
    with pytest.raises(wb.InputError, match="exceeds the context"):
        tiny.chat_ids("word " * 600)


def test_unknown_model_fails_with_one_clear_error():
    start = time.perf_counter()
    with pytest.raises(wb.ModelLoadError, match="Tried") as err:
        wb.load_model("no-such-org/no-such-model")
    assert "no-such-org/no-such-model" in str(err.value)
    assert time.perf_counter() - start < 60
    with pytest.raises(wb.ModelLoadError, match="no model folder"):
        wb.load_model("./definitely/not/here")


def test_bad_device_and_dtype(tmp_path):
    with pytest.raises(wb.WorkbenchError, match="device"):
        wb.load_model("tiny-random", device="cuda:7" if torch.cuda.is_available() else "cuda")
    with pytest.raises(wb.WorkbenchError, match="unknown device"):
        wb.load_model("tiny-random", device="floppy")
    with pytest.raises(wb.WorkbenchError, match="unknown dtype"):
        wb.load_model("tiny-random", dtype="int8")
    with pytest.raises(wb.ModelLoadError, match="config.json"):
        wb.load_model(str(tmp_path))


def test_local_directory_loads_the_same_network(tiny, tmp_path):
    tiny.decoder.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    local = wb.load_model(str(tmp_path), dtype="float32")
    assert local.model_id == str(tmp_path.resolve())
    ids = tiny.as_tensor(tiny.chat_ids("same weights?"))
    with torch.no_grad():
        torch.testing.assert_close(local.bridge(ids), tiny.bridge(ids), atol=1e-5, rtol=1e-5)


def test_local_directory_honours_dtype(tiny, tmp_path):
    tiny.decoder.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    half = wb.load_model(str(tmp_path), dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and half.info()["dtype"] == "bfloat16"
    out = half.generate([half.chat_ids("hi")], max_new_tokens=3)
    assert len(out.tokens[0]) <= 3


def test_cache_marker_detects_truncated_files(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / loading._MARKER).write_text(json.dumps({"format": loading.CACHE_FORMAT, "files": {"model.safetensors": 100}}))
    assert loading._cache_is_valid(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"x" * 50)
    assert not loading._cache_is_valid(tmp_path)
    (tmp_path / loading._MARKER).write_text("{not json")
    assert not loading._cache_is_valid(tmp_path)


@pytest.mark.embedded
def test_embedded_model_answers_a_chat_prompt(embedded):
    assert embedded.model_id == wb.EMBEDDED_ID
    assert embedded.n_layers == 30 and embedded.d_model == 576
    answer = embedded.chat("What is the capital of France?", max_new_tokens=20)
    assert "Paris" in answer


@pytest.mark.embedded
def test_interrupted_conversion_leaves_no_cache_and_a_rerun_rebuilds(tmp_path):
    """SIGKILL the one-time conversion midway: no half-written cache may be taken for a good one.

    The child kills itself at its first ``os.replace`` (at the latest, the final
    rename of the finished temp folder), so the kill always lands before the
    cache is published, however loaded the machine is.
    """
    env = {**os.environ, "WORKBENCH_HOME": str(tmp_path)}
    code = "from workbench.model.loading import ensure_embedded_cache; ensure_embedded_cache(progress=False)"
    killed(code, env=env, at="os.replace", after=False)
    target = tmp_path / "models" / wb.EMBEDDED_ID
    assert not loading._cache_is_valid(target)
    # a corrupt cache left in place (e.g. a disk error) is also rebuilt
    target.mkdir(parents=True, exist_ok=True)
    (target / "model.safetensors").write_bytes(b"garbage")
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    assert loading._cache_is_valid(target)
    marker = json.loads((target / loading._MARKER).read_text())
    assert "model.safetensors" in marker["files"] and Path(target / "tokenizer.json").is_file()


def test_loading_leaves_transformers_logging_and_progress_bars_as_they_were(capfd):
    """Loading silences transformers for the load only; it used to keep it silent for the whole process."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()
    try:
        hf_logging.set_verbosity_info()
        hf_logging.enable_progress_bar()
        capfd.readouterr()
        wb.load_model("tiny-random", progress=False)
        assert "loading" not in capfd.readouterr().err.lower()  # quiet while loading ...
        assert hf_logging.get_verbosity() == hf_logging.INFO  # ... and as the user set it afterwards
        assert hf_logging.is_progress_bar_enabled() and not hub_utils.are_progress_bars_disabled()
        hf_logging.set_verbosity_warning()
        hf_logging.disable_progress_bar()
        with pytest.raises(wb.ModelLoadError):
            wb.load_model("./no-such-model-folder", progress=True)
        assert hf_logging.get_verbosity() == hf_logging.WARNING and not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity(before[0])
        (hf_logging.enable_progress_bar if before[1] else hf_logging.disable_progress_bar)()
        (hub_utils.disable_progress_bars if before[2] else hub_utils.enable_progress_bars)()


def test_model_without_pad_or_eos_token_pads_soundly(tmp_path):
    """Neither a pad nor an end-of-sequence token (many base models): padding falls back to an id that is masked anyway."""
    import dataclasses

    from workbench.model.families import FAMILIES, save_random_model

    bare = dataclasses.replace(FAMILIES["gpt2"], name="bare", eos=None, bos=None, unk=None, stop=(),
                               chat_template="{% for m in messages %}{{ m.content }}\n{% endfor %}")
    model = wb.load_model(str(save_random_model(bare, tmp_path)), progress=False)
    assert model.tokenizer.pad_token_id is None and model.tokenizer.eos_token_id is None
    assert model.eos_token_ids == []  # none invented
    assert 0 <= model.pad_token_id < model.d_vocab
    prompts = [model.chat_ids("Hi!"), model.chat_ids("A longer prompt than the first one.")]
    out = model.generate(prompts, max_new_tokens=5)
    assert [len(t) for t in out.tokens] == [5, 5]  # nothing stops generation early
    assert out.tokens == [model.generate([p], max_new_tokens=5).tokens[0] for p in prompts]
    scores = wb.suffix_score(model, prompts, out.tokens, "angry2peaceful")
    assert torch.isfinite(scores).all()


def test_architecture_the_bridge_lacks_is_one_clear_error(tmp_path):
    import dataclasses

    from workbench.model.families import FAMILIES, save_random_model

    biogpt = dataclasses.replace(FAMILIES["qwen2"], name="biogpt", config_class="BioGptConfig",
                                 tiny=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, max_position_embeddings=512))
    with pytest.raises(wb.ModelLoadError, match="BioGptForCausalLM is not among its supported architectures") as err:
        wb.load_model(str(save_random_model(biogpt, tmp_path)), progress=False)
    assert len(str(err.value)) < 400
