"""The search space, the objective's reporting and pruning, and the per-run trial budget."""

from __future__ import annotations

from collections.abc import Iterator

import optuna
import pytest
import torch

from mnist_flow.errors import ConfigError
from mnist_flow.params import SearchSpace, TrainConfig
from mnist_flow.search.study import (
    SEED_PARAMS,
    Objective,
    Splits,
    best_trial,
    finished_trials,
    open_study,
    recipe_of,
    run_study,
    study_name_for,
    suggest_config,
)


@pytest.fixture(autouse=True)
def _quiet_optuna() -> Iterator[None]:
    """Optuna at WARNING for these tests only: the previous verbosity comes back afterwards."""
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(previous)


def _splits(n: int = 200, seed: int = 0) -> Splits:
    """A learnable toy problem: the label is the index of the brightest of 10 pixel blocks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 784, generator=g)
    y = x[:, :10].argmax(dim=1)
    return Splits(x[: n * 3 // 4], y[: n * 3 // 4], x[n * 3 // 4:], y[n * 3 // 4:])


def test_suggest_config_stays_inside_the_bounds_and_keeps_the_fixed_recipe():
    space = SearchSpace(lr_min=0.01, lr_max=0.02, hidden1_min=64, hidden1_max=128, hidden2_min=64, hidden2_max=64)
    base = TrainConfig(batch_size=32, weight_decay=1e-3, schedule="onecycle", epochs=3)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        trial = study.ask()
        config = suggest_config(trial, space, base)
        assert 0.01 <= config.lr <= 0.02
        assert config.hidden[0] in (64, 128) and config.hidden[1] == 64
        assert (config.batch_size, config.weight_decay, config.schedule, config.epochs) == (32, 1e-3, "onecycle", 3)
        study.tell(trial, 0.0)


@pytest.mark.parametrize("bounds, word", [
    ({"lr_min": 0.1, "lr_max": 0.01}, "lr bounds are inverted"),
    ({"momentum_min": 0.9, "momentum_max": 0.5}, "momentum bounds are inverted"),
    ({"hidden1_min": 512, "hidden1_max": 128}, "hidden1 bounds are inverted"),
    ({"momentum_max": 1.0}, "[0, 1)"),
])
def test_an_impossible_search_space_is_refused_with_the_bound_named(bounds, word):
    with pytest.raises(ConfigError, match=word.replace("[", r"\[").replace(")", r"\)")):
        SearchSpace(**bounds)


def test_the_objective_reports_every_epoch_and_records_the_curve():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    objective = Objective(_splits(), SearchSpace(hidden1_min=64, hidden1_max=64, hidden2_min=64, hidden2_max=64),
                          TrainConfig(epochs=3, batch_size=32), run_key="k", flow_run_id="fr")
    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert sorted(trial.intermediate_values) == [1, 2, 3]
    assert len(trial.user_attrs["val_accuracy"]) == 3
    assert len(trial.user_attrs["train_loss"]) == 3 and len(trial.user_attrs["epoch_seconds"]) == 3
    assert trial.user_attrs["run_key"] == "k" and trial.user_attrs["flow_run_id"] == "fr"
    assert ":" in trial.user_attrs["worker"]
    assert trial.value == pytest.approx(trial.user_attrs["val_accuracy"][-1], abs=1e-6)


class _PruneAtOnce(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_the_objective_prunes_when_the_pruner_says_so_and_keeps_the_partial_curve():
    study = optuna.create_study(direction="maximize", pruner=_PruneAtOnce())
    objective = Objective(_splits(), SearchSpace(hidden1_min=64, hidden1_max=64, hidden2_min=64, hidden2_max=64),
                          TrainConfig(epochs=5, batch_size=32))
    study.optimize(objective, n_trials=2)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 2
    assert all(len(t.user_attrs["val_accuracy"]) == 1 for t in study.trials)


def test_a_new_study_starts_with_the_seed_configuration_and_a_resumed_one_does_not_repeat_it(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = open_study(url, "s", seed=0, max_epochs=2)
    assert study.get_trials(states=(optuna.trial.TrialState.WAITING,))[0].system_attrs["fixed_params"] == SEED_PARAMS
    objective = Objective(_splits(), SearchSpace(hidden1_min=64, hidden1_max=512, hidden2_min=64, hidden2_max=256),
                          TrainConfig(epochs=2, batch_size=32), run_key="a")
    run_study(study, objective, n_trials=2, run_key="a")
    again = open_study(url, "s", seed=0, max_epochs=2)
    assert not again.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert len(again.trials) == 2


def test_the_budget_counts_finished_trials_of_this_run_only(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    space = SearchSpace(hidden1_min=64, hidden1_max=128, hidden2_min=64, hidden2_max=64)
    objective = lambda key: Objective(_splits(), space, TrainConfig(epochs=1, batch_size=64), run_key=key)  # noqa: E731
    study = open_study(url, "s", seed=0, max_epochs=1)
    run_study(study, objective("night-1"), n_trials=3, run_key="night-1")
    run_study(study, objective("night-1"), n_trials=3, run_key="night-1")  # resumed: nothing left to do
    run_study(study, objective("night-2"), n_trials=2, run_key="night-2")
    assert len(finished_trials(study, "night-1")) == 3
    assert len(finished_trials(study, "night-2")) == 2
    assert len(study.trials) == 5
    assert best_trial(study).value == max(t.value for t in study.trials)


def test_run_study_refuses_a_budget_below_one():
    with pytest.raises(ConfigError, match="n_trials"):
        run_study(optuna.create_study(), lambda t: 0.0, n_trials=0, run_key=None)  # type: ignore[arg-type]


def test_the_study_name_follows_the_dataset_and_its_fingerprint():
    assert study_name_for("fashion-mnist", "ab" * 32) == "fashion-mnist-" + ("ab" * 6)


def test_two_processes_opening_a_new_study_at_once_queue_the_seed_configuration_once(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    real_trials = optuna.Study.trials
    open_study(url, "s", seed=0, max_epochs=2)
    # the second process looked at the study before the first one's seed trial was written
    monkeypatch.setattr(optuna.Study, "trials", property(lambda self: []))
    study = open_study(url, "s", seed=0, max_epochs=2)
    monkeypatch.setattr(optuna.Study, "trials", real_trials)
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"] for t in waiting] == [SEED_PARAMS]


def test_open_study_builds_one_storage_from_a_url(tmp_path, monkeypatch):
    built = []
    real = optuna.storages.get_storage
    monkeypatch.setattr(optuna.storages, "get_storage", lambda storage: built.append(storage) or real(storage))
    study = open_study(f"sqlite:///{tmp_path / 's.db'}", "s", seed=0, max_epochs=2)
    assert len([s for s in built if isinstance(s, str)]) == 1
    assert len({id(s) for s in built if not isinstance(s, str)} | {id(study._storage)}) == 1


def test_a_new_study_queues_the_warm_start_points_after_the_seed_configuration(tmp_path):
    champion = {"lr": 0.05, "momentum": 0.8, "hidden1": 256, "hidden2": 128}
    study = open_study(f"sqlite:///{tmp_path / 's.db'}", "new", seed=0, max_epochs=2, warm_start=[champion])
    queued = [t.system_attrs["fixed_params"] for t in study.get_trials(states=(optuna.trial.TrialState.WAITING,))]
    assert queued == [SEED_PARAMS, champion]


def test_the_champion_of_a_dataset_becomes_the_warm_start_point():
    from types import SimpleNamespace

    from mnist_flow.pipeline import champion_warm_start

    class FakeRegistry:
        def __init__(self, champion):
            self._champion = champion

        def champion(self, name):
            return self._champion

    params = {"lr": 0.1, "momentum": 0.9, "hidden": [512, 256], "epochs": 30}
    assert champion_warm_start(FakeRegistry(SimpleNamespace(params=params)), "mnist") == [
        {"lr": 0.1, "momentum": 0.9, "hidden1": 512, "hidden2": 256}]
    assert champion_warm_start(FakeRegistry(None), "mnist") == []
    assert champion_warm_start(FakeRegistry(SimpleNamespace(params={**params, "hidden": [64]})), "mnist") == []


def test_the_best_trial_is_taken_among_trials_of_the_same_recipe(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    space = SearchSpace(hidden1_min=64, hidden1_max=128, hidden2_min=64, hidden2_max=64)
    onecycle, constant = TrainConfig(epochs=1, schedule="onecycle"), TrainConfig(epochs=1, schedule="constant")
    study = open_study(url, "s", seed=0, max_epochs=1, enqueue_seed=False)
    run_study(study, Objective(_splits(), space, onecycle, run_key="a"), n_trials=2, run_key="a")
    run_study(study, Objective(_splits(), space, constant, run_key="b"), n_trials=2, run_key="b")
    for config in (onecycle, constant):
        best = best_trial(study, recipe_of(config))
        assert best.user_attrs["recipe"]["schedule"] == config.schedule
    with pytest.raises(ConfigError, match="No trial"):
        best_trial(study, recipe_of(TrainConfig(batch_size=7)))


# --- what a trial owns: divergence, out of memory; and what it does not: bugs ----------------------------------

_NARROW = SearchSpace(hidden1_min=64, hidden1_max=64, hidden2_min=64, hidden2_max=64)


def test_a_diverging_trial_is_pruned_with_its_reason_and_the_study_goes_on(tmp_path):
    splits = _splits()
    splits.train_x[5, 0] = float("nan")  # a poisoned sample: every trial's first epoch diverges
    study = open_study(f"sqlite:///{tmp_path / 's.db'}", "s", seed=0, max_epochs=3, enqueue_seed=False)
    objective = Objective(splits, _NARROW, TrainConfig(epochs=3, batch_size=32), run_key="k")
    finished = run_study(study, objective, n_trials=2, run_key="k")
    assert [t.state for t in finished] == [optuna.trial.TrialState.PRUNED] * 2
    for trial in finished:
        reason = trial.user_attrs["diverged"]
        assert f"trial #{trial.number}:" in reason and "epoch 1 of 3" in reason and "non-finite" in reason
        assert "pruned" in reason and trial.intermediate_values == {}


def test_a_trial_out_of_memory_fails_with_its_reason_and_the_study_goes_on(tmp_path):
    study = open_study(f"sqlite:///{tmp_path / 's.db'}", "s", seed=0, max_epochs=1, enqueue_seed=False)
    # a real allocation failure: a 784 x 2^30 layer is 3.4 TB (refused at once, nothing is touched)
    study.enqueue_trial({"lr": 0.01, "momentum": 0.9, "hidden1": 2 ** 30, "hidden2": 64})
    objective = Objective(_splits(), _NARROW, TrainConfig(epochs=1, batch_size=32), run_key="k")
    finished = run_study(study, objective, n_trials=2, run_key="k")
    failed = study.trials[0]
    assert failed.state == optuna.trial.TrialState.FAIL
    assert "can't allocate memory" in failed.user_attrs["out_of_memory"]  # Optuna 5 keeps no fail reason itself
    assert [t.state for t in finished] == [optuna.trial.TrialState.COMPLETE] * 2


def test_a_programming_error_in_a_trial_propagates_as_the_bug_it_is(tmp_path):
    bad = Splits(torch.randn(60, 100), torch.randint(0, 10, (60,)), torch.randn(20, 100),
                 torch.randint(0, 10, (20,)))  # 100 features for a 784-input model: a shape bug
    study = open_study(f"sqlite:///{tmp_path / 's.db'}", "s", seed=0, max_epochs=1, enqueue_seed=False)
    objective = Objective(bad, _NARROW, TrainConfig(epochs=1, batch_size=32), run_key="k")
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as caught:
        run_study(study, objective, n_trials=3, run_key="k")
    assert not isinstance(caught.value, ConfigError)
    assert len(study.trials) == 1  # stopped at the first trial, not retried three times into a ConfigError
