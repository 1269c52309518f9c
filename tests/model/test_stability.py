"""Stability: every corner of the default search space trains to a finite model in the final fit, a divergence
in a trial or in the final fit still ends in a registered finite model, and the final fit never falls more than
0.3 points below the trial it reproduces (the flow with diverging trials: tests/flows/test_flow_divergence.py).

Real data and real training throughout (the bundled MNIST sample, a Fashion-MNIST subset): the divergences
are those of configurations that truly diverge, or of a NaN that truly reaches the data. The full sweep (both
datasets, every corner at the final budget) is a benchmark: benchmarks/bench_stability.py.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
from testlib import require_fashion_mnist

from mnist_flow import pipeline
from mnist_flow.errors import ConfigError, TrainingDiverged
from mnist_flow.params import RunParams, SearchSpace, TrainConfig
from mnist_flow.registry.store import Registry
from mnist_flow.training.loop import all_finite, train_model

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

SPACE = SearchSpace()
DEFAULTS = RunParams()
#: The recipe of `make run` (batch 128, weight decay 5e-4, one-cycle); the corners fill in the rest.
RECIPE = TrainConfig(batch_size=DEFAULTS.recipe.batch_size, weight_decay=DEFAULTS.recipe.weight_decay,
                     schedule=DEFAULTS.recipe.schedule, epochs=DEFAULTS.final_epochs)
NARROW, WIDE = (SPACE.hidden1_min, SPACE.hidden2_min), (SPACE.hidden1_max, SPACE.hidden2_max)
CORNERS = list(itertools.product((SPACE.lr_min, SPACE.lr_max), (SPACE.momentum_min, SPACE.momentum_max)))


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _check_final_fit(prepared: pipeline.Prepared, config: TrainConfig) -> tuple[torch.nn.Module, float]:
    """The final fit's path (fit_best): it must not raise, and everything it hands on must be finite."""
    model, history = pipeline.fit_best(prepared, config)
    assert all_finite(model)
    assert all(math.isfinite(e.train_loss) and math.isfinite(e.val_loss) for e in history.epochs)
    assert len(history.epochs) == config.epochs
    test = pipeline.evaluate_test(model, prepared)
    assert math.isfinite(test.loss) and math.isfinite(test.accuracy)
    return model, history.best.val_accuracy


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("lr, momentum", CORNERS)
@pytest.mark.parametrize("hidden", [NARROW, WIDE], ids=["narrow", "wide"])
def test_every_corner_of_the_default_space_trains_to_a_finite_model_on_the_sample(
        sample_prepared, hidden, lr, momentum, precision):
    # narrow: the final budget (24 epochs); wide: the trial budget (8), to keep `make test` small (the
    # benchmark runs the wide ones for 24 too)
    epochs = RECIPE.epochs if hidden == NARROW else DEFAULTS.max_epochs
    config = RECIPE.with_(hidden=hidden, lr=lr, momentum=momentum, precision=precision, epochs=epochs)
    _, val_accuracy = _check_final_fit(sample_prepared, config)
    assert val_accuracy > 0.2  # twice chance: a diverged corner recovered into a model, not a constant


