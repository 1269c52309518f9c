"""The training loop: it learns, it is reproducible, its evaluation is exact, and devices are chosen right."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mnist_flow.errors import ConfigError, MnistFlowError, TrainingDiverged
from mnist_flow.params import TrainConfig
from mnist_flow.training.loop import (
    EXPLODE_FACTOR,
    Divergence,
    EvalResult,
    History,
    LossWatch,
    all_finite,
    build_model,
    evaluate,
    make_step,
    select_device,
    train_epoch,
    train_model,
)


def _problem(n: int = 600, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Learnable: the label is the index of the largest of the first 10 features (the rest is faint noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 784, generator=g)
    x[:, 10:] *= 0.05
    y = x[:, :10].argmax(dim=1)
    cut = n * 5 // 6
    return x[:cut], y[:cut], x[cut:], y[cut:]


pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = TrainConfig(hidden=(32, 16), lr=0.05, momentum=0.9, batch_size=32, epochs=4, seed=0)


def _metrics(history: History) -> list[tuple[float, float, float]]:
    return [(e.train_loss, e.val_loss, e.val_accuracy) for e in history.epochs]


def test_training_lowers_the_loss_and_beats_chance_on_a_learnable_problem():
    train_x, train_y, val_x, val_y = _problem()
    model, history = train_model(SMALL.with_(epochs=6, lr=0.1), train_x, train_y, val_x, val_y)
    losses = history.column("train_loss")
    assert losses[-1] < 0.6 * losses[0]
    assert history.last.val_loss < math.log(10) * 0.8
    assert history.last.val_accuracy > 0.3  # chance is 0.1


def test_two_runs_with_the_same_seed_give_identical_metrics_and_weights():
    data = _problem()
    model_a, history_a = train_model(SMALL, *data)
    model_b, history_b = train_model(SMALL, *data)
    assert _metrics(history_a) == _metrics(history_b)
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_different_seeds_give_different_runs():
    data = _problem()
    _, history_a = train_model(SMALL, *data)
    _, history_b = train_model(SMALL.with_(seed=1), *data)
    assert _metrics(history_a) != _metrics(history_b)


def test_the_last_short_batch_is_trained_and_weighted_by_its_size():
    # 70 samples at batch 32: batches of 32, 32 and 6; the mean loss must weight them by size.
    train_x, train_y, _, _ = _problem(84)
    x, y = train_x[:70], train_y[:70]
    config = SMALL.with_(lr=1e-12, momentum=0.0)  # weights effectively frozen: the loss is the initial one
    model = build_model(config)
    expected = F.cross_entropy(model(x), y).item()
    loss = train_epoch(make_step(model, config, x.shape[0]), x, y, 32, torch.Generator().manual_seed(0))
    assert loss == pytest.approx(expected, rel=1e-5)


def test_evaluate_matches_a_naive_per_sample_computation():
    _, _, val_x, val_y = _problem(900)
    model = build_model(SMALL)
    result = evaluate(model, val_x, val_y, batch_size=7)  # several batches and a short last one
    with torch.no_grad():
        losses, preds = [], []
        for i in range(val_x.shape[0]):
            logits = model(val_x[i:i + 1])[0]
            losses.append(float(torch.logsumexp(logits, 0) - logits[val_y[i]]))
            preds.append(int(logits.argmax()))
    assert isinstance(result, EvalResult)
    assert result.loss == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert result.predictions.tolist() == preds
    assert result.accuracy == pytest.approx(sum(p == t for p, t in zip(preds, val_y.tolist())) / len(preds))


def test_evaluate_of_an_empty_set_is_nan_not_an_error():
    model = build_model(SMALL)
    result = evaluate(model, torch.empty(0, 784), torch.empty(0, dtype=torch.long))
    assert math.isnan(result.loss) and math.isnan(result.accuracy) and result.predictions.numel() == 0


def test_onecycle_warms_up_peaks_at_the_learning_rate_and_anneals():
    train_x, train_y, _, _ = _problem()
    config = SMALL.with_(schedule="onecycle", lr=0.1, epochs=3)
    steps_per_epoch = math.ceil(train_x.shape[0] / config.batch_size)
    step = make_step(build_model(config), config, train_x.shape[0])
    seen: list[float] = []
    schedule = step.lr
    step.lr = lambda k: seen.append(schedule(k)) or seen[-1]
    generator = torch.Generator().manual_seed(0)
    for _ in range(config.epochs):
        train_epoch(step, train_x, train_y, config.batch_size, generator)
    assert len(seen) == config.epochs * steps_per_epoch
    assert seen[0] < 0.1 * config.lr
    assert max(seen) == pytest.approx(config.lr, rel=1e-2)
    assert seen[-1] < 1e-3 * config.lr


def test_fit_with_onecycle_trains_and_is_reproducible():
    data = _problem()
    config = SMALL.with_(schedule="onecycle", lr=0.1, epochs=3)
    _, history_a = train_model(config, *data)
    _, history_b = train_model(config, *data)
    assert history_a.last.train_loss < history_a.epochs[0].train_loss
    assert _metrics(history_a) == _metrics(history_b)


def test_on_epoch_sees_every_epoch_and_can_stop_training():
    seen = []

    def stop_after_two(stats):
        seen.append(stats.epoch)
        if stats.epoch == 2:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        train_model(SMALL, *_problem(), on_epoch=stop_after_two)
    assert seen == [1, 2]


@pytest.mark.parametrize("change", [{"lr": 0.0}, {"momentum": 1.0}, {"batch_size": 0}, {"epochs": 0},
                                    {"hidden": ()}, {"weight_decay": -1.0}, {"schedule": "cosine"}])
def test_invalid_training_parameters_are_refused_before_training(change):
    with pytest.raises(ConfigError):
        train_model(SMALL.with_(**change), *_problem(60))


def test_auto_device_is_the_cpu_on_a_machine_without_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")
    assert select_device("cpu") == torch.device("cpu")


def test_auto_device_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert select_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto") == torch.device("mps")


@pytest.mark.parametrize("name", ["cuda", "mps"])
def test_an_absent_device_is_a_config_error_naming_it(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=name):
        select_device(name)


def test_bf16_training_learns_like_fp32_and_stays_deterministic():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 784, generator=g)
    y = x[:, :10].argmax(dim=1)
    results = {}
    for precision in ("fp32", "bf16", "bf16"):
        config = TrainConfig(hidden=(64, 32), epochs=4, batch_size=32, lr=0.05, precision=precision)
        _, history = train_model(config, x[:500], y[:500], x[500:], y[500:])
        results.setdefault(precision, []).append(history.column("train_loss"))
    fp32, (bf16, bf16_again) = results["fp32"][0], results["bf16"]
    assert bf16 == bf16_again  # deterministic
    assert bf16[-1] < bf16[0] * 0.7  # it learns (a context spanning steps would train on stale weights)
    assert abs(bf16[-1] - fp32[-1]) < 0.25 * fp32[0]


def test_an_unknown_precision_is_refused():
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="fp8").validate()


# --- the divergence guard ------------------------------------------------------------------------------------


def _poison(x: torch.Tensor, generator_seed: int, batch_size: int, at_step: int) -> torch.Tensor:
    """A copy of ``x`` with one NaN pixel in a sample of the ``at_step``-th batch (1-based) of the first epoch."""
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(generator_seed))
    poisoned = x.clone()
    poisoned[order[(at_step - 1) * batch_size], 3] = float("nan")
    return poisoned


def test_a_poisoned_batch_stops_the_epoch_at_the_next_check_not_at_its_end():
    train_x, train_y, _, _ = _problem(600)  # 500 samples at batch 10: 50 steps, checked every 12
    x = _poison(train_x, 0, 10, at_step=5)
    step = make_step(build_model(SMALL), SMALL, x.shape[0])
    with pytest.raises(Divergence) as caught:
        train_epoch(step, x, train_y, 10, torch.Generator().manual_seed(0))
    assert math.isnan(caught.value.loss) and caught.value.how == "non-finite"
    assert step.count == 12  # the check after the poisoned step 5: the other 38 steps were not trained
    assert caught.value.samples == 120


def test_a_finite_but_exploding_loss_is_a_divergence_too():
    train_x, train_y, _, _ = _problem()
    step = make_step(build_model(SMALL), SMALL, train_x.shape[0])
    with pytest.raises(Divergence) as caught:
        train_epoch(step, train_x * 1e3, train_y, 32, torch.Generator().manual_seed(0))
    assert math.isfinite(caught.value.loss) and caught.value.loss > EXPLODE_FACTOR * math.log(10)
    assert caught.value.how == "exploding"


def test_a_loss_back_above_chance_after_it_had_learnt_is_a_relapse_and_a_falling_one_is_not():
    watch = LossWatch(10)
    for window in (2.3, 2.0, 1.2, 0.9, 1.4, 2.2):  # noisy but never back at chance: healthy
        watch.check(window, 0)
    with pytest.raises(Divergence, match="relapsed"):
        watch.check(2.4, 0)
    LossWatch(10).check(2.4, 0)  # at chance from the start (nothing learnt yet) is no relapse


def test_the_guard_does_not_change_what_is_trained():
    train_x, train_y, _, _ = _problem()
    results = []
    for check_every in (0, 1, 32):
        model = build_model(SMALL)
        step = make_step(model, SMALL, train_x.shape[0])
        generator = torch.Generator().manual_seed(0)
        losses = [train_epoch(step, train_x, train_y, 32, generator, check_every=check_every) for _ in range(2)]
        results.append((losses, [p.clone() for p in model.parameters()]))
    for losses, params in results[1:]:
        assert losses == pytest.approx(results[0][0], rel=1e-6)
        assert all(torch.equal(a, b) for a, b in zip(params, results[0][1], strict=True))


def test_an_unguarded_fit_that_diverges_raises_a_divergence_naming_the_epoch_not_a_user_error():
    train_x, train_y, val_x, val_y = _problem()
    x = train_x.clone()
    seen = []

    def poison_after_epoch_1(stats):  # a NaN arrives in the data in the middle of the fit
        seen.append(stats.epoch)
        x[7, 0] = float("nan")

    with pytest.raises(TrainingDiverged) as caught:
        train_model(SMALL, x, train_y, val_x, val_y, on_epoch=poison_after_epoch_1)
    assert seen == [1] and caught.value.epoch == 2
    assert "epoch 2 of 4" in caught.value.message and "non-finite training loss" in caught.value.message
    assert isinstance(caught.value, MnistFlowError) and not isinstance(caught.value, ConfigError)


def test_a_guarded_fit_of_a_truly_diverging_rate_recovers_and_ends_finite_and_better():
    data = _problem()
    config = SMALL.with_(lr=2.0, schedule="onecycle", epochs=6)
    with pytest.raises(TrainingDiverged, match="dead network"):  # unguarded, the rate kills every ReLU of a layer
        train_model(config, *data)
    model, history = train_model(config, *data, recover=8, keep_best=True)
    assert history.events and all("restored the state of epoch" in e for e in history.events)
    assert len(history.epochs) == config.epochs and [e.epoch for e in history.epochs] == list(range(1, 7))
    assert all(math.isfinite(e.train_loss) and math.isfinite(e.val_loss) for e in history.epochs)
    assert all_finite(model)
    assert history.best.val_accuracy > 1 / data[3].unique().numel() + 0.2  # well above chance
    assert evaluate(model, data[2], data[3]).accuracy == pytest.approx(history.best.val_accuracy)


def test_recoveries_run_out_into_a_divergence_that_says_what_was_tried():
    train_x, train_y, val_x, val_y = _problem()
    x = train_x.clone()
    x[7, 0] = float("nan")  # in every epoch's every order: no rate can fix it
    with pytest.raises(TrainingDiverged, match="3 recoveries tried before") as caught:
        train_model(SMALL, x, train_y, val_x, val_y, recover=3, keep_best=True)
    assert caught.value.epoch == 1


def test_keep_best_leaves_the_model_with_its_best_epoch_by_validation_accuracy():
    data = _problem()
    config = SMALL.with_(lr=0.15, epochs=8)  # its 7th epoch is better than its 8th
    model, history = train_model(config, *data, keep_best=True)
    accuracies = history.column("val_accuracy")
    assert history.best_epoch == 1 + accuracies.index(max(accuracies)) < config.epochs
    assert evaluate(model, data[2], data[3]).accuracy == pytest.approx(history.best.val_accuracy)
    last_model, _ = train_model(config, *data)
    assert evaluate(last_model, data[2], data[3]).accuracy == pytest.approx(history.last.val_accuracy)
    assert not history.events
