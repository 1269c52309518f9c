"""The `mnist` Prefect flow: fetch the data, tune with Optuna, train the best, evaluate, register.

Run it locally (Prefect starts a temporary API when PREFECT_API_URL is unset):

    python flows/mnist.py --help
    python flows/mnist.py --dataset fashion-mnist --source dir --data-dir /usr/share/datasets/fashion-mnist

or as a deployment: `prefect deployment run mnist/train --param n_trials=5`. Every task only
composes functions of the `mnist_flow` library; only I/O tasks (data, registry) retry.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any, Literal

from prefect import Flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.utilities.callables import get_call_parameters
from pydantic import Field

from mnist_flow import pipeline
from mnist_flow.data import DataBundle
from mnist_flow.errors import TRANSIENT_ERRORS, MnistFlowError
from mnist_flow.progress import LogProgress, quiet_optuna
from mnist_flow.registry import Registry
from mnist_flow.scale import resolve_workers
from mnist_flow.settings import Settings, load_settings
from mnist_flow.threads import bound_native_caches, policy_for
from mnist_flow.threads import describe as describe_threads
from mnist_flow.train import select_device

try:
    from reporting import publish_decision, publish_review  # flows/ on sys.path: a script, or Prefect's loader
except ModuleNotFoundError:
    from flows.reporting import publish_decision, publish_review  # imported as the namespace package `flows`
try:
    from trials import check_trial_workers, run_local_trial_workers, run_trial_workers
except ModuleNotFoundError:
    from flows.trials import check_trial_workers, run_local_trial_workers, run_trial_workers


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry outages (network, database) and unexpected I/O errors; bad input or corrupt data will not fix itself."""
    try:
        state.result()
    except TRANSIENT_ERRORS:
        return True
    except MnistFlowError:
        return False
    except Exception:
        return True
    return False


IO_RETRIES = {"retries": 3, "retry_delay_seconds": [2, 5, 15], "retry_condition_fn": _retry_transient}


@task(cache_policy=NO_CACHE, **IO_RETRIES)
def fetch_data(params: pipeline.RunParams, settings: Settings) -> DataBundle:
    """Fetch (or read) and verify the dataset; the fingerprint joins the lineage."""
    bundle = pipeline.load_data(params, settings)
    get_run_logger().info("data: %s from %s (%s), fingerprint %s", bundle.name, bundle.source, bundle.origin,
                          bundle.fingerprint[:16])
    return bundle


@task(cache_policy=NO_CACHE)
def split_data(bundle: DataBundle, params: pipeline.RunParams, device: str) -> pipeline.Prepared:
    """Carve the stratified validation split; features go to the device once."""
    return pipeline.prepare(bundle, val_fraction=params.val_fraction, seed=params.seed, device=device)


@task(cache_policy=NO_CACHE)
def tune(prepared: pipeline.Prepared, params: pipeline.RunParams, settings: Settings, run_key: str) -> tuple:
    """Run this flow run's trials of the dataset's Optuna study (a retried run resumes it).

    A new study (new data) starts from the seed configuration and the current champion's parameters.
    After trial processes (``workers > 1``) it only finds the run's trials done (or runs what they left).
    """
    with Registry.from_settings(settings) as registry:
        warm_start = pipeline.champion_warm_start(registry, params.dataset)
    return pipeline.tune(prepared, params, settings.resolved_database_url, run_key=run_key, flow_run_id=flow_run.id,
                         progress=LogProgress(get_run_logger()), heartbeat_interval=settings.heartbeat_interval,
                         heartbeat_grace=settings.heartbeat_grace, warm_start=warm_start,
                         threads=policy_for(settings.threads))


@task(cache_policy=NO_CACHE)
def train_best(prepared: pipeline.Prepared, best: Any, params: pipeline.RunParams, settings: Settings) -> tuple:
    """Train the best configuration for the final number of epochs (more than one thread only while faster)."""
    config = pipeline.final_config(best, params)
    get_run_logger().info("final fit of trial #%d: %s", best.number, config.to_dict())
    threads = policy_for(settings.threads)
    model, history = pipeline.fit_best(prepared, config, progress=LogProgress(get_run_logger()), threads=threads)
    get_run_logger().info("final fit: %s", describe_threads(threads))
    return model, config, history


@task(cache_policy=NO_CACHE)
def evaluate(model: Any, prepared: pipeline.Prepared) -> Any:
    """Evaluate the final model on the test set."""
    result = pipeline.evaluate_test(model, prepared)
    get_run_logger().info("test accuracy %.4f, loss %.4f", result.accuracy, result.loss)
    return result


@task(cache_policy=NO_CACHE, **IO_RETRIES)
def register(prepared: pipeline.Prepared, fitted: tuple, test: Any, study_name: str, trial_number: int,
             run_key: str, settings: Settings) -> Any:
    """Register the model with its lineage (idempotent: a retry registers it once)."""
    model, config, history = fitted
    with Registry.from_settings(settings) as registry:
        version = pipeline.register_challenger(registry, prepared, model, config, history, test,
                                               study_name=study_name, trial_number=trial_number, run_key=run_key,
                                               flow_run_id=flow_run.id)
    get_run_logger().info("registered %s v%d", version.name, version.version)
    return version


