"""Hang detection (mnist_flow.search.watchdog): a stuck trial is failed and its configuration retried; the run finishes."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import optuna
import pytest
import torch
from optuna.trial import TrialState

from mnist_flow.params import SearchSpace, TrainConfig
from mnist_flow.search.study import Objective, Splits, finished_trials, open_study, run_study
from mnist_flow.search.watchdog import (
    HUNG_ATTR,
    HUNG_EXIT_CODE,
    RETRY_ATTR,
    TrialHung,
    Watchdog,
    expected_epoch_seconds,
    fallback_epoch_seconds,
    stage_timeout,
    weights,
)

SPACE = SearchSpace(hidden1_min=64, hidden1_max=64, hidden2_min=64, hidden2_max=64)


def _splits(n: int = 200) -> Splits:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 784, generator=g)
    y = x[:, :10].argmax(dim=1)
    return Splits(x[: n * 3 // 4], y[: n * 3 // 4], x[n * 3 // 4:], y[n * 3 // 4:])


def _trial(seconds: list[float], hidden1: int, hidden2: int) -> SimpleNamespace:
    return SimpleNamespace(user_attrs={"epoch_seconds": seconds}, params={"hidden1": hidden1, "hidden2": hidden2})


def test_the_expected_epoch_time_scales_the_measured_history_by_the_weights() -> None:
    history = [_trial([1.0, 2.0], 512, 256), _trial([4.0], 1024, 512)]
    per_weight = sorted([2.0 / weights((512, 256)), 4.0 / weights((1024, 512))])
    assert expected_epoch_seconds((128, 64), 50_000, history) == pytest.approx(
        sum(per_weight) / 2 * weights((128, 64)))
    # nothing measured: the pessimistic estimate, which grows with the data and the model
    assert expected_epoch_seconds((512, 256), 54_000) == fallback_epoch_seconds(54_000, (512, 256))
    assert fallback_epoch_seconds(54_000, (1024, 512)) > fallback_epoch_seconds(54_000, (512, 256)) > 10


def test_a_stage_timeout_grows_with_its_epochs_and_never_falls_below_the_floor() -> None:
    history = [_trial([1.0], 512, 256)]
    one = stage_timeout(1, (512, 256), 54_000, history, multiple=10, min_seconds=60)
    assert one == 60 + 60  # 10 x 1 s is under the floor
    assert stage_timeout(24, (512, 256), 54_000, history, multiple=10, min_seconds=60) == pytest.approx(240 + 60)
    # without history: the pessimistic estimate alone
    assert stage_timeout(8, (512, 256), 54_000, (), multiple=10, min_seconds=60) == pytest.approx(
        8 * fallback_epoch_seconds(54_000, (512, 256)) + 60)


def test_a_trial_that_hangs_is_failed_and_its_configuration_retried_and_the_run_finishes(tmp_path) -> None:
    hung: list[int] = []

    def hang_once(trial: optuna.Trial, stats) -> None:
        if not hung:  # the first trial's first epoch never returns: a busy, stuck thread
            hung.append(trial.number)
            while True:
                time.sleep(0.01)

    study = open_study(f"sqlite:///{tmp_path / 'study.db'}", "s", seed=0, max_epochs=2, enqueue_seed=False)
    watchdog = Watchdog(multiple=3, min_seconds=1.0, poll_seconds=0.1)
    objective = Objective(_splits(), SPACE, TrainConfig(epochs=2, batch_size=64), run_key="run",
                          on_epoch=hang_once, watchdog=watchdog)
    started = time.monotonic()
    run_study(study, objective, n_trials=2, run_key="run")
    elapsed = time.monotonic() - started

    (failed,) = study.get_trials(states=(TrialState.FAIL,))
    assert failed.number == hung[0] and failed.user_attrs["run_key"] == "run"
    assert failed.user_attrs[HUNG_ATTR].startswith("no progress for")
    retried = [t for t in finished_trials(study, "run") if t.user_attrs.get(RETRY_ATTR) == failed.number]
    assert len(retried) == 1 and retried[0].params == failed.params
    assert len(finished_trials(study, "run")) == 2 and len(study.trials) == 3
    assert elapsed < 60, "the hung trial was not failed within its limit"


def test_a_trial_stuck_outside_python_ends_the_process_after_a_second_limit() -> None:
    exits: list[int] = []
    released = threading.Event()

    def fake_exit(code: int) -> None:  # the real one is os._exit; here it releases the stuck wait instead
        exits.append(code)
        released.set()

    watchdog = Watchdog(multiple=1, min_seconds=0.5, poll_seconds=0.05, exit=fake_exit)
    study = optuna.create_study()
    trial = study.ask()
    trial.suggest_int("hidden1", 64, 64)
    with pytest.raises(TrialHung):
        with watchdog.watch(trial, hidden=(64, 64), train_samples=100, history=[_trial([0.1], 64, 64)]):
            released.wait(30)  # a lock wait: the asynchronous exception cannot land until it returns
    assert exits == [HUNG_EXIT_CODE]
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 1  # queued again for its run


def test_a_trial_that_makes_progress_is_left_alone() -> None:
    watchdog = Watchdog(multiple=2, min_seconds=0.3, poll_seconds=0.05, exit=lambda code: pytest.fail("exited"))
    study = optuna.create_study()
    trial = study.ask()
    with watchdog.watch(trial, hidden=(64, 64), train_samples=100) as watch:
        for _ in range(10):  # 1 s in all, each "epoch" well inside the 0.3 s floor
            time.sleep(0.1)
            watch.beat(0.1)
    assert study.get_trials(states=(TrialState.WAITING,)) == []
