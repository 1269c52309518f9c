"""The `mnist-flow` command line: train, tune, and the registry, without Prefect.

mnist-flow train --dataset fashion-mnist --source dir --data-dir /usr/share/datasets/fashion-mnist --json
mnist-flow tune --n-trials 10 --max-epochs 4
mnist-flow registry list
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, cast

import click
import typer
from typer._click.exceptions import NoArgsIsHelpError, UsageError  # Typer 0.29 bundles its own click
from typer.exceptions import Abort as TyperAbort
from typer.exceptions import Exit as TyperExit
from typer.exceptions import TyperException

from mnist_flow.errors import INTERRUPTED, ConfigError, MnistFlowError, quiet_user_error_tracebacks
from mnist_flow.params import RunParams, TrainConfig

if TYPE_CHECKING:
    from mnist_flow.params import Schedule
from mnist_flow.progress import quiet_optuna
from mnist_flow.training.threads import bound_native_caches, policy_for
from mnist_flow.training.threads import describe as describe_threads

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Tune, train, evaluate and register MNIST classifiers.",
)


def _progress(enabled: bool):
    from mnist_flow.progress import NullProgress, RichProgress

    return RichProgress() if enabled and sys.stderr.isatty() else NullProgress()


def _parse_hidden(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(
            f"--hidden must be comma-separated integers, got {text!r}.", fix="Pass e.g. --hidden 500,256."
        ) from None


def _check_train_values(config: TrainConfig, val_fraction: float) -> None:
    """Refuse non-finite numbers and values past the flow's caps (params.MAX_*) before any work."""
    from mnist_flow import params as limits

    hidden = config.hidden
    values: dict[str, float] = {
        name: getattr(config, name) for name in ("lr", "momentum", "weight_decay", "epochs", "batch_size", "seed")
    }
    values["val_fraction"] = val_fraction
    caps = {
        "lr": limits.MAX_LR,
        "weight_decay": limits.MAX_WEIGHT_DECAY,
        "epochs": limits.MAX_EPOCHS,
        "batch_size": limits.MAX_BATCH_SIZE,
        "seed": limits.MAX_SEED,
    }
    problems = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if not math.isfinite(value):
            problems.append(f"{flag} must be a finite number, got {value}")
        elif name in caps and value > caps[name]:
            problems.append(
                f"{flag} is at most {caps[name]}, got {value}"
                + (f" ({limits.CAP_REASONS[name]})" if name in limits.CAP_REASONS else "")
            )
    if values.get("seed", 0) < 0:
        problems.append(f"--seed must be >= 0, got {values['seed']}")
    if any(h > limits.MAX_WIDTH for h in hidden):
        problems.append(
            f"--hidden widths are at most {limits.MAX_WIDTH}, got {list(hidden)} ({limits.CAP_REASONS['hidden']})"
        )
    if problems:
        raise ConfigError(
            "Invalid training parameters: " + "; ".join(problems) + ".", fix="Correct the value and run again."
        )


#: `mnist-flow train` defaults: the seed tutorial's configuration (TrainConfig's defaults) on the run's data options.
_SEED = TrainConfig()
_DATA = {name: RunParams.model_fields[name] for name in ("dataset", "source", "data_dir", "val_fraction")}


