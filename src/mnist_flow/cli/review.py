"""``mnist-flow dashboard``, ``report``, ``predict`` and ``serve``: review studies, use and serve models.

    mnist-flow dashboard --port 8080
    mnist-flow report --out report/
    mnist-flow predict --json digit.png photo.jpg
    mnist-flow serve --port 8000

Mounted on the main app by :func:`mount`; user errors (``MnistFlowError``) are turned into one
message and exit code 2 by ``mnist_flow.cli.main``, so nothing here catches them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mnist_flow.search.scale import apply_threads


def dashboard(
    host: Annotated[
        str, typer.Option(help="Interface to listen on (0.0.0.0 exposes it to the network).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8080,
    allow_write: Annotated[
        bool,
        typer.Option(
            "--allow-write", help="Let the dashboard change the study (notes, deletes); read-only by default."
        ),
    ] = False,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host", help="Another host name the dashboard answers to (e.g. behind a proxy); repeatable."
        ),
    ] = None,
) -> None:
    """Serve optuna-dashboard on the study database (MNIST_FLOW_DATABASE_URL) until Ctrl-C (read-only by default)."""
    from mnist_flow.review.dashboard import serve
    from mnist_flow.settings import load_settings

    serve(load_settings().resolved_database_url, host, port, allow_write=allow_write, allowed_hosts=allowed_host or ())


def report(
    out: Annotated[Path, typer.Option("--out", help="Folder to write trials.csv, summary.md and the plots to.")],
    study: Annotated[str | None, typer.Option(help="Study name (default: the only study).")] = None,
    source: Annotated[
        str | None,
        typer.Option(
            help="Where the champion's test data comes from: sample, download or dir (default: found by fingerprint)."
        ),
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Folder with the four IDX files (--source dir).")] = None,
    top: Annotated[int, typer.Option(min=1, help="How many of the best trials to plot and list.")] = 5,
) -> None:
    """Write a report of a study: trials.csv, summary.md and PNG plots (with the champion's confusion matrix)."""
    import optuna

    from mnist_flow.registry.store import Registry
    from mnist_flow.review.dashboard import check_database_exists
    from mnist_flow.review.report import ChampionData, resolve_study_name, write_report
    from mnist_flow.settings import load_settings
    from mnist_flow.storage.db import dispose_storage, optuna_storage

    settings = load_settings()
    apply_threads(settings.threads)
    url = settings.resolved_database_url
    check_database_exists(url)
    storage = optuna_storage(url)
    try:
        name = resolve_study_name(storage, study)
        with Registry.from_settings(settings) as registry:
            result = write_report(
                optuna.load_study(study_name=name, storage=storage),
                registry,
                out,
                data=ChampionData(source, data_dir, settings.cache_dir, settings.mirrors),
                top=top,
            )
    finally:
        dispose_storage(storage)
    typer.echo(
        f"report of study {name} in {result.out_dir}: {result.csv.name}, {result.summary.name}, "
        + ", ".join(p.name for p in result.plots)
    )
    for file, reason in result.skipped.items():
        typer.echo(f"skipped {file}: {reason}", err=True)


def predict(
    images: Annotated[
        list[str],
        typer.Argument(metavar="IMAGE...", help="PNG or JPEG files, each showing one digit.", show_default=False),
    ],
    model: Annotated[str, typer.Option("--model", help="'champion', another alias, or a version number.")] = "champion",
    name: Annotated[str | None, typer.Option("--name", "-n", help="Model name (default: the only one).")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON list of {path, digit, name, probability}.")
    ] = False,
) -> None:
    """Classify image files with a registered model (loaded through the registry, checksum checked)."""
    from mnist_flow.cli.registry import check_ref
    from mnist_flow.registry.store import Registry
    from mnist_flow.review.predict import predict_images
    from mnist_flow.settings import load_settings

    model = check_ref(model)
    settings = load_settings()
    apply_threads(settings.threads)
    with Registry.from_settings(settings, create=False) as registry:  # a mistyped path creates nothing
        network, sidecar, version = registry.load(registry.resolve_name(name), model)
    # str arguments, not Path: the output names each file exactly as it was given
    results = predict_images(images, network, sidecar, max_pixels=settings.max_image_pixels)
    if as_json:
        typer.echo(json.dumps(results, indent=2))
        return
    typer.echo(
        f"model {version.name} v{version.version}" + (f" ({', '.join(version.aliases)})" if version.aliases else ""),
        err=True,
    )
    for row in results:
        typer.echo(f"{row['path']}: {row['name']} (class {row['digit']}, probability {row['probability']:.3f})")


def serve(
    host: Annotated[
        str, typer.Option(help="Interface to listen on (0.0.0.0 exposes it to the network).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    model: Annotated[str, typer.Option("--model", help="Alias to follow (or a fixed version number).")] = "champion",
    name: Annotated[str | None, typer.Option("--name", "-n", help="Model name (default: the only one).")] = None,
    refresh: Annotated[float, typer.Option(min=0.0, max=3600.0, help="Seconds between looks at the alias.")] = 2.0,
    max_request_bytes: Annotated[int, typer.Option(min=1024, max=2**31, help="Largest request body.")] = 16 * 2**20,
    max_files: Annotated[int, typer.Option(min=1, max=10_000, help="Most images in one request.")] = 64,
) -> None:
    """Serve the champion as an HTTP API (POST /predict, GET /model, GET /health) until Ctrl-C.

    Not `make serve`, which serves the Prefect deployments: this is the model API (`make serve-model`).
    """
    from mnist_flow.registry.store import Registry
    from mnist_flow.review.serve import Champion, Limits
    from mnist_flow.review.serve import serve as run_server
    from mnist_flow.settings import load_settings

    settings = load_settings()
    apply_threads(settings.threads)
    registry = Registry.from_settings(settings)
    try:
        champion = Champion(registry, registry.resolve_name(name), model, refresh_seconds=refresh)
        loaded = champion.loaded.version
        typer.echo(f"serving {loaded.name} v{loaded.version} ({model}) on http://{host}:{port}", err=True)
        run_server(
            champion, host=host, port=port, limits=Limits(max_request_bytes, max_files, settings.max_image_pixels)
        )
    finally:
        registry.dispose()


def mount(app: typer.Typer) -> None:
    """Add the review commands to ``app`` (once, however often it is called)."""
    present = {info.name or (info.callback.__name__ if info.callback else None) for info in app.registered_commands}
    for command in (dashboard, report, predict, serve):
        if command.__name__ not in present:
            app.command(name=command.__name__)(command)
