"""Models split by a device map (accelerate), on CPU.

Without GPUs every layer computes on the CPU, but accelerate's "disk" entries
keep those layers' weights on the meta device and load them only around
their own forward. So code that reads a weight directly instead of going
through the model (``model.device`` from the first parameter, a prefix
initialised from the embedding matrix) breaks visibly here, as code that
puts a tensor on the wrong GPU would break on a multi-GPU split.
"""

from __future__ import annotations

import pytest
import torch

import workbench as wb
from workbench.analysis.repe import ReadingVector
from workbench.prefix.controller import PrefixController
from workbench.selfcontrol.search import SelfControlConfig
from workbench.selfcontrol.suffix import suffix_gradients

# the input embedding and the (tied) output layer and layer 1 offloaded, the rest on the CPU
SPLIT = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
         "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
FAST = SelfControlConfig(iterations=1, n_steps=2, max_new_tokens=4, progress=False)


@pytest.fixture(scope="module")
def split(family_folder, tmp_path_factory):
    folder = family_folder("llama3")
    return wb.load_model(str(folder), device_map=SPLIT, offload_folder=tmp_path_factory.mktemp("offload"),
                         progress=False)


def test_split_model_reports_its_placement(split, family_model):
    assert split.device == torch.device("cpu")  # the input device, although the embedding's weight is on meta
    assert split.decoder.get_input_embeddings().weight.device.type == "meta"
    assert split.device_map == SPLIT and split.info()["device_map"] == SPLIT
    assert split.d_vocab == family_model("llama3").d_vocab and split.dtype == torch.float32


def test_split_model_computes_what_one_device_computes(split, family_model):
    whole = family_model("llama3")
    prompts = [whole.chat_ids("Tell me what you think of rude drivers."), whole.chat_ids("Hi!")]
    ids = whole.as_tensor(prompts[0])
    names = whole.hook_names()
    with torch.no_grad():
        want_logits, want = whole.bridge.run_with_cache(ids, names_filter=lambda n: n in names)
        got_logits, got = split.bridge.run_with_cache(ids, names_filter=lambda n: n in names)
    torch.testing.assert_close(got_logits, want_logits)
    for name in names:
        torch.testing.assert_close(got[name], want[name])
    # generation: the decoder twin under the device map, the uncached path through the bridge
    want_tokens = whole.generate(prompts, max_new_tokens=8, stop_at_eos=False).tokens
    assert split.generate(prompts, max_new_tokens=8, stop_at_eos=False).tokens == want_tokens
    assert split.generate(prompts, max_new_tokens=8, stop_at_eos=False, use_cache=False).tokens == want_tokens


def test_controls_gradients_reading_vectors_and_prefixes_on_a_split_model(split, family_model):
    whole = family_model("llama3")
    prompt, response = whole.chat_ids("Tell me what you think of rude drivers."), whole.encode("They annoy me.")
    want = suffix_gradients(whole, prompt, response, "angry2peaceful")
    got = suffix_gradients(split, prompt, response, "angry2peaceful")
    for name in whole.hook_names():
        torch.testing.assert_close(got.grads[name], want.grads[name])
    control_whole, control_split = want.step(-0.5), got.step(-0.5)
    with control_whole.applied(whole):
        steered = whole.generate([prompt], max_new_tokens=8, stop_at_eos=False).tokens
    with control_split.applied(split):
        assert split.generate([prompt], max_new_tokens=8, stop_at_eos=False).tokens == steered
    rv_whole = ReadingVector.fit(whole, "angry2peaceful", layers=[0, 1])
    rv_split = ReadingVector.fit(split, "angry2peaceful", layers=[0, 1])
    for name in rv_whole.directions:
        torch.testing.assert_close(rv_split.directions[name], rv_whole.directions[name])
    # the embedding matrix is offloaded (meta): the prefix starts from the hooked value
    prefix_split, prefix_whole = PrefixController.init(split, 2), PrefixController.init(whole, 2)
    torch.testing.assert_close(prefix_split.embeddings, prefix_whole.embeddings)
    with prefix_whole.applied(whole):
        prefixed = whole.generate([prompt], max_new_tokens=6, stop_at_eos=False).tokens
    with prefix_split.applied(split):
        assert split.generate([prompt], max_new_tokens=6, stop_at_eos=False).tokens == prefixed
    result = wb.self_control(split, prompt, "angry2peaceful", FAST)
    assert result.initial_score == pytest.approx(wb.self_control(whole, prompt, "angry2peaceful", FAST).initial_score)


def test_auto_device_map_honours_max_memory(family_folder, family_model, tmp_path):
    """``device_map="auto"`` with a CPU budget for the embedding and a layer or two: the rest goes to disk."""
    whole = family_model("llama3")
    size = lambda module: sum(p.numel() * p.element_size() for p in module.parameters())  # noqa: E731
    budget = size(whole.decoder.get_input_embeddings()) + 2 * size(whole.decoder.model.layers[0])
    model = wb.load_model(str(family_folder("llama3")), device_map="auto", max_memory={"cpu": budget},
                          offload_folder=tmp_path, progress=False)
    assert set(model.device_map.values()) == {"cpu", "disk"}
    assert model.generate([model.chat_ids("Hi!")], max_new_tokens=3, stop_at_eos=False).tokens[0]


def test_device_map_misuse_is_refused(family_folder):
    folder = str(family_folder("llama3"))
    with pytest.raises(wb.ModelLoadError, match="not both"):
        wb.load_model(folder, device="cpu", device_map="auto")
    with pytest.raises(wb.ModelLoadError, match="unknown device_map"):
        wb.load_model(folder, device_map="everywhere")
    with pytest.raises(wb.ModelLoadError, match="need a device_map"):
        wb.load_model(folder, max_memory={"cpu": "1GB"})
    with pytest.raises(wb.ModelLoadError, match="model folder"):
        wb.load_model("tiny-random", device_map="auto")
