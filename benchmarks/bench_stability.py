"""Training stability and the final fit: the divergence guard's cost, every corner of the search space, the
final fit against the trial it reproduces, and the whole default run over three seeds (the quality bar).

Four parts (each can run alone with --parts):

- guard: one epoch of ``train.train_epoch`` on Fashion-MNIST (batch 128, 512-256, bf16) with the loss read
  back only at the end of the epoch (``check_every=0``), every 32 steps (the default) and every step;
  alternating rounds, medians. The reads are what the guard costs (a device sync on CUDA).
- corners: ``pipeline.fit_best`` (the final fit: guarded, best epoch kept) of every corner of the default
  search space (lr_min/lr_max x momentum_min/momentum_max x smallest/largest widths) in fp32 and bf16 for
  ``--epochs`` (the final budget, 24), on the bundled sample and/or Fashion-MNIST: recoveries, kept epoch,
  validation and test accuracy, and whether anything non-finite came out.
- final: for a configuration (default: the best trial of issue 11 on the full MNIST, lr 0.2438, momentum
  0.6841, 832-320) and each seed, the trial's own recipe (``max_epochs``, as the trial measured it), the
  stretched one-cycle over ``final_epochs`` without the guard (the final fit before issue 11) and
  ``pipeline.final_fit`` (stretched, guarded, best epoch kept, with the fallback).
- runs: ``flows/mnist.py`` with every default (what ``make run`` runs) for each dataset and seed, each in a
  fresh MNIST_FLOW_HOME with a temporary Prefect API, one intra-op thread (``common.fresh_home_env``), one
  run at a time: best trial, final fit, test accuracy, what the final fit did, wall seconds.

    python benchmarks/bench_stability.py --parts guard corners final --datasets sample fashion-mnist \
        --seeds 0 1 2 --out /tmp/stability.json
"""

from __future__ import annotations

import argparse
import itertools
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import fetch_mnist
import optuna
import torch

from mnist_flow import pipeline
from mnist_flow.data.datasets import load_dataset
from mnist_flow.errors import TrainingDiverged
from mnist_flow.params import RunParams, SearchSpace, TrainConfig
from mnist_flow.training.loop import all_finite, build_model, make_step, train_epoch, train_model

ISSUE_POINT = {"lr": 0.2438, "momentum": 0.6841, "hidden1": 832, "hidden2": 320}


def source_args(name: str) -> list[str]:
    """The data flags of ``flows/mnist.py`` for a dataset of this benchmark (mnist: the full MNIST, fetched)."""
    if name == "sample":
        return ["--source", "sample"]
    if name == "mnist":
        return ["--dataset", "mnist", "--source", "dir", "--data-dir", str(fetch_mnist.ensure())]
    return ["--dataset", "fashion-mnist", "--source", "dir", "--data-dir", str(common.FASHION_DIR)]


def prepared_for(name: str, cache: Path, seed: int = 0) -> pipeline.Prepared:
    if name == "sample":
        bundle = load_dataset("mnist", "sample", cache_dir=cache)
    elif name == "mnist":
        bundle = load_dataset("mnist", "dir", data_dir=fetch_mnist.ensure(), cache_dir=cache)
    else:
        bundle = load_dataset("fashion-mnist", "dir", data_dir=common.FASHION_DIR, cache_dir=cache)
    return pipeline.prepare(bundle, val_fraction=0.1, seed=seed)


