import pytest
import torch

from workbench.errors import InputError
from workbench.prefix.controller import PrefixController
from workbench.prefix.synthesis import capture_states, load_records, synthesize
from workbench.prefix.training import evaluate_errors, filter_records, train_prefix
from workbench.selfcontrol.search import SelfControlConfig

FAST = SelfControlConfig(iterations=1, n_steps=2, max_new_tokens=3, progress=False)


@pytest.fixture(scope="module")
def tiny_data(tiny, tmp_path_factory):
    """Four records on the tiny model; its random judge rarely improves, so tests keep no-gain records."""
    return synthesize(tiny, "angry2peaceful", "train", tmp_path_factory.mktemp("prefix") / "data", limit=4,
                      config=FAST, progress=False)














def test_filters_count_reasons(tiny, tiny_data):
    _, records = load_records(tiny_data, tiny)
    kept, reasons = filter_records(records, require_gain=False, max_shift_fraction=None)
    assert len(kept) == 4 and reasons == {}
    records[0].info["score"] = records[0].info["initial_score"] + 0.1
    records[1].info["score"] = records[1].info["initial_score"] + 0.1
    records[1].info["max_shift_fraction"] = 0.9
    kept, reasons = filter_records(records, require_gain=True, max_shift_fraction=0.5)
    assert [r.key for r in kept] == [records[0].key]
    assert reasons == {"score not improved": 2, "shift > 0.5 of norm": 1}


def test_training_lowers_the_loss_and_is_seeded(tiny, tiny_data, tmp_path):
    kwargs = dict(n_tokens=2, epochs=4, lr=5e-2, batch_size=2, require_gain=False, progress=False, residual_layers=(1,))
    c, report = train_prefix(tiny, tiny_data, **kwargs)
    assert report.n_records == 4 and report.n_val == 1 and report.n_train == 3
    assert report.best_val_mse < report.init_val_mse
    assert report.epochs[-1]["train_loss"] < report.epochs[1]["train_loss"]
    assert report.best_val_mse == min(e["val_mse"] for e in report.epochs)
    assert report.loss == "mse" and report.best_val_relative < report.init_val_relative
    _, records = load_records(tiny_data, tiny)
    val = [r for r in records if r.key in report.val_keys]
    assert evaluate_errors(tiny, c, val)["mse"] == pytest.approx(report.best_val_mse, rel=1e-4)
    # the no-prefix baseline: stored controlled states vs the clean model's
    clean = capture_states(tiny, val[0].prompt_ids)
    assert report.baseline_val_mse == pytest.approx(float(((clean - val[0].hidden) ** 2).mean()), rel=1e-4, abs=1e-9)
    again, _ = train_prefix(tiny, tiny_data, **kwargs)
    assert torch.equal(again.embeddings, c.embeddings)
    c.save(tmp_path / "c")
    saved = PrefixController.load(tmp_path / "c", tiny).meta["training"]
    assert saved["n_records"] == 4 and saved["task"] == "angry2peaceful"  # methods.py and compose read "task"
    assert saved["best_val_mse"] == report.best_val_mse and saved["settings"]["lr"] == 5e-2
    assert saved["synthesis_config"]["max_new_tokens"] == 3 and "epochs" not in saved and "val_keys" not in saved


def test_relative_loss_trains_on_relative_error(tiny, tiny_data):
    _, report = train_prefix(tiny, tiny_data, n_tokens=2, epochs=3, lr=5e-2, require_gain=False, progress=False,
                             loss="relative", layers=[1, 2])
    assert report.loss == "relative" and report.layers == [1, 2]
    assert report.best_val_relative == min(e["val_relative"] for e in report.epochs) < report.init_val_relative
    with pytest.raises(InputError, match="loss"):
        train_prefix(tiny, tiny_data, loss="l1", require_gain=False, progress=False)


def test_training_refuses_when_everything_is_filtered(tiny, tiny_data):
    with pytest.raises(InputError, match="no record passes"):
        train_prefix(tiny, tiny_data, max_shift_fraction=-1.0, require_gain=False, progress=False)


@pytest.mark.embedded
def test_trained_prefix_beats_no_prefix_on_embedded(embedded, tmp_path):
    # one search iteration (4 step sizes in one batch) on 4 prompts: about a minute on 2 free cores
    config = SelfControlConfig(iterations=1, max_new_tokens=12, progress=False)
    data = synthesize(embedded, "angry2peaceful", "train", tmp_path / "data", limit=4, config=config, progress=False)
    _, report = train_prefix(embedded, data, n_tokens=1, epochs=6, lr=1e-3, batch_size=4, val_fraction=0.34,
                             max_shift_fraction=0.7, progress=False)
    assert report.n_kept >= 2 and report.n_val >= 1, report.summary()
    assert report.best_val_mse < report.baseline_val_mse, report.summary()