@task(cache_policy=NO_CACHE)
def gate(prepared: pipeline.Prepared, version: Any, test: Any, settings: Settings) -> tuple:
    """Champion/challenger gate: paired comparison on the same test set, decision recorded once."""
    with Registry.from_settings(settings) as registry:
        version, decision = pipeline.decide_promotion(registry, prepared, version, test, flow_run_id=flow_run.id,
                                                      margin=settings.promotion_margin,
                                                      alpha=settings.promotion_alpha)
    if decision is not None:
        get_run_logger().info("decision on v%d: %s: %s", version.version, decision.outcome, decision.reason)
    return version, decision


# Constraints in the signature go into the deployment's parameter schema, so Prefect refuses
# `--param n_trials=0` before a run exists; RunParams checks the rest (e.g. inverted bounds).
AtLeast1 = Annotated[int, Field(ge=1)]
AtLeast0 = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, lt=1)]
Momentum = Annotated[float, Field(ge=0, lt=1)]


class CheckedFlow(Flow):
    """A flow whose parameters are checked by RunParams before Prefect creates a run (ConfigError)."""

    def __call__(self, *args: Any, return_state: bool = False, wait_for: Any = None, **kwargs: Any) -> Any:
        pipeline.RunParams.parse(**get_call_parameters(self.fn, args, kwargs))
        return super().__call__(*args, return_state=return_state, wait_for=wait_for, **kwargs)

    def validate_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        # deployment runs: one ConfigError message instead of a pydantic dump
        pipeline.RunParams.parse(**parameters)
        return super().validate_parameters(parameters)


def checked_flow(**options: Any) -> Any:
    """``@flow(**options)`` building a :class:`CheckedFlow`."""
    return lambda fn: CheckedFlow(fn=fn, **options)


@checked_flow(name="mnist", log_prints=True)
def mnist(
    dataset: Literal["mnist", "fashion-mnist"] = "mnist",
    source: Literal["auto", "download", "dir", "sample"] = "auto",
    data_dir: str | None = None,
    n_trials: AtLeast1 = 20,
    max_epochs: AtLeast1 = 8,
    final_epochs: AtLeast1 = 24,
    seed: AtLeast0 = 0,
    workers: AtLeast1 | Literal["auto"] = "auto",
    trial_runner: Literal["local", "deployment"] = "local",
    val_fraction: Fraction = 0.1,
    batch_size: AtLeast1 = 128,
    weight_decay: Annotated[float, Field(ge=0)] = 5e-4,
    schedule: Literal["constant", "onecycle"] = "onecycle",
    precision: Literal["auto", "fp32", "bf16"] = "auto",
    lr_min: Positive = 1e-3,
    lr_max: Positive = 0.3,
    momentum_min: Momentum = 0.5,
    momentum_max: Momentum = 0.98,
    hidden1_min: AtLeast1 = 128,
    hidden1_max: AtLeast1 = 1024,
    hidden2_min: AtLeast1 = 64,
    hidden2_max: AtLeast1 = 512,
) -> dict[str, Any]:
    """Tune, train, evaluate and register an MLP for handwritten digits (or Fashion-MNIST)."""
    params = pipeline.RunParams.parse(**{k: v for k, v in locals().items()})
    settings = load_settings()
    bound_native_caches()  # before the first matmul: oneDNN's kernel caches would grow with every trial
    quiet_optuna()
    watch = pipeline.Stopwatch()
    device = select_device(settings.device)
    run_key = str(flow_run.id or pipeline.new_run_key())
    n_workers = resolve_workers(params.workers, params.n_trials)
    if params.trial_runner == "deployment":  # a worker deployment and storage that suits where its runs go
        check_trial_workers(n_workers, settings)
    with watch("data"):
        bundle = fetch_data(params, settings)
        prepared = split_data(bundle, params, str(device))
    with watch("tune"):
        # trial processes or trial worker runs run the study; the task below then only finds it done
        if n_workers > 1 and params.trial_runner == "deployment":
            run_trial_workers(prepared, params, run_key, settings, n_workers)
        elif n_workers > 1:
            run_local_trial_workers(prepared, params, run_key, settings, n_workers)
        study, best = tune(prepared, params, settings, run_key)
    with watch("train"):
        fitted = train_best(prepared, best, params, settings)
    with watch("evaluate"):
        test = evaluate(fitted[0], prepared)
    with watch("register"):
        version = register(prepared, fitted, test, study.study_name, best.number, run_key, settings)
        version, decision = gate(prepared, version, test, settings)
        publish_decision(decision, version, settings.resolved_database_url)
    summary = pipeline.build_summary(params, prepared, study, best, run_key, version, decision, test, fitted[2],
                                     watch.seconds, settings.resolved_database_url)
    get_run_logger().info("summary:\n%s", "\n".join(pipeline.summary_lines(summary)))
    publish_review(summary, study, version, settings.dashboard_url)
    return summary


def main(argv: list[str] | None = None) -> int:
    """`python flows/mnist.py [--param value ...]`: validate, run the flow, print the summary."""
    from mnist_flow.cli_flow import run_flow_cli

    return run_flow_cli(mnist, argv)


if __name__ == "__main__":
    sys.exit(main())
