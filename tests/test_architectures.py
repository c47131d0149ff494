"""The architecture matrix: the workbench's whole pipeline on tiny random models of every family users run.

Each family (``workbench.model.families``) is built once per session as a
Hugging Face folder — random weights from the family's own config class, a
tokenizer with its special tokens and published chat template, its
``generation_config.json`` — and loaded with ``load_model(folder)`` as a
downloaded model would be. Per family: cached and uncached greedy generation
agree; hook residuals equal HF's ``hidden_states``; suffix gradients equal
``torch.autograd.grad`` on the HF network; a control changes generation and
agrees with and without the KV cache; a prefix controller trains and applies;
a reading vector fits; a full ``self_control`` run finishes. Then the
special cases the families bring: several end-of-sequence ids, no pad token,
a template that adds a BOS token, tied and untied embeddings, and gradients in
float16 and bfloat16.
"""

from __future__ import annotations

import pytest
import torch

import workbench as wb
from workbench.model.families import FAMILIES
from workbench.prefix.controller import embed_hooks
from workbench.prefix.synthesis import synthesize
from workbench.prefix.training import train_prefix
from workbench.selfcontrol.search import SelfControlConfig
from workbench.selfcontrol.suffix import suffix_gradients
from workbench.selfcontrol.tasks import Task

ARCHS = list(FAMILIES)
FAST = SelfControlConfig(iterations=1, n_steps=2, max_new_tokens=4, progress=False)
TASK = Task(question="Was your answer calm?", paraphrases=("Did you stay peaceful?",))
PROMPTS = ("Tell me what you think of rude drivers.", "Hi!")


def _prompts(model: wb.HookedChatModel) -> list[list[int]]:
    return [model.chat_ids(p) for p in PROMPTS]


@pytest.mark.parametrize("arch", ARCHS)
def test_shipped_tasks_compile(family_model, arch):
    model = family_model(arch)
    for task in wb.list_tasks():
        for suffix in wb.get_task(task).compile(model):
            assert suffix.target_id != suffix.contrast_id
            text = model.decode(suffix.ids, skip_special_tokens=False)
            assert text.endswith("Answer:") and wb.get_task(task).question in text


@pytest.mark.parametrize("arch", ARCHS)
def test_system_message_is_rendered_or_refused_clearly(family_model, arch):
    model = family_model(arch)
    try:
        ids = model.chat_ids("Hi!", system="Stay calm.")
    except wb.InputError as err:  # Gemma 2 and Mixtral publish templates that refuse a system turn
        assert arch in ("gemma2", "mixtral") and "user message" in str(err)
    else:
        assert arch not in ("gemma2", "mixtral")
        assert "Stay calm." in model.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_generation_equals_uncached(family_model, arch):
    model = family_model(arch)
    prompts = _prompts(model)  # two lengths: one batch is left-padded
    cached = model.generate(prompts, max_new_tokens=8, stop_at_eos=False)
    uncached = model.generate(prompts, max_new_tokens=8, stop_at_eos=False, use_cache=False)
    hooked = model.generate(prompts, max_new_tokens=8, stop_at_eos=False, hooks_during_decode=True)
    assert cached.tokens == uncached.tokens == hooked.tokens
    # padding is sound: each row alone gives the same tokens as in the padded batch
    assert [model.generate([p], max_new_tokens=8, stop_at_eos=False).tokens[0] for p in prompts] == cached.tokens


@pytest.mark.parametrize("arch", ARCHS)
def test_hook_residuals_equal_hf_hidden_states(family_model, arch):
    model = family_model(arch)
    ids = model.as_tensor(_prompts(model)[0])
    names = [model.hook_name(0, "hook_resid_pre")] + model.hook_names()
    with torch.no_grad():
        logits, cache = model.bridge.run_with_cache(ids, names_filter=lambda n: n in names)
        hf = model.decoder(ids, output_hidden_states=True)
    torch.testing.assert_close(logits, hf.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache[names[0]], hf.hidden_states[0], atol=1e-5, rtol=1e-5)
    # HF's last hidden state is taken after the final norm; every other one is a block's output
    for layer in range(model.n_layers - 1):
        torch.testing.assert_close(cache[model.hook_name(layer)], hf.hidden_states[layer + 1], atol=1e-4, rtol=1e-4)


