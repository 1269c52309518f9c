"""Search efficiency: the same TPE sampler and seed on Fashion-MNIST, with and without mnist-flow's pruner.

Both studies use mnist-flow's Objective, search space and recipe (RunParams defaults: batch 128, weight decay
5e-4, one-cycle schedule) with in-memory storage, the seed configuration enqueued first (as open_study does),
and stop after ``--n-trials`` trials of ``--max-epochs`` epochs. Reported per study: epochs trained in all,
wall time, the epochs and seconds spent until the best reported validation accuracy first reaches
``--target``, the best complete trial, and the test accuracy of that configuration retrained (training is
deterministic, so this is the trial's model). With several ``--seeds`` (sampler seed and recipe seed) the pair
of studies runs once per seed and the summary gives medians over the seeds. "Equal best result" means
the pruned study's best validation accuracy is within one standard error of a validation-accuracy estimate
(sqrt(p(1-p)/n), about 0.004 for 6,000 images at 0.9) of the unpruned one's, or above it.

    python benchmarks/bench_search.py --n-trials 12 --max-epochs 6 --seeds 0 1 2 --out /tmp/search.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common
import optuna

from mnist_flow.params import RunParams
from mnist_flow.search.study import SEED_PARAMS, Objective, best_trial, config_from_params, make_pruner
from mnist_flow.training.loop import evaluate, train_model

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

    objective = Objective(prepared.splits, params.space, params.base_config(), on_epoch=on_epoch)
    study.optimize(objective, n_trials=params.n_trials)
    wall = time.perf_counter() - clock["start"]
    best = best_trial(study)
    config = config_from_params(best.params, params.base_config())
    s = prepared.splits
    model, _ = train_model(config, s.train_x, s.train_y, s.val_x, s.val_y)
    test = evaluate(model, prepared.test_x, prepared.test_y)
    states = [t.state.name for t in study.trials]
    return {"pruner": type(pruner).__name__.removesuffix("Pruner") if pruned else "none", "epochs": clock["epochs"], "wall_s": wall,
            "reached_target": clock["reached"], "best_trial": best.number, "best_val_accuracy": best.value,
            "best_params": best.params, "test_accuracy": test.accuracy,
            "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED")}


def standard_error(accuracy: float, n: int) -> float:
    return (accuracy * (1 - accuracy) / n) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-trials", type=int, default=12)
    parser.add_argument("--max-epochs", type=int, default=6)
    parser.add_argument("--target", type=float, default=0.89)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    threads = common.set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        prepared = common.fashion_prepared(Path(tmp))
    rows, pairs = [], []
    n_val = int(prepared.splits.val_y.numel())
    for seed in args.seeds:
        params = RunParams(dataset="fashion-mnist", source="dir", data_dir=common.FASHION_DIR,
                           n_trials=args.n_trials, max_epochs=args.max_epochs, seed=seed)
        pair = []
        for pruned in (True, False):
            pair.append({"seed": seed, **run(prepared, params, pruned, args.target)})
            print(f"  {pair[-1]} (load {common.load_average()})", flush=True)
        with_pruner, without = pair
        tolerance = standard_error(without["best_val_accuracy"], n_val)
        pairs.append({"seed": seed, "epochs_saved_fraction": 1 - with_pruner["epochs"] / without["epochs"],
                      "best_val_difference": with_pruner["best_val_accuracy"] - without["best_val_accuracy"],
                      "test_difference": with_pruner["test_accuracy"] - without["test_accuracy"],
                      "tolerance": tolerance,
                      "equal_best": with_pruner["best_val_accuracy"] >= without["best_val_accuracy"] - tolerance})
        rows += pair
    common.write_result(args.out, {
        "benchmark": "search", "command": f"python benchmarks/bench_search.py --n-trials {args.n_trials} "
                                          f"--max-epochs {args.max_epochs} --target {args.target} "
                                          f"--seeds {' '.join(map(str, args.seeds))} --threads {args.threads}",
        "threads": threads, "target": args.target, "val_samples": n_val, "rows": rows, "pairs": pairs,
        "epochs_saved_fraction": common.median([p["epochs_saved_fraction"] for p in pairs]),
        "best_val_difference": common.median([p["best_val_difference"] for p in pairs]),
        "equal_best_count": sum(p["equal_best"] for p in pairs),
        "load_after": common.load_average()})


if __name__ == "__main__":
    main()
