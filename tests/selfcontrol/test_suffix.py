import pytest
import torch

import workbench as wb
from workbench.selfcontrol.suffix import score_responses, suffix_gradients, suffix_score
from workbench.selfcontrol.tasks import Task

TASK = Task(question="Was your answer calm?", paraphrases=("Did you stay peaceful?",))


def _case(model):
    prompt = model.chat_ids("Tell me what you think of rude drivers.")
    response = model.encode("They annoy me a lot.")
    return prompt, response


def _reference_grads(model, prompt, response, suffixes, loss):
    """Same loss computed on the hook-free HF twin; gradient w.r.t. its hidden_states."""
    rows = [prompt + response + list(s.ids) for s in suffixes]
    width = max(map(len, rows))
    ids = torch.tensor([r + [model.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.enable_grad():
        embeds = model.decoder.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = model.decoder(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
        last = torch.tensor([len(r) - 1 for r in rows])
        logits = out.logits[torch.arange(len(rows)), last]
        w = torch.tensor([s.weight for s in suffixes]) / sum(s.weight for s in suffixes)
        if loss == "score":
            gap = torch.stack([logits[i, s.target_id] - logits[i, s.contrast_id] for i, s in enumerate(suffixes)])
            value = -(torch.sigmoid(gap / 10.0) * w).sum()
        else:
            target = torch.tensor([s.target_id for s in suffixes])
            value = (torch.nn.functional.cross_entropy(logits, target, reduction="none") * w).sum()
        hidden = out.hidden_states[1:]  # block outputs (the last one is after the final norm in HF)
        grads = torch.autograd.grad(value, hidden[:-1])
    return [g[:, : len(prompt)].sum(0) for g in grads]


@pytest.mark.parametrize("loss", ["score", "ce"])
def test_hook_gradients_equal_hf_hidden_state_gradients(tiny_any, loss):
    prompt, response = _case(tiny_any)
    suffixes = TASK.compile(tiny_any, TASK.questions(paraphrases=True), weights=[2.0, 1.0])
    got = suffix_gradients(tiny_any, prompt, response, suffixes, loss=loss, clip=None)
    want = _reference_grads(tiny_any, prompt, response, suffixes, loss)
    for layer in range(tiny_any.n_layers - 1):
        g = got.grads[tiny_any.hook_name(layer)]
        assert g.shape == (len(prompt), tiny_any.d_model)
        torch.testing.assert_close(g, want[layer], atol=1e-6, rtol=1e-4)
    assert got.raw_norms.abs().max() > 0


def test_last_block_gradient_is_zero_at_prompt_positions(tiny):
    prompt, response = _case(tiny)
    got = suffix_gradients(tiny, prompt, response, TASK, clip=None)
    assert got.raw_norms[-1].abs().max() == 0
    assert got.raw_norms[:-1].abs().max() > 0


def test_clipping_and_top_k(tiny):
    prompt, response = _case(tiny)
    raw = suffix_gradients(tiny, prompt, response, TASK, clip=None)
    threshold = float(raw.raw_norms.median())
    clipped = suffix_gradients(tiny, prompt, response, TASK, clip=threshold)
    norms = clipped.norms()
    big = raw.raw_norms > threshold
    assert torch.allclose(norms[big], torch.full_like(norms[big], threshold), rtol=1e-4)
    assert torch.allclose(norms[~big], raw.raw_norms[~big], rtol=1e-4)
    top = suffix_gradients(tiny, prompt, response, TASK, clip=None, top_k=5)
    assert int((top.norms() > 0).sum()) == 5
    assert set(top.norms().flatten().topk(5).values.tolist()) == set(raw.raw_norms.flatten().topk(5).values.tolist())


def test_other_hook_points_and_layers(tiny):
    prompt, response = _case(tiny)
    for point in ("hook_resid_pre", "hook_resid_mid", "hook_attn_out", "hook_mlp_out"):
        got = suffix_gradients(tiny, prompt, response, TASK, point=point, layers=[0, 1])
        assert got.hook_names == [f"blocks.0.{point}", f"blocks.1.{point}"]
        assert got.raw_norms.shape == (2, len(prompt)) and got.raw_norms.max() > 0


def test_relative_step_moves_each_position_by_a_fraction_of_its_norm(tiny):
    prompt, response = _case(tiny)
    got = suffix_gradients(tiny, prompt, response, TASK)
    step = got.step(-0.01, "relative")
    moved = step.norms()
    nonzero = got.raw_norms > 0
    torch.testing.assert_close(moved[nonzero], 0.01 * got.resid_norms[nonzero], rtol=1e-4, atol=1e-6)
    absolute = got.step(-2.0, "absolute")
    torch.testing.assert_close(absolute.norms(), 2.0 * got.norms())


def test_descending_the_gradient_raises_the_score(tiny):
    prompt, response = _case(tiny)
    got = suffix_gradients(tiny, prompt, response, TASK, clip=None)
    up = suffix_gradients(tiny, prompt, response, TASK, control=got.step(-0.01, "relative"))
    assert up.score > got.score


def test_scores_batch_and_weights(tiny):
    prompt, response = _case(tiny)
    other = tiny.encode("I stay calm and let it go.")
    suffixes = TASK.compile(tiny, TASK.questions(paraphrases=True), weights=[3.0, 1.0])
    both = score_responses(tiny, [prompt], [response, other], suffixes)
    one = [score_responses(tiny, [prompt], [r], suffixes) for r in (response, other)]
    torch.testing.assert_close(both.scores, torch.cat([o.scores for o in one]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both.scores, both.per_suffix @ torch.tensor([0.75, 0.25]), atol=1e-6, rtol=1e-6)
    assert ((both.scores > 0) & (both.scores < 1)).all() and torch.isfinite(both.nll).all()
    assert torch.allclose(suffix_score(tiny, [prompt], [response], suffixes), one[0].scores)
    assert torch.isinf(score_responses(tiny, [prompt], [[]], suffixes).nll).all()


def _reference_score_and_nll(model, prompt, response, suffix):
    """One full forward of the hook-free HF twin, no cache: the numbers score_responses must give."""
    with torch.no_grad():
        logits = model.decoder(torch.tensor([prompt + response + list(suffix.ids)])).logits[0].float()
    gap = logits[-1, suffix.target_id] - logits[-1, suffix.contrast_id]
    logp = logits[len(prompt) - 1: len(prompt) + len(response) - 1].log_softmax(-1)
    return torch.sigmoid(gap / 10.0), -logp[torch.arange(len(response)), torch.tensor(response)].mean()


@pytest.mark.parametrize("shared", [True, False])
def test_scores_and_nll_equal_a_full_uncached_forward(tiny_any, shared):
    """Shared-prompt scoring (one prompt KV cache for every row) and per-row scoring agree with a plain forward."""
    prompt, response = _case(tiny_any)
    other_prompt = tiny_any.chat_ids("Say something kind.")
    responses = [response, tiny_any.encode("I stay calm and let it go, always.")]
    prompts = [prompt, prompt] if shared else [prompt, other_prompt]
    suffix = TASK.compile(tiny_any)[0]
    got = score_responses(tiny_any, prompts, responses, [suffix])
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        score, nll = _reference_score_and_nll(tiny_any, p, r, suffix)
        torch.testing.assert_close(got.scores[i], score, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.nll[i], nll, atol=1e-5, rtol=1e-5)


def test_scoring_under_a_control_applies_it_at_the_prompt_in_every_row(tiny):
    """A control active while scoring acts on the prompt positions of each row, batched or not."""
    prompt, response = _case(tiny)
    long = tiny.encode(" ".join(["I stay calm and let it go."] * 8))  # longer than the prompt
    assert len(long) > len(prompt)
    responses = [response, long]
    control = suffix_gradients(tiny, prompt, response, TASK).step(-0.5)
    with control.applied(tiny):
        both = score_responses(tiny, [prompt], responses, TASK)
        one = torch.cat([score_responses(tiny, [prompt], [r], TASK).scores for r in responses])
    torch.testing.assert_close(both.scores, one, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both.scores, score_responses(tiny, [prompt], responses, TASK).scores, atol=1e-6)


def test_bad_inputs(tiny):
    prompt, response = _case(tiny)
    with pytest.raises(wb.InputError, match="loss"):
        suffix_gradients(tiny, prompt, response, TASK, loss="mse")
    with pytest.raises(wb.InputError, match="responses"):
        score_responses(tiny, [prompt, prompt], [response, response, response], TASK)
    with pytest.raises(wb.InputError, match="step mode"):
        suffix_gradients(tiny, prompt, response, TASK).step(1.0, "weird")


def test_a_repeated_layer_is_refused_before_the_gradient(tiny):
    prompt, response = _case(tiny)
    with pytest.raises(wb.InputError, match=r"layer\(s\) \[1\] given more than once"):
        suffix_gradients(tiny, prompt, response, TASK, layers=[1, 0, 1])


def test_gradients_of_many_prompts_in_one_backward_equal_one_at_a_time(tiny_any):
    """Rows = prompts x suffixes, prompts of different lengths, each under its own control: each prompt's own gradient."""
    from workbench.selfcontrol.suffix import suffix_gradients_many

    prompt, response = _case(tiny_any)
    other = tiny_any.chat_ids("Hi")
    suffixes = TASK.compile(tiny_any, TASK.questions(paraphrases=True))
    control = suffix_gradients(tiny_any, prompt, response, suffixes).step(-0.05)
    prompts, responses = [prompt, other], [response, tiny_any.encode("Hello there, friend.")]
    many = suffix_gradients_many(tiny_any, prompts, responses, suffixes, controls=[control, None])
    for got, p, r, c in zip(many, prompts, responses, [control, None], strict=True):
        one = suffix_gradients(tiny_any, p, r, suffixes, control=c)
        assert got.score == pytest.approx(one.score, abs=1e-5) and got.loss == pytest.approx(one.loss, abs=1e-5)
        torch.testing.assert_close(got.resid_norms, one.resid_norms, atol=1e-4, rtol=1e-4)
        for n in one.hook_names:
            torch.testing.assert_close(got.grads[n], one.grads[n], atol=1e-6, rtol=1e-3)
    with pytest.raises(wb.InputError, match="belongs to"):  # a control for another prompt is refused
        suffix_gradients_many(tiny_any, prompts, responses, suffixes, controls=[None, control])


def test_repeated_pairs_are_scored_once_with_the_same_numbers(tiny):
    prompt, response = _case(tiny)
    other = tiny.encode("I stay calm.")
    got = score_responses(tiny, [prompt], [response, other, response, response], TASK)
    alone = score_responses(tiny, [prompt], [response, other], TASK)
    torch.testing.assert_close(got.scores, alone.scores[[0, 1, 0, 0]], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.nll, alone.nll[[0, 1, 0, 0]], atol=1e-6, rtol=1e-6)
