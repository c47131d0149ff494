"""RepE reading vectors: a planted direction is recovered; API, persistence, and cosine with gradients."""

import pytest
import torch

from workbench.analysis.directions import GradientDirections, cosine, unit
from workbench.analysis.repe import (
    ReadingVector,
    gradient_cosines,
    pair_states,
    reading_direction,
    split_pairs,
)
from workbench.errors import IncompatibleArtifactError, InputError
from workbench.selfcontrol.tasks import ContrastPair, get_task

D = 64


def _planted(n: int = 12, seed: int = 0, noise: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    v = unit(torch.randn(D, generator=g))
    base = 3.0 * torch.randn(n, D, generator=g)
    strength = 1.0 + torch.rand(n, generator=g)
    target = base + strength[:, None] * v + noise * torch.randn(n, D, generator=g)
    opposite = base + noise * torch.randn(n, D, generator=g)
    return v, target, opposite


@pytest.mark.parametrize("method", ["pca", "mean"])
def test_planted_direction_is_recovered_with_the_right_sign(method):
    v, target, opposite = _planted()
    states_t = {"blocks.0.hook_resid_post": target, "blocks.1.hook_resid_post": opposite}
    states_o = {"blocks.0.hook_resid_post": opposite, "blocks.1.hook_resid_post": target}
    rv = ReadingVector.from_states(states_t, states_o, method=method, model_id="m")
    assert cosine(rv.direction(0), v) > 0.98
    assert cosine(rv.direction(1), v) < -0.98  # sides swapped: the sign follows the target side
    assert rv.fit_accuracy == {0: 1.0, 1: 1.0}
    assert rv.direction(0).norm().item() == pytest.approx(1.0, abs=1e-5)


def test_pca_recovers_a_direction_the_mean_blurs():
    """Pairs differ along v with random sign of a nuisance w: PCA finds v, its variance share is high."""
    g = torch.Generator().manual_seed(3)
    v, w = unit(torch.randn(D, generator=g)), unit(torch.randn(D, generator=g))
    diffs = 2.0 * v + 0.2 * torch.randn(30, 1, generator=g) * w
    direction, explained = reading_direction(diffs, "pca")
    assert cosine(direction, v) > 0.99 and explained > 0.9
    assert torch.isnan(torch.tensor(reading_direction(diffs, "mean")[1]))
    with pytest.raises(InputError):
        reading_direction(diffs, "ica")


def test_split_pairs():
    pairs = get_task("angry2peaceful").contrast_pairs
    fit, held = split_pairs(pairs)
    assert len(fit) + len(held) == len(pairs) and not set(fit) & set(held) and held
    assert split_pairs(pairs) == (fit, held)  # seeded
    with pytest.raises(InputError):
        split_pairs(pairs[:1])


@pytest.fixture(scope="module")
def fitted(tiny):
    fit, held = split_pairs(get_task("angry2peaceful").contrast_pairs)
    return ReadingVector.fit(tiny, "angry2peaceful", pairs=fit), held


def test_fit_on_a_model(tiny, fitted):
    rv, held = fitted
    assert rv.layers == list(range(tiny.n_layers)) and rv.task_id == "angry2peaceful"
    for name, d in rv.directions.items():
        assert d.shape == (tiny.d_model,) and d.norm().item() == pytest.approx(1.0, abs=1e-5)
        assert rv.scales[name] > 0
    acc = rv.accuracy(tiny, held)
    assert set(acc) == set(rv.layers) and all(0.0 <= a <= 1.0 for a in acc.values())


def test_fit_on_a_model_recovers_a_planted_direction(tiny):
    """Pairs that differ only in their last token ("... yes" vs "... no"): at the first layer's input the
    last-token states differ by exactly embed(yes) - embed(no), so the fit must find that direction, with the
    target side's sign, and separate held-out pairs perfectly."""
    prompts = get_task("angry2peaceful").split("train")[:10]
    pairs = [ContrastPair(p, "My answer is yes", "My answer is no") for p in prompts]
    embed = tiny.decoder.get_input_embeddings().weight.detach().float()
    planted = unit(embed[tiny.encode("My answer is yes")[-1]] - embed[tiny.encode("My answer is no")[-1]])
    rv = ReadingVector.fit(tiny, "angry2peaceful", pairs=pairs[:6], layers=[0, 1], point="hook_resid_pre")
    assert cosine(rv.direction(0), planted) > 0.999
    assert rv.fit_accuracy[0] == 1.0 and rv.accuracy(tiny, pairs[6:])[0] == 1.0
    assert abs(cosine(rv.direction(1), planted)) < 0.9  # after a block the direction is no longer the raw one
    swapped = [ContrastPair(p.prompt, p.opposite_response, p.target_response) for p in pairs[:6]]
    assert cosine(ReadingVector.fit(tiny, "angry2peaceful", pairs=swapped, layers=[0],
                                    point="hook_resid_pre").direction(0), planted) < -0.999


def test_swapping_sides_flips_the_vector(tiny):
    pairs = list(get_task("happy2sad").contrast_pairs[:6])
    swapped = [ContrastPair(p.prompt, p.opposite_response, p.target_response) for p in pairs]
    a = ReadingVector.fit(tiny, "happy2sad", pairs=pairs, layers=[1])
    b = ReadingVector.fit(tiny, "happy2sad", pairs=swapped, layers=[1])
    assert cosine(a.direction(1), b.direction(1)) == pytest.approx(-1.0, abs=1e-4)


def test_mean_token_states(tiny):
    pairs = list(get_task("happy2sad").contrast_pairs[:2])
    names = tiny.hook_names([0])
    last_t, _, _ = pair_states(tiny, pairs, names, token="last")
    mean_t, _, _ = pair_states(tiny, pairs, names, token="mean")
    assert last_t[names[0]].shape == mean_t[names[0]].shape == (2, tiny.d_model)
    assert not torch.allclose(last_t[names[0]], mean_t[names[0]])
    # the last-token state equals the residual read directly
    p = pairs[0]
    ids = tiny.chat_ids(p.prompt) + tiny.encode(p.target_response)
    with torch.no_grad():
        _, cache = tiny.bridge.run_with_cache(tiny.as_tensor(ids), names_filter=lambda n: n == names[0])
    assert torch.allclose(last_t[names[0]][0], cache[names[0]][0, -1].float(), atol=1e-4)


def test_as_control(tiny, fitted):
    rv, _ = fitted
    ids = tiny.chat_ids("Someone was rude to me.")
    control = rv.as_control(tiny, len(ids), 0.5, layers=[1])
    assert control.hook_names == ["blocks.1.hook_resid_post"]
    delta = control.deltas["blocks.1.hook_resid_post"]
    assert delta.shape == (len(ids), tiny.d_model)
    expected = 0.5 * rv.scales["blocks.1.hook_resid_post"] * rv.direction(1)
    assert torch.allclose(delta, expected.expand_as(delta), atol=1e-5)
    with torch.no_grad():
        clean = tiny.run_with_cache(tiny.as_tensor(ids), names_filter=[])[0]
        with control.applied(tiny):
            steered = tiny.run_with_cache(tiny.as_tensor(ids), names_filter=[])[0]
    assert not torch.allclose(clean, steered)
    assert set(rv.as_control(tiny, 3, 1.0).hook_names) == set(rv.hook_names)
    with pytest.raises(InputError):
        rv.as_control(tiny, 0, 1.0)


def test_save_load(tiny, tiny_mha, fitted, tmp_path):
    rv, _ = fitted
    rv.save(tmp_path / "rv")
    back = ReadingVector.load(tmp_path / "rv", tiny)
    assert back.hook_names == rv.hook_names and back.scales == rv.scales and back.fit_accuracy == rv.fit_accuracy
    assert all(torch.equal(back.directions[n], rv.directions[n].float()) for n in rv.hook_names)
    with pytest.raises(IncompatibleArtifactError):
        ReadingVector.load(tmp_path / "rv", tiny_mha)
    with pytest.raises(IncompatibleArtifactError):
        rv.as_control(tiny_mha, 3, 1.0)


def test_cosine_with_its_own_directions_is_one():
    g = torch.Generator().manual_seed(4)
    names = [f"blocks.{i}.hook_resid_post" for i in range(3)]
    vectors = unit(torch.randn(4, 3, D, generator=g))
    vectors[:, 2] = 0  # a layer with zero gradients is left out
    dirs = GradientDirections("m", names, ["a", "a", "b", "b"], ["p"] * 4, vectors, [0.5] * 4)
    by_task = dirs.by_task()
    rvs = {t: ReadingVector({n: by_task[t][i] for i, n in enumerate(names)}, {n: 1.0 for n in names}, "m", t) for t in by_task}
    result = gradient_cosines(rvs, dirs)
    assert result.layers == [0, 1]
    for values in result.same_task().values():
        assert torch.allclose(torch.tensor(values), torch.ones(2, dtype=torch.float64), atol=1e-5)
    negated = {t: ReadingVector({n: -v for n, v in rv.directions.items()}, rv.scales, "m", t) for t, rv in rvs.items()}
    assert (gradient_cosines(negated, dirs).matrix.diagonal(axis1=1, axis2=2) < -0.999).all()
    assert result.per_prompt["a"].shape == (2, 2)
    import matplotlib.pyplot as plt

    fig = result.plot()
    assert fig.axes[0].get_xlabel() == "layer"
    plt.close(fig)


@pytest.mark.embedded
def test_reading_vectors_separate_held_out_pairs_on_the_embedded_model(embedded):
    """Measured: held-out accuracy 1.0 (7 pairs) at every layer from 14 on; near chance in the first layers."""
    fit, held = split_pairs(get_task("angry2peaceful").contrast_pairs)
    rv = ReadingVector.fit(embedded, "angry2peaceful", pairs=fit, layers=[2, 16, 22])
    acc = rv.accuracy(embedded, held)
    assert acc[16] >= 6 / 7 and acc[22] >= 6 / 7
    assert acc[2] < acc[16]  # early layers separate the behaviours worse
