"""Search efficiency: the same TPE sampler and seed on Fashion-MNIST, with and without the Hyperband pruner.

Both studies use mnist-flow's Objective, search space and recipe (RunParams defaults: batch 128, weight decay
5e-4, one-cycle schedule) with in-memory storage, the seed configuration enqueued first (as open_study does),
and stop after ``--n-trials`` trials of ``--max-epochs`` epochs. Reported per study: epochs trained in all,
wall time, the epochs and seconds spent until the best reported validation accuracy first reaches
``--target``, the best complete trial, and the test accuracy of that configuration retrained (training is
deterministic, so this is the trial's model).

    python benchmarks/bench_search.py --n-trials 12 --max-epochs 6 --out /tmp/search.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import optuna

import common
from mnist_flow.pipeline import RunParams
from mnist_flow.train import evaluate, train_model
from mnist_flow.tune import SEED_PARAMS, Objective, best_trial, config_from_params, make_pruner

optuna.logging.set_verbosity(optuna.logging.WARNING)


def run(prepared, params: RunParams, pruned: bool, target: float) -> dict:
    sampler = optuna.samplers.TPESampler(seed=params.seed, n_startup_trials=8, multivariate=True)
    pruner = make_pruner(params.max_epochs) if pruned else optuna.pruners.NopPruner()
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    study.enqueue_trial(SEED_PARAMS)
    clock = {"epochs": 0, "start": time.perf_counter(), "best": 0.0, "reached": None}

    def on_epoch(trial, stats) -> None:
        clock["epochs"] += 1
        clock["best"] = max(clock["best"], stats.val_accuracy)
        if clock["reached"] is None and clock["best"] >= target:
            clock["reached"] = {"epochs": clock["epochs"], "seconds": time.perf_counter() - clock["start"],
                                "trial": trial.number}

    objective = Objective(prepared.splits, params.search_space(), params.base_config(), on_epoch=on_epoch)
    study.optimize(objective, n_trials=params.n_trials)
    wall = time.perf_counter() - clock["start"]
    best = best_trial(study)
    config = config_from_params(best.params, params.base_config())
    s = prepared.splits
    model, _ = train_model(config, s.train_x, s.train_y, s.val_x, s.val_y)
    test = evaluate(model, prepared.test_x, prepared.test_y)
    states = [t.state.name for t in study.trials]
    return {"pruner": "Hyperband" if pruned else "none", "epochs": clock["epochs"], "wall_s": wall,
            "reached_target": clock["reached"], "best_trial": best.number, "best_val_accuracy": best.value,
            "best_params": best.params, "test_accuracy": test.accuracy,
            "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-trials", type=int, default=12)
    parser.add_argument("--max-epochs", type=int, default=6)
    parser.add_argument("--target", type=float, default=0.89)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    threads = common.set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        prepared = common.fashion_prepared(Path(tmp))
    params = RunParams(dataset="fashion-mnist", source="dir", data_dir=common.FASHION_DIR, n_trials=args.n_trials,
                       max_epochs=args.max_epochs, seed=0)
    rows = []
    for pruned in (True, False):
        rows.append(run(prepared, params, pruned, args.target))
        print(f"  {rows[-1]} (load {common.load_average()})", flush=True)
    saved = 1 - rows[0]["epochs"] / rows[1]["epochs"]
    common.write_result(args.out, {
        "benchmark": "search", "command": f"python benchmarks/bench_search.py --n-trials {args.n_trials} "
                                          f"--max-epochs {args.max_epochs} --target {args.target}",
        "threads": threads, "target": args.target, "rows": rows, "epochs_saved_fraction": saved,
        "load_after": common.load_average()})


if __name__ == "__main__":
    main()
