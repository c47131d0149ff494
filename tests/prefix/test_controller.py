import pytest
import torch

from workbench.errors import IncompatibleArtifactError, InputError
from workbench.prefix.controller import PrefixController


def _random_controller(model, n=3, residual_layers=(0, 2), seed=0):
    c = PrefixController.init(model, n, residual_layers=residual_layers)
    g = torch.Generator().manual_seed(seed)
    c.embeddings = torch.randn(c.embeddings.shape, generator=g)
    c.residuals = {k: torch.randn(v.shape, generator=g) for k, v in c.residuals.items()}
    return c


def test_init_shapes(tiny):
    c = PrefixController.init(tiny, 4, residual_layers=None)
    assert c.embeddings.shape == (4, tiny.d_model) and c.n_tokens == 4
    assert list(c.residuals) == tiny.hook_names() and all(r.shape == (4, tiny.d_model) for r in c.residuals.values())
    first = tiny.chat_ids("x")[0]  # default init: the template's first token, repeated
    torch.testing.assert_close(c.embeddings[2], tiny.decoder.get_input_embeddings().weight[first].float())
    assert PrefixController.init(tiny, 2).residuals == {}
    with pytest.raises(InputError):
        PrefixController.init(tiny, 0)


def test_applied_prefix_matches_a_manual_forward_and_cached_generation(tiny_any):
    model = tiny_any
    c = _random_controller(model)
    prompts = [model.chat_ids("hi"), model.chat_ids("a much longer prompt than the first one")]
    with c.applied(model):
        assert model.prefix_ids == [c.placeholder_id] * 3
        cached = model.generate(prompts, max_new_tokens=6, stop_at_eos=False)
        uncached = model.generate(prompts, max_new_tokens=6, use_cache=False, stop_at_eos=False)
        hooked_decode = model.generate(prompts, max_new_tokens=6, hooks_during_decode=True, stop_at_eos=False)
    assert model.prefix_ids == []
    assert cached.tokens == uncached.tokens == hooked_decode.tokens
    plain = model.generate(prompts, max_new_tokens=6, stop_at_eos=False)
    assert plain.tokens != cached.tokens  # the prefix changes the answer

    # the same greedy tokens from a hand-built forward with inputs_embeds on the HF twin
    emb = model.decoder.get_input_embeddings()
    ids = model.as_tensor(prompts[1])
    x = torch.cat([c.embeddings[None], emb(ids)], 1)
    mask = torch.ones(x.shape[:2], dtype=torch.long)
    # residual vectors need hooks, so compare without them
    c0 = PrefixController(c.embeddings, c.model_id, c.placeholder_id)
    with torch.no_grad():
        ref = model.decoder(inputs_embeds=x, attention_mask=mask).logits[0, -1]
        with c0.applied(model):
            ids, _, layout = model.rows_layout(model.as_tensor(prompts[1]))  # the slots go first, declared
            assert ids[0, :3].tolist() == [c.placeholder_id] * 3 and layout.prefix == 3
            with model.declared(layout):
                ours = model.bridge(ids)[0, -1]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_prefix_is_model_state_not_guessed_from_the_ids(tiny):
    """Every workbench forward honours an applied prefix; none guesses it from placeholder ids (the pad token)."""
    from workbench.selfcontrol.suffix import score_responses
    from workbench.selfcontrol.tasks import Task

    c = _random_controller(tiny)
    ids = tiny.chat_ids("hello")
    answer = tiny.encode("Fine, thanks.")
    starts_like_slots = [c.placeholder_id] * 3 + ids  # without a prefix applied these are just tokens
    name = tiny.hook_name(1)
    with torch.no_grad():
        clean = tiny.capture(tiny.as_tensor(starts_like_slots), [name])[name]
        plain_score = score_responses(tiny, [ids], [answer], Task(question="Calm?")).scores
        with c.applied(tiny):
            with pytest.raises(InputError, match="does not declare"):  # a raw forward is refused, not guessed
                tiny.bridge(tiny.as_tensor(ids))
            prefixed = tiny.capture(tiny.as_tensor(ids), [name])[name]  # slots placed and replaced
            score = score_responses(tiny, [ids], [answer], Task(question="Calm?")).scores
        assert tiny.prefix is None
        again = tiny.capture(tiny.as_tensor(starts_like_slots), [name])[name]
    assert prefixed.shape == clean.shape and not torch.allclose(prefixed, clean, atol=1e-3)
    torch.testing.assert_close(again, clean)
    assert not torch.allclose(score, plain_score, atol=1e-6)  # scoring under the prefix honours it
    with c.applied(tiny), pytest.raises(InputError, match="already applied"), c.applied(tiny):
        pass


