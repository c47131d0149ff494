import pytest
import torch

import workbench as wb
from workbench.model.generation import left_pad, positions


def _prompts(model):
    return [model.chat_ids("Tell me about the sea."), model.chat_ids("Hi"), model.chat_ids("Name three colours please.")]


def test_cached_and_uncached_greedy_generation_match(tiny_any):
    prompts = _prompts(tiny_any)
    cached = tiny_any.generate(prompts, max_new_tokens=12, stop_at_eos=False)
    uncached = tiny_any.generate(prompts, max_new_tokens=12, stop_at_eos=False, use_cache=False)
    hooked = tiny_any.generate(prompts, max_new_tokens=12, stop_at_eos=False, hooks_during_decode=True)
    assert cached.tokens == uncached.tokens == hooked.tokens
    assert all(len(t) == 12 for t in cached.tokens)


def test_batched_left_padding_equals_one_at_a_time(tiny_any):
    prompts = _prompts(tiny_any)
    batched = tiny_any.generate(prompts, max_new_tokens=8, stop_at_eos=False)
    single = [tiny_any.generate([p], max_new_tokens=8, stop_at_eos=False).tokens[0] for p in prompts]
    assert batched.tokens == single


def test_left_pad_and_positions():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_resid_post_hooks_equal_hf_hidden_states(tiny_any):
    ids = tiny_any.as_tensor(tiny_any.chat_ids("Compare the hooks with HF."))
    names = tiny_any.hook_names()
    with torch.no_grad():
        _, cache = tiny_any.bridge.run_with_cache(ids, names_filter=lambda n: n in names)
        hidden = tiny_any.decoder(ids, output_hidden_states=True).hidden_states
    # hidden[l + 1] is block l's output; HF applies the final norm to the last entry
    for layer in range(tiny_any.n_layers - 1):
        torch.testing.assert_close(cache[names[layer]], hidden[layer + 1], atol=1e-5, rtol=1e-5)


def test_hooks_fire_during_prefill(tiny):
    prompt = [tiny.chat_ids("steer me")]
    plain = tiny.generate(prompt, max_new_tokens=6, stop_at_eos=False)

    def push(resid, hook):
        return resid + 50.0

    with tiny.bridge.hooks(fwd_hooks=[(tiny.hook_name(1), push)]):
        pushed = tiny.generate(prompt, max_new_tokens=6, stop_at_eos=False)
    assert pushed.tokens != plain.tokens
    again = tiny.generate(prompt, max_new_tokens=6, stop_at_eos=False)
    assert again.tokens == plain.tokens  # hooks removed on exit


def test_sampling_is_seeded(tiny):
    prompt = [tiny.chat_ids("Sample something")]
    a = tiny.generate(prompt, max_new_tokens=10, do_sample=True, seed=3, stop_at_eos=False)
    b = tiny.generate(prompt, max_new_tokens=10, do_sample=True, seed=3, stop_at_eos=False)
    c = tiny.generate(prompt, max_new_tokens=10, do_sample=True, seed=4, stop_at_eos=False)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    k1 = tiny.generate(prompt, max_new_tokens=5, do_sample=True, top_k=1, seed=9, stop_at_eos=False)
    greedy = tiny.generate(prompt, max_new_tokens=5, stop_at_eos=False)
    assert k1.tokens == greedy.tokens  # top-k 1 is greedy


def test_branches_fork_on_the_top_first_tokens(tiny):
    prompt = tiny.chat_ids("Fork here")
    out = tiny.generate([prompt], max_new_tokens=4, branches=3, stop_at_eos=False)
    with torch.no_grad():
        top = tiny.bridge(tiny.as_tensor(prompt))[0, -1].topk(3).indices.tolist()
    assert [t[0] for t in out.tokens] == top
    assert out.tokens[0] == tiny.generate([prompt], max_new_tokens=4, stop_at_eos=False).tokens[0]


def test_bad_generation_input(tiny):
    with pytest.raises(wb.InputError, match="token ids"):
        tiny.generate("a string")
    with pytest.raises(wb.InputError, match="empty prompt"):
        tiny.generate([[]])
    with pytest.raises(wb.InputError, match="list of prompts"):
        tiny.generate([1, 2, 3])
    with pytest.raises(wb.InputError, match="exceeds the context"):
        tiny.generate([[1] * 500], max_new_tokens=100)


@pytest.mark.embedded
def test_embedded_cached_generation_matches_uncached(embedded):
    prompts = [embedded.chat_ids("Write two sentences about autumn."), embedded.chat_ids("What is 7 times 8?")]
    cached = embedded.generate(prompts, max_new_tokens=24)
    uncached = embedded.generate(prompts, max_new_tokens=24, use_cache=False)
    assert cached.tokens == uncached.tokens
    assert all(len(t) > 3 for t in cached.tokens)


def test_head_ids_sit_before_the_padding():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0, device=torch.device("cpu"), head=[9, 9])
    assert ids.tolist() == [[9, 9, 5, 6, 7], [9, 9, 0, 0, 8]]
    assert positions(mask).tolist() == [[0, 1, 2, 3, 4], [0, 1, 1, 1, 2]]