@pytest.fixture(scope="module")
def fashion_subset():
    """6,000 Fashion-MNIST training images (600 held out) and the 10,000 test images."""
    from mnist_flow.data.datasets import load_dataset

    bundle = load_dataset("fashion-mnist", "dir", data_dir=require_fashion_mnist(), cache_dir=Path("/nonexistent"))
    small = replace(bundle, train_images=bundle.train_images[:6000], train_labels=bundle.train_labels[:6000])
    return pipeline.prepare(small, val_fraction=0.1, seed=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("momentum", [SPACE.momentum_min, SPACE.momentum_max])
def test_the_highest_rate_of_the_space_trains_to_a_finite_model_on_fashion_mnist(fashion_subset, momentum, precision):
    config = RECIPE.with_(hidden=NARROW, lr=SPACE.lr_max, momentum=momentum, precision=precision)
    _, val_accuracy = _check_final_fit(fashion_subset, config)
    assert val_accuracy > 0.5


def _registry(tmp_path: Path) -> Registry:
    registry = Registry(f"sqlite:///{tmp_path / 'db.sqlite'}", str(tmp_path / "artifacts"))
    registry.migrate()
    return registry


def _trial(params: dict, value: float, number: int = 3) -> optuna.trial.FrozenTrial:
    """A finished trial as the study stores it (what final_fit reads: number, params, value)."""
    space = SearchSpace()
    distributions = {
        "lr": optuna.distributions.FloatDistribution(space.lr_min, space.lr_max, log=True),
        "momentum": optuna.distributions.FloatDistribution(space.momentum_min, space.momentum_max),
        "hidden1": optuna.distributions.IntDistribution(space.hidden1_min, space.hidden1_max, step=64),
        "hidden2": optuna.distributions.IntDistribution(space.hidden2_min, space.hidden2_max, step=64)}
    trial = optuna.trial.create_trial(params=params, distributions=distributions, value=value)
    trial.number = number
    return trial


def test_a_final_fit_that_truly_diverges_recovers_and_registers_a_finite_model(tmp_path, sample_prepared):
    # the corner lr 0.3 x momentum 0.98 of the default space, stretched over the final epochs: it diverges
    params = RunParams(source="sample", max_epochs=2, final_epochs=8, precision="fp32", final_data="train")
    corner = {"lr": SPACE.lr_max, "momentum": SPACE.momentum_max, "hidden1": 128, "hidden2": 64}
    recipe = pipeline.trial_config(_trial(corner, 0.0), params)
    s = sample_prepared.splits
    _, trial_history = train_model(recipe, s.train_x, s.train_y, s.val_x, s.val_y)  # the trial, as it ran
    trial = _trial(corner, trial_history.last.val_accuracy)
    fitted = pipeline.final_fit(sample_prepared, trial, params)
    assert fitted.history.events, "the corner was expected to diverge in the final fit"
    assert any("restored the state of epoch" in note for note in fitted.notes)
    assert fitted.history.best.val_accuracy >= trial.value - pipeline.FINAL_FIT_TOLERANCE
    test = pipeline.evaluate_test(fitted.model, sample_prepared)
    with _registry(tmp_path) as registry:
        version = pipeline.register_challenger(
            registry,
            pipeline.Candidate(sample_prepared, fitted.model, fitted.config, fitted.history, test, study_name="s",
                               trial_number=trial.number, run_key="k", flow_run_id=None))
        stored = registry.get(version.name, version.version)
    assert all(math.isfinite(float(v)) for v in stored.metrics.values())
    assert stored.metrics["recoveries"] == len(fitted.history.events) >= 1
    assert stored.metrics["val_accuracy"] == pytest.approx(fitted.history.best.val_accuracy)


def test_the_final_fit_is_never_more_than_03_points_below_the_trial_it_reproduces(sample_prepared):
    # on held-out validation (final_data="train"): with train+val the figures are on seen images
    params = RunParams(source="sample", max_epochs=4, final_epochs=8, precision="fp32", final_data="train")
    point = {"lr": 0.03, "momentum": 0.9, "hidden1": 128, "hidden2": 64}
    recipe = pipeline.trial_config(_trial(point, 0.0), params)
    s = sample_prepared.splits
    _, trial_history = train_model(recipe, s.train_x, s.train_y, s.val_x, s.val_y)
    reproduced = trial_history.last.val_accuracy
    fitted = pipeline.final_fit(sample_prepared, _trial(point, reproduced), params)
    assert fitted.history.best.val_accuracy >= reproduced - pipeline.FINAL_FIT_TOLERANCE
    # a trial that claims more than the stretched fit reaches: its recipe is retrained, the better one kept
    fallback = pipeline.final_fit(sample_prepared, _trial(point, fitted.history.best.val_accuracy + 0.05), params)
    assert any("retraining the trial's recipe" in note for note in fallback.notes)
    assert fallback.history.best.val_accuracy == pytest.approx(max(fitted.history.best.val_accuracy, reproduced))
    if reproduced > fitted.history.best.val_accuracy:
        assert fallback.config == recipe


def test_a_model_with_a_nan_is_refused_by_register_as_a_divergence_and_nothing_is_stored(tmp_path, sample_prepared):
    config = TrainConfig(hidden=(32,), epochs=1)
    s = sample_prepared.splits
    model, history = train_model(config, s.train_x, s.train_y, s.val_x, s.val_y)
    test = pipeline.evaluate_test(model, sample_prepared)
    with torch.no_grad():
        model.net[0].weight[0, 0] = float("nan")
    with _registry(tmp_path) as registry:
        with pytest.raises(TrainingDiverged, match="diverged") as caught:
            pipeline.register_challenger(
                registry,
                pipeline.Candidate(sample_prepared, model, config, history, test, study_name="s", trial_number=7,
                                   run_key="k", flow_run_id=None))
        assert not isinstance(caught.value, ConfigError) and "trial #7" in caught.value.message
        assert "plain numbers" not in str(caught.value)
        nan_test = replace(test, loss=float("nan"))
        with torch.no_grad():
            model.net[0].weight[0, 0] = 0.0
        with pytest.raises(TrainingDiverged, match="non-finite test_loss"):
            pipeline.register_challenger(
                registry,
                pipeline.Candidate(sample_prepared, model, config, history, nan_test, study_name="s", trial_number=7,
                                   run_key="k", flow_run_id=None))
        assert registry.list_versions() == []


def test_the_final_fits_of_several_seeds_at_once_are_each_the_fit_of_its_seed_alone_and_the_best_is_kept(
        sample_prepared):
    # threads change nothing: each seed's fit is what it would be alone, so a run's result is reproducible
    params = RunParams(source="sample", max_epochs=2, final_epochs=3, final_seeds=3, precision="fp32",
                       final_model="best", final_data="train")
    # wide layers: their initialisation takes long enough that fits drawing at once would mix their seeds
    point = {"lr": 0.05, "momentum": 0.9, "hidden1": 1024, "hidden2": 512}
    trial = _trial(point, 0.5)
    fitted = pipeline.final_fits(sample_prepared, trial, params)
    seeds = pipeline.final_seeds(params)
    assert seeds == [0, 1000, 2000]
    alone = {seed: pipeline.fit_best(sample_prepared, pipeline.final_config(trial, params).with_(seed=seed))
             for seed in seeds}
    vals = {seed: history.best.val_accuracy for seed, (_, history) in alone.items()}
    assert len(set(vals.values())) > 1, "the seeds were expected to give different models"
    kept = max(seeds, key=lambda seed: (vals[seed], -seeds.index(seed)))  # the first wins a tie
    assert fitted.config.seed == kept and fitted.history.best.val_accuracy == vals[kept]
    model, _ = alone[kept]
    assert all(torch.equal(a, b) for a, b in zip(fitted.model.state_dict().values(), model.state_dict().values(),
                                                 strict=True))
    assert any(f"kept the fit with seed {kept} of 3" in note for note in fitted.notes)


def test_the_ensemble_of_the_final_fits_is_registered_where_it_is_at_least_as_accurate(sample_prepared, tmp_path,
                                                                                       monkeypatch):
    params = RunParams(source="sample", max_epochs=2, final_epochs=3, final_seeds=2, precision="fp32",
                       final_data="train")
    assert params.final_model == "ensemble"  # the default
    trial = _trial({"lr": 0.05, "momentum": 0.9, "hidden1": 128, "hidden2": 64}, 0.5)
    fitted = pipeline.final_fits(sample_prepared, trial, params)
    alone = [pipeline.fit_best(sample_prepared, pipeline.final_config(trial, params).with_(seed=seed))
             for seed in pipeline.final_seeds(params)]
    s = sample_prepared.splits
    best = max(history.best.val_accuracy for _, history in alone)
    x = s.val_x[:64]
    mean = torch.stack([model(x) for model, _ in alone]).mean(dim=0)
    assert fitted.ensemble is not None  # here (fp32 on the CPU: deterministic) the ensemble is more accurate
    assert fitted.ensemble.seeds == (0, 1000) and fitted.model.hidden == (256, 128)
    torch.testing.assert_close(fitted.model(x), mean, rtol=1e-4, atol=1e-4)
    assert fitted.val_accuracy == fitted.ensemble.val_accuracy >= best
    assert any("registered the ensemble of the 2 fits" in note for note in fitted.notes)
    # registered with its own validation figures and its seeds; it loads back as what it is
    test = pipeline.evaluate_test(fitted.model, sample_prepared)
    with _registry(tmp_path) as registry:
        version = pipeline.register_challenger(registry, pipeline.Candidate(
            sample_prepared, fitted.model, fitted.config, fitted.history, test, study_name="s",
            trial_number=3, run_key="k", ensemble=fitted.ensemble))
        assert version.metrics["val_accuracy"] == fitted.ensemble.val_accuracy
        assert version.metrics["ensemble_of"] == 2 and version.params["ensemble_seeds"] == [0, 1000]
        loaded, _, _ = registry.load(version.name, version.version)
        assert torch.equal(loaded(x), fitted.model(x))

    # an ensemble less accurate than the best fit is not registered
    from mnist_flow.training.model import MLP

    monkeypatch.setattr(pipeline, "ensemble_mlp", lambda models: MLP(models[0].hidden))  # an untrained model
    worse = pipeline.final_fits(sample_prepared, trial, params)
    assert worse.ensemble is None and worse.val_accuracy == best
    assert any("is less accurate" in note for note in worse.notes)


def test_by_default_the_final_fits_train_on_the_validation_split_too_and_their_ensemble_is_registered(
        sample_prepared, tmp_path, monkeypatch):
    params = RunParams(source="sample", max_epochs=2, final_epochs=3, final_seeds=2, precision="fp32")
    assert params.final_data == "train+val"  # the default
    trial = _trial({"lr": 0.05, "momentum": 0.9, "hidden1": 128, "hidden2": 64}, 0.5)
    s = sample_prepared.splits
    both = pipeline.final_splits(sample_prepared, params)
    assert len(both.train_y) == len(s.train_y) + len(s.val_y) and both.val_x is s.val_x
    assert both.train_x.data_ptr() == s.train_x.data_ptr()  # a view of the prepared tensor, not a copy
    assert torch.equal(both.train_x, torch.cat([s.train_x, s.val_x]))
    assert torch.equal(both.train_y, torch.cat([s.train_y, s.val_y]))
    replaced = replace(s, train_x=s.train_x[:-1].clone())  # no longer the joined tensor's half
    assert len(replaced.with_val_in_training().train_x) == len(s.train_x) - 1 + len(s.val_x)
    fitted = pipeline.final_fits(sample_prepared, trial, params)
    config = pipeline.final_config(trial, params)
    alone = [pipeline.fit_best(sample_prepared, config.with_(seed=seed), splits=both)
             for seed in pipeline.final_seeds(params)]
    held_out = pipeline.fit_best(sample_prepared, config)[0]
    x = s.val_x[:64]
    assert fitted.val_seen and fitted.ensemble is not None and fitted.ensemble.seeds == (0, 1000)
    torch.testing.assert_close(fitted.model(x), torch.stack([m(x) for m, _ in alone]).mean(dim=0),
                               rtol=1e-4, atol=1e-4)
    assert not torch.equal(alone[0][0](x), held_out(x))  # the validation images did train the fits
    assert any("trained on the validation split too" in note for note in fitted.notes)
    test = pipeline.evaluate_test(fitted.model, sample_prepared)
    with _registry(tmp_path) as registry:
        version = pipeline.register_challenger(registry, pipeline.Candidate(
            sample_prepared, fitted.model, fitted.config, fitted.history, test, study_name="s",
            trial_number=3, run_key="k", ensemble=fitted.ensemble, val_seen=fitted.val_seen))
        assert version.params["trained_on"] == "train+val"

    # no held-out figure to compare on, but a broken ensemble is still caught on the images its fits learnt
    from mnist_flow.training.model import MLP

    monkeypatch.setattr(pipeline, "ensemble_mlp", lambda models: MLP(models[0].hidden))  # an untrained model
    worse = pipeline.final_fits(sample_prepared, trial, params)
    assert worse.ensemble is None and any("is less accurate" in note for note in worse.notes)


def test_a_final_fit_seed_that_diverges_beyond_its_recoveries_is_left_out(sample_prepared, monkeypatch):
    params = RunParams(source="sample", max_epochs=2, final_epochs=2, final_seeds=2, precision="fp32")
    trial = _trial({"lr": 0.05, "momentum": 0.9, "hidden1": 128, "hidden2": 64}, 0.5)
    real = pipeline.fit_best

    def fit_best(prepared, config, **kwargs):
        if config.seed == 1000:
            raise TrainingDiverged("diverged in every recovery", fix="lower the rate")
        return real(prepared, config, **kwargs)

    monkeypatch.setattr(pipeline, "fit_best", fit_best)
    fitted = pipeline.final_fits(sample_prepared, trial, params)
    assert fitted.config.seed == 0 and all_finite(fitted.model)
    assert any("seed 1000 diverged" in note and "left out" in note for note in fitted.notes)