@app.command()
def train(
    dataset: Annotated[str, typer.Option(help=_DATA["dataset"].description)] = _DATA["dataset"].default,
    source: Annotated[str, typer.Option(help=_DATA["source"].description)] = _DATA["source"].default,
    data_dir: Annotated[Path | None, typer.Option(help=_DATA["data_dir"].description)] = None,
    hidden: Annotated[str, typer.Option(help="hidden layer sizes, comma-separated")] = ",".join(map(str, _SEED.hidden)),
    lr: float = _SEED.lr,
    momentum: float = _SEED.momentum,
    batch_size: int = _SEED.batch_size,
    epochs: int = _SEED.epochs,
    weight_decay: float = _SEED.weight_decay,
    schedule: Annotated[str, typer.Option(help="constant or onecycle")] = _SEED.schedule,
    precision: Annotated[str, typer.Option(help="auto, fp32 or bf16 (auto: bf16 where the CPU/GPU has it)")] = "auto",
    val_fraction: Annotated[float, typer.Option(help=_DATA["val_fraction"].description)] = _DATA[
        "val_fraction"
    ].default,
    seed: int = _SEED.seed,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or mps (default: settings)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Train one configuration (the seed's by default) and evaluate it; no Prefect, no registry."""
    from mnist_flow import pipeline
    from mnist_flow.params import resolve_precision
    from mnist_flow.settings import load_settings
    from mnist_flow.training.loop import select_device

    config = TrainConfig(
        hidden=_parse_hidden(hidden),
        lr=lr,
        momentum=momentum,
        batch_size=batch_size,
        epochs=epochs,
        weight_decay=weight_decay,
        schedule=cast("Schedule", schedule),  # TrainConfig.validate names a bad value
        seed=seed,
        precision=resolve_precision(precision),
    )
    _check_train_values(config, val_fraction)
    config.validate()
    settings = load_settings(device=device)
    bound_native_caches(adaptive=not settings.threads)
    params = RunParams.parse(dataset=dataset, source=source, data_dir=data_dir, seed=seed, val_fraction=val_fraction)
    bundle = pipeline.load_data(params, settings)
    prepared = pipeline.prepare(bundle, val_fraction=val_fraction, seed=seed, device=select_device(settings.device))
    progress = _progress(not as_json)
    threads = policy_for(settings.threads)
    try:
        model, history = pipeline.fit_best(prepared, config, progress=progress, label="train", threads=threads)
    finally:
        progress.close()
    test = pipeline.evaluate_test(model, prepared)
    result = {
        "dataset": bundle.name,
        "source": bundle.source,
        "fingerprint": bundle.fingerprint,
        "device": str(prepared.device),
        "config": config.to_dict(),
        "train_samples": int(prepared.splits.train_y.numel()),
        "val_samples": int(prepared.splits.val_y.numel()),
        "test_samples": int(prepared.test_y.numel()),
        "epoch_seconds": [round(s, 4) for s in history.column("seconds")],
        "train_loss": [round(v, 5) for v in history.column("train_loss")],
        "val_accuracy": history.best.val_accuracy,
        "val_accuracy_per_epoch": history.column("val_accuracy"),
        "test_accuracy": test.accuracy,
        "test_loss": test.loss,
        "threads": describe_threads(threads),
    }
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        for e in history.epochs:
            print(
                f"epoch {e.epoch:>2}: train_loss {e.train_loss:.4f}  val_acc {e.val_accuracy:.4f}  ({e.seconds:.2f}s)"
            )
        print(f"test accuracy {test.accuracy:.4f} (loss {test.loss:.4f}) on {result['test_samples']} samples")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def tune(ctx: typer.Context) -> None:
    """Run the flow's Optuna study without Prefect (same options as flows/mnist.py; --help lists them)."""
    from mnist_flow import pipeline
    from mnist_flow.cli.flow import build_parser
    from mnist_flow.registry.store import Registry
    from mnist_flow.settings import load_settings
    from mnist_flow.training.loop import select_device

    parser = build_parser("mnist-flow tune", "Run the dataset's Optuna study without Prefect.")
    parser.add_argument(
        "--run-key", default=None, help="trials are counted per run key; pass an earlier run's key to resume it"
    )
    args = vars(parser.parse_args(ctx.args))
    as_json, run_key = args.pop("json"), args.pop("run_key") or pipeline.new_run_key()
    params = RunParams.parse(**args)
    settings = load_settings()
    bound_native_caches(adaptive=not settings.threads)
    watch = pipeline.Stopwatch()
    with watch("data"):
        bundle = pipeline.load_data(params, settings)
        prepared = pipeline.prepare(
            bundle, val_fraction=params.val_fraction, seed=params.seed, device=select_device(settings.device)
        )
    if not as_json:
        print(f"run key {run_key} (resume with --run-key {run_key})", file=sys.stderr)
    with Registry.from_settings(settings) as registry:
        warm_start = pipeline.champion_warm_start(registry, params.dataset)
    progress = _progress(not as_json)
    try:
        with watch("tune"):
            tuned = pipeline.tune(
                prepared,
                params,
                settings.resolved_database_url,
                run_key=run_key,
                progress=progress,
                heartbeat_interval=settings.heartbeat_interval,
                heartbeat_grace=settings.heartbeat_grace,
                warm_start=warm_start,
                threads=policy_for(settings.threads),
            )
    finally:
        progress.close()
    study, best = tuned.study, tuned.best
    result = {
        "study": study.study_name,
        "run_key": run_key,
        "best_trial": best.number,
        "best_params": best.params,
        "best_val_accuracy": best.value,
        "trials": len(tuned.trials),
        "seconds": watch.seconds,
    }
    print(
        json.dumps(result, indent=2)
        if as_json
        else f"best trial #{best.number}: val_accuracy {best.value:.4f} {best.params} ({study.study_name})"
    )


def _mount_subcommands() -> None:
    """Add the registry group and the review commands to ``app`` (once, however often main() runs)."""
    from mnist_flow.cli.registry import registry_app

    if not any(group.typer_instance is registry_app for group in app.registered_groups):
        app.add_typer(registry_app, name="registry", help="List, show, promote and roll back registered models.")
    from mnist_flow.cli.review import mount as mount_review

    mount_review(app)  # dashboard, report, predict


def _usage_line(exc: TyperException) -> str:
    """A Typer/click usage error as one line: what was wrong, and where the help is."""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    where = f"{ctx.command_path} --help" if ctx is not None else "mnist-flow --help"
    return f"error: {message} (see `{where}`)"


_commands: dict[int, typer.core.TyperGroup] = {}


def _command() -> typer.core.TyperGroup:
    """The click command of ``app``, built once per set of commands (Typer rebuilds it on every call)."""
    key = len(app.registered_commands) + 1000 * len(app.registered_groups)
    if key not in _commands:
        _commands[key] = typer.main.get_command(app)  # type: ignore[assignment]
    return _commands[key]


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one message on stderr and exit code 2, without a traceback.

    Usage errors (unknown option or command, a value of the wrong type or out of range, a missing
    argument) are one line and exit 2; Ctrl-C is one line and exit 130.
    """
    _mount_subcommands()
    quiet_optuna()
    quiet_user_error_tracebacks()
    try:
        code = _command().main(args=argv, prog_name="mnist-flow", standalone_mode=False)
    except MnistFlowError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    except (click.exceptions.Exit, TyperExit) as exc:
        code = exc.exit_code
    except (click.exceptions.Abort, TyperAbort, KeyboardInterrupt):
        code = 130
    except SystemExit as exc:  # `tune`'s argparse: --help (0) or a usage error (2, one line already printed)
        return exc.code if isinstance(exc.code, int) else 2
    except NoArgsIsHelpError:  # `mnist-flow` or `mnist-flow registry` alone: Typer printed the help; exit 2
        return 2
    except TyperException as exc:  # Typer 0.29's bundled click: not click.ClickException
        typer.echo(_usage_line(exc) if isinstance(exc, UsageError) else f"error: {exc.format_message()}", err=True)
        return exc.exit_code if isinstance(exc, UsageError) else 2
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    if code == 130:  # Typer turns KeyboardInterrupt into Exit(130) and, not standalone, returns it
        typer.echo(INTERRUPTED, err=True)
        return 130
    return code if isinstance(code, int) else 0


def run() -> NoReturn:
    """The ``mnist-flow`` console script: :func:`main`, then :func:`~mnist_flow.cli.process.exit_process`."""
    from mnist_flow.cli.process import exit_process

    exit_process(main())


if __name__ == "__main__":
    run()
