"""The training loop: it learns, it is reproducible, its evaluation is exact, and devices are chosen right."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mnist_flow.errors import ConfigError
from mnist_flow.train import EvalResult, History, build_model, evaluate, make_step, select_device, train_epoch, train_model
from mnist_flow.params import TrainConfig


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