def part_guard(cache: Path, repeats: int) -> dict[str, Any]:
    prepared = prepared_for("fashion-mnist", cache)
    s = prepared.splits
    config = TrainConfig(hidden=(512, 256), lr=0.05, momentum=0.9, batch_size=128, precision="bf16")
    step = make_step(build_model(config), config, s.train_x.shape[0])
    generator = torch.Generator().manual_seed(0)
    train_epoch(step, s.train_x[:2560], s.train_y[:2560], 128, generator)  # warm-up

    def variant(every: int):
        def run() -> common.Timing:
            with common.timed() as t:
                train_epoch(step, s.train_x, s.train_y, 128, generator, check_every=every)
            return t
        return run

    names = {"end of epoch only": 0, "every 32 steps (default)": 32, "every step": 1}
    timings = common.alternate({n: variant(e) for n, e in names.items()}, repeats)
    steps = math.ceil(s.train_x.shape[0] / 128)
    base = common.median([t.wall for t in timings["end of epoch only"]])
    rows = []
    for name, every in names.items():
        wall = common.median([t.wall for t in timings[name]])
        rows.append({"variant": name, "check_every": every, "reads": (steps // every if every else 0) + 1,
                     "wall_s": wall, "cpu_s": common.median([t.cpu for t in timings[name]]),
                     "overhead": wall / base - 1})
    return {"steps_per_epoch": steps, "repeats": repeats, "rows": rows, "load_after": common.load_average()}


def part_corners(cache: Path, datasets: list[str], epochs: int) -> list[dict[str, Any]]:
    space, recipe = SearchSpace(), RunParams()
    rows = []
    for name in datasets:
        prepared = prepared_for(name, cache)
        for hidden, lr, momentum, precision in itertools.product(
                [(space.hidden1_min, space.hidden2_min), (space.hidden1_max, space.hidden2_max)],
                [space.lr_min, space.lr_max], [space.momentum_min, space.momentum_max], ["fp32", "bf16"]):
            config = TrainConfig(hidden=hidden, lr=lr, momentum=momentum, batch_size=recipe.recipe.batch_size,
                                 weight_decay=recipe.recipe.weight_decay, schedule=recipe.recipe.schedule, epochs=epochs,
                                 precision=precision)
            row: dict[str, Any] = {"dataset": name, "hidden": list(hidden), "lr": lr, "momentum": momentum,
                                   "precision": precision, "epochs": epochs}
            start = time.perf_counter()
            try:
                model, history = pipeline.fit_best(prepared, config)
                test = pipeline.evaluate_test(model, prepared)
                row.update(failed=None, recoveries=history.recoveries, best_epoch=history.best.epoch,
                           val_accuracy=history.best.val_accuracy, test_accuracy=test.accuracy,
                           finite=all_finite(model) and math.isfinite(test.loss))
            except TrainingDiverged as exc:
                row.update(failed=exc.message, finite=False)
            row["seconds"] = round(time.perf_counter() - start, 1)
            print(row, flush=True)
            rows.append(row)
    return rows


def _trial(point: dict[str, Any], value: float) -> optuna.trial.FrozenTrial:
    space = SearchSpace()
    trial = optuna.trial.create_trial(params=point, value=value, distributions={
        "lr": optuna.distributions.FloatDistribution(space.lr_min, space.lr_max, log=True),
        "momentum": optuna.distributions.FloatDistribution(space.momentum_min, space.momentum_max),
        "hidden1": optuna.distributions.IntDistribution(space.hidden1_min, space.hidden1_max, step=64),
        "hidden2": optuna.distributions.IntDistribution(space.hidden2_min, space.hidden2_max, step=64)})
    trial.number = 0
    return trial


def part_final(cache: Path, datasets: list[str], seeds: list[int], point: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, seed in itertools.product(datasets, seeds):
        prepared = prepared_for(name, cache, seed)
        s = prepared.splits
        params = RunParams(seed=seed, final_data="train")  # the 0.3-point floor is on held-out validation
        recipe = pipeline.trial_config(_trial(point, 0.0), params)
        row: dict[str, Any] = {"dataset": name, "seed": seed, "point": point,
                               "max_epochs": params.max_epochs, "final_epochs": params.final_epochs}
        try:  # the trial as it ran (unguarded): a divergence would have pruned it
            model, history = train_model(recipe, s.train_x, s.train_y, s.val_x, s.val_y)
            row["trial"] = {"val": history.last.val_accuracy, "test": pipeline.evaluate_test(model, prepared).accuracy,
                            "diverged": None}
        except TrainingDiverged as exc:
            row["trial"] = {"val": 0.0, "test": None, "diverged": exc.message}
        stretched = recipe.with_(epochs=params.final_epochs)
        try:
            model, plain = train_model(stretched, s.train_x, s.train_y, s.val_x, s.val_y)
            test = pipeline.evaluate_test(model, prepared)
            row["stretched_unguarded"] = {"val": plain.last.val_accuracy, "test": test.accuracy, "diverged": None}
        except TrainingDiverged as exc:
            row["stretched_unguarded"] = {"val": None, "test": None, "diverged": exc.message}
        fitted = pipeline.final_fit(prepared, _trial(point, row["trial"]["val"]), params)
        row["final_fit"] = {"val": fitted.history.best.val_accuracy,
                            "test": pipeline.evaluate_test(fitted.model, prepared).accuracy,
                            "best_epoch": fitted.history.best.epoch, "epochs": fitted.config.epochs,
                            "recoveries": fitted.history.recoveries, "notes": list(fitted.notes)}
        print(row, flush=True)
        rows.append(row)
    return rows


def run_row(dataset: str, seed: int, summary: dict[str, Any], wall: float) -> dict[str, Any]:
    """The figures of one default run, from the summary it printed (``--json``)."""
    fit = summary.get("final_fit", {})
    return {"dataset": dataset, "seed": seed, "best_trial": summary["best"]["trial"],
            "best_params": summary["best"]["params"], "trial_val": summary["best"]["val_accuracy"],
            "final_val": summary["metrics"]["val_accuracy"], "test": summary["metrics"]["test_accuracy"],
            "kept_epoch": fit.get("best_epoch"), "epochs": fit.get("epochs"), "recoveries": fit.get("recoveries"),
            "ensemble": list(fit.get("ensemble") or []),
            "notes": fit.get("notes", []), "version": summary["model"]["version"],
            "trials": summary["trials"], "wall_s": round(wall, 1), "seconds": summary["seconds"]}


def part_runs(work: Path, datasets: list[str], seeds: list[int], threads: int) -> list[dict[str, Any]]:
    import json
    import subprocess

    rows = []
    for dataset, seed in itertools.product(datasets, seeds):
        source = source_args(dataset)
        home = work / f"run-{dataset}-{seed}"
        start = time.perf_counter()
        # a loaded machine starts the temporary Prefect API in more than Prefect's default 20 s
        env = {**common.fresh_home_env(str(home), threads=max(threads, 1)),
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}
        done = subprocess.run([common.PYTHON, str(common.ROOT / "flows" / "mnist.py"), *source, "--seed", str(seed),
                               "--json"], capture_output=True, text=True, check=False, env=env)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            rows.append({"dataset": dataset, "seed": seed, "failed": done.stderr.strip().splitlines()[-1:],
                         "wall_s": round(wall, 1)})
        else:
            rows.append(run_row(dataset, seed, json.loads(done.stdout), wall))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["guard", "corners", "final", "runs"],
                        choices=["guard", "corners", "final", "runs"])
    parser.add_argument("--datasets", nargs="+", default=["sample", "fashion-mnist"],
                        choices=["sample", "fashion-mnist", "mnist"],
                        help="mnist: the full MNIST, fetched by benchmarks/fetch_mnist.py")
    parser.add_argument("--epochs", type=int, default=RunParams().final_epochs,
                        help="epochs of each corner's fit")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    threads = common.set_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    result: dict[str, Any] = {"command": "python benchmarks/bench_stability.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k != "out"), "threads": threads}
    with tempfile.TemporaryDirectory(prefix="bench-stability-") as tmp:
        cache = Path(tmp) / "cache"
        if "guard" in args.parts:
            result["guard"] = part_guard(cache, args.repeats)
        if "corners" in args.parts:
            result["corners"] = part_corners(cache, args.datasets, args.epochs)
        if "final" in args.parts:
            result["final"] = part_final(cache, args.datasets, args.seeds, ISSUE_POINT)
        if "runs" in args.parts:
            result["runs"] = part_runs(Path(tmp), args.datasets, args.seeds, args.threads)
    result["load_after"] = common.load_average()
    common.write_result(args.out, result)


if __name__ == "__main__":
    main()