def _reference_grads(model, prompt, response, suffixes):
    """Minus the weighted suffix score on the hook-free HF twin; its gradient w.r.t. HF's hidden states."""
    rows = [prompt + response + list(s.ids) for s in suffixes]
    width = max(map(len, rows))
    ids = torch.tensor([r + [model.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.enable_grad():
        embeds = model.decoder.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = model.decoder(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
        logits = out.logits[torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])].float()
        w = torch.tensor([s.weight for s in suffixes]) / sum(s.weight for s in suffixes)
        gap = torch.stack([logits[i, s.target_id] - logits[i, s.contrast_id] for i, s in enumerate(suffixes)])
        value = -(torch.sigmoid(gap / 10.0) * w).sum()
        grads = torch.autograd.grad(value, out.hidden_states[1:-1])
    return [g[:, : len(prompt)].sum(0) for g in grads]


@pytest.mark.parametrize("arch", ARCHS)
def test_suffix_gradients_equal_autograd_on_hf(family_model, arch):
    model = family_model(arch)
    prompt, response = _prompts(model)[0], model.encode("They annoy me a lot.")
    suffixes = TASK.compile(model, TASK.questions(paraphrases=True), weights=[2.0, 1.0])
    got = suffix_gradients(model, prompt, response, suffixes, clip=None)
    want = _reference_grads(model, prompt, response, suffixes)
    for layer in range(model.n_layers - 1):
        torch.testing.assert_close(got.grads[model.hook_name(layer)], want[layer], atol=1e-6, rtol=1e-3)
    assert got.raw_norms[:-1].max() > 0 and got.raw_norms[-1].max() == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_control_changes_generation_and_agrees_with_and_without_cache(family_model, arch):
    model = family_model(arch)
    prompt = _prompts(model)[0]
    plain = model.generate([prompt], max_new_tokens=8, stop_at_eos=False).tokens[0]
    grads = suffix_gradients(model, prompt, plain, TASK)
    control = grads.step(-0.5)
    with control.applied(model):
        cached = model.generate([prompt], max_new_tokens=8, stop_at_eos=False).tokens[0]
        uncached = model.generate([prompt], max_new_tokens=8, stop_at_eos=False, use_cache=False).tokens[0]
    assert cached == uncached
    assert cached != plain


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_controller_trains_and_applies(family_model, arch, tmp_path):
    model = family_model(arch)
    data = synthesize(model, "angry2peaceful", "train", tmp_path / "data", limit=2, config=FAST, progress=False)
    controller, report = train_prefix(model, data, n_tokens=2, epochs=1, lr=5e-2, require_gain=False,
                                      max_shift_fraction=None, progress=False)
    assert report.n_train + report.n_val == 2 and len(report.epochs) == 2
    assert torch.isfinite(controller.embeddings).all()
    prompt = _prompts(model)[0]
    seen = {}

    def keep(x, hook):
        seen.setdefault("embed", x.detach().clone())
        return x

    _, embed_hook = embed_hooks(model)
    with controller.applied(model):
        with model.bridge.hooks(fwd_hooks=[(embed_hook, keep)]):
            cached = model.generate([prompt], max_new_tokens=6, stop_at_eos=False).tokens[0]
        uncached = model.generate([prompt], max_new_tokens=6, stop_at_eos=False, use_cache=False).tokens[0]
    torch.testing.assert_close(seen["embed"][0, :2].float(), controller.embeddings.float())
    assert cached == uncached


@pytest.mark.parametrize("arch", ARCHS)
def test_reading_vector_fits_and_steers(family_model, arch):
    model = family_model(arch)
    rv = wb.ReadingVector.fit(model, "angry2peaceful", layers=[0, 1])
    assert rv.layers == [0, 1] and rv.n_pairs == len(wb.get_task("angry2peaceful").contrast_pairs)
    for direction in rv.directions.values():
        assert torch.isfinite(direction).all()
        assert float(direction.norm()) == pytest.approx(1.0, abs=1e-5)
    prompt = _prompts(model)[0]
    plain = model.generate([prompt], max_new_tokens=6, stop_at_eos=False).tokens[0]
    with rv.as_control(model, len(prompt), coefficient=4.0).applied(model):
        steered = model.generate([prompt], max_new_tokens=6, stop_at_eos=False).tokens[0]
    assert steered != plain


@pytest.mark.parametrize("arch", ARCHS)
def test_self_control_runs(family_model, arch):
    model = family_model(arch)
    result = wb.self_control(model, PROMPTS[0], "angry2peaceful", FAST)
    assert len(result.iterations) == 1 and len(result.iterations[0].candidates) == 2
    assert 0 < result.initial_score < 1 and result.score >= result.initial_score
    assert result.control.hook_names == model.hook_names()
    assert result.original_response == model.decode(result.original_ids)


# ---------------------------------------------------------------- what the families bring
def test_any_of_several_end_of_sequence_ids_stops_generation(family_model):
    model = family_model("llama3")  # Llama 3: <|end_of_text|>, <|eom_id|>, <|eot_id|>
    assert len(model.eos_token_ids) == 3 and model.tokenizer.eos_token_id == model.eos_token_ids[-1]
    prompts = _prompts(model)
    free = model.generate(prompts, max_new_tokens=6, stop_at_eos=False).tokens
    stop = free[0][3]
    first = free[0].index(stop)
    config = model.decoder.generation_config
    saved = config.eos_token_id
    try:  # the row's fourth token becomes the second of three stop ids
        config.eos_token_id = [saved[0], stop, saved[2]]
        out = model.generate(prompts, max_new_tokens=6).tokens
    finally:
        config.eos_token_id = saved
    assert out[0] == free[0][:first]
    other = free[1].index(stop) if stop in free[1] else len(free[1])
    assert out[1] == free[1][:other]


@pytest.mark.parametrize("arch", ["llama3", "gpt2", "mistral"])
def test_no_pad_token_pads_with_a_stop_id(family_model, arch):
    """The model's own tokenizer, not the bridge's normalised copy (which invents a pad token)."""
    model = family_model(arch)
    assert model.tokenizer.pad_token_id is None
    assert model.pad_token_id == model.eos_token_ids[0]
    assert model.bridge.tokenizer is not model.tokenizer


@pytest.mark.parametrize("arch", [a for a in ARCHS if FAMILIES[a].add_bos])
def test_template_bos_appears_once(family_model, arch):
    """Templates that write the BOS token, with tokenizers that would add another: one BOS, at the start only."""
    model = family_model(arch)
    bos = model.tokenizer.bos_token_id
    assert model.tokenizer("hi")["input_ids"][0] == bos  # the tokenizer itself would add one
    ids = model.chat_ids("Hello", history=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    assert ids[0] == bos and ids.count(bos) == 1
    for suffix in wb.get_task("angry2peaceful").compile(model):
        assert bos not in suffix.ids


@pytest.mark.parametrize("arch", ARCHS)
def test_tied_and_untied_embeddings(family_model, arch):
    model = family_model(arch)
    tied = model.decoder.get_input_embeddings().weight.data_ptr() == model.decoder.get_output_embeddings().weight.data_ptr()
    assert tied == FAMILIES[arch].tie_word_embeddings
    bridge_ptrs = {p.data_ptr() for p in model.bridge.parameters()}
    assert {p.data_ptr() for p in model.decoder.parameters()} <= bridge_ptrs  # the twin shares, tied or not


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama3", "phi3"])  # tied, untied
def test_half_precision_gradients_follow_float32(family_model, arch, dtype):
    full, half = family_model(arch), family_model(arch, dtype=dtype)
    assert half.dtype == dtype
    prompt, response = _prompts(full)[0], full.encode("They annoy me a lot.")
    want = suffix_gradients(full, prompt, response, TASK, clip=None)
    got = suffix_gradients(half, prompt, response, TASK, clip=None)
    assert got.score == pytest.approx(want.score, abs=5e-3)
    for name in full.hook_names()[:-1]:
        g, w = got.grads[name].float(), want.grads[name]
        assert torch.isfinite(g).all()
        cos = torch.nn.functional.cosine_similarity(g.flatten(), w.flatten(), dim=0)
        assert cos > 0.99, f"{name}: cosine {cos:.4f} with the float32 gradient"