def test_save_load_round_trip_and_refuses_other_model(tiny, tiny_mha, tmp_path):
    c = _random_controller(tiny)
    c.meta["training"] = {"task": "angry2peaceful", "n_records": 4}
    c.save(tmp_path / "c")
    back = PrefixController.load(tmp_path / "c", tiny)
    assert torch.equal(back.embeddings, c.embeddings) and back.placeholder_id == c.placeholder_id
    assert set(back.residuals) == set(c.residuals)
    assert all(torch.equal(back.residuals[k], c.residuals[k]) for k in c.residuals)
    assert back.meta["training"]["task"] == "angry2peaceful" and back.n_tokens == 3
    assert back.model_id == c.model_id and back.layers == c.layers
    ids = tiny.as_tensor(tiny.chat_ids("hi"))
    with torch.no_grad():
        with back.applied(tiny):
            loaded = tiny.run_with_cache(ids, names_filter=[])[0]
        with c.applied(tiny):
            original = tiny.run_with_cache(ids, names_filter=[])[0]
    torch.testing.assert_close(loaded, original)
    with pytest.raises(IncompatibleArtifactError, match="tiny-random"):
        PrefixController.load(tmp_path / "c", tiny_mha)
    with pytest.raises(InputError):
        with back.applied(tiny_mha):
            pass


def test_compose_identity_and_average(tiny):
    a, b = _random_controller(tiny, seed=1), _random_controller(tiny, seed=2)
    first = PrefixController.compose([a, b], [1, 0])
    assert torch.equal(first.embeddings, a.embeddings)
    assert all(torch.equal(first.residuals[k], a.residuals[k]) for k in a.residuals)
    ids = [tiny.chat_ids("hi")]
    with a.applied(tiny):
        ga = tiny.generate(ids, max_new_tokens=5).tokens
    with first.applied(tiny):
        gf = tiny.generate(ids, max_new_tokens=5).tokens
    assert ga == gf
    mid = PrefixController.compose([a, b], [0.5, 0.5])
    torch.testing.assert_close(mid.embeddings, (a.embeddings + b.embeddings) / 2)
    with pytest.raises(InputError):
        PrefixController.compose([a, PrefixController.init(tiny, 5)], [1, 1])
    with pytest.raises(InputError):
        PrefixController.compose([a, b], [1, -1])




def test_init_starts_from_the_hooked_embedding_on_gemma(family_model):
    """Gemma scales token embeddings by sqrt(d_model) before the hook a prefix replaces: start from that value."""
    model = family_model("gemma2")
    c = PrefixController.init(model, 2)
    first = model.chat_ids("x")[0]
    raw = model.decoder.get_input_embeddings().weight[first].float()
    torch.testing.assert_close(c.embeddings[1], raw * model.d_model**0.5, rtol=1e-3, atol=1e-4)
    # an untrained prefix is the init token itself: prefixed generation = generation after that token twice
    for text in ("Hi!", "Tell me what you think of rude drivers."):  # one at a time: see the note below
        prompt = model.chat_ids(text)
        with c.applied(model):
            prefixed = model.generate([prompt], max_new_tokens=8, stop_at_eos=False).tokens
        assert prefixed == model.generate([[first, first] + prompt], max_new_tokens=8, stop_at_eos=False).tokens
    # Note: in a left-padded batch the prefix sits before the padding, which then counts against
    # Gemma's sliding attention window, so batched prefixed rows differ from single ones (open bug).
