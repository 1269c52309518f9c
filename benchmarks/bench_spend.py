"""Where spare time helps most: more trials, or a refit of the top configurations with more seeds?

Issue 13 asks for it once the run got faster. For each seed, on Fashion-MNIST with the default budgets:

- base: ``pipeline.tune`` with ``n_trials`` trials (one process, the default thread policy), then
  ``pipeline.final_fit`` of the best trial (what a run registers): its validation and test accuracy.
- top-k configurations: ``pipeline.final_fit`` of the next ``k - 1`` best trials too; the model with the highest
  validation accuracy is kept. Extra time: those fits.
- more seeds: the best configuration's final fit again with ``k - 1`` other training seeds; the highest
  validation accuracy is kept. Extra time: those fits.
- more trials: the same run goes on with as many more trials as the base run does in the time of the
  slower refit arm; then the final fit of its best trial (if the best changed).

Selection is by validation accuracy everywhere; the test accuracy is only reported. Every arm starts from
the same first ``n_trials`` trials and the same base fit, so the comparison is of the extra time only.

    python benchmarks/bench_spend.py --seeds 0 1 2 --k 3 --out /tmp/spend.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import optuna

from mnist_flow import pipeline
from mnist_flow.data.datasets import load_dataset
from mnist_flow.params import RunParams
from mnist_flow.progress import quiet_optuna
from mnist_flow.training.threads import bound_native_caches, policy_for


def _fit(prepared: pipeline.Prepared, trial: optuna.trial.FrozenTrial, params: RunParams) -> dict[str, Any]:
    t0 = time.perf_counter()
    fitted = pipeline.final_fit(prepared, trial, params, threads=policy_for(None))
    test = pipeline.evaluate_test(fitted.model, prepared)
    return {"trial": trial.number, "seed": params.seed, "val": fitted.history.best.val_accuracy,
            "test": test.accuracy, "seconds": time.perf_counter() - t0}


def _best_by_val(fits: list[dict[str, Any]]) -> dict[str, Any]:
    return max(fits, key=lambda f: f["val"])


def one_seed(seed: int, k: int, budgets: dict[str, int], work: Path) -> dict[str, Any]:
    params = RunParams.parse(dataset="fashion-mnist", source="dir", data_dir=str(common.FASHION_DIR), seed=seed,
                             workers=1, final_data="train", **budgets)  # arms chosen on held-out val
    n_trials = params.n_trials
    bundle = load_dataset("fashion-mnist", "dir", data_dir=common.FASHION_DIR, cache_dir=work / "cache")
    prepared = pipeline.prepare(bundle, val_fraction=params.val_fraction, seed=seed)
    url = f"sqlite:///{work / f'spend-{seed}.db'}"
    run_key = pipeline.new_run_key()

    def tune(n: int) -> pipeline.Tuned:
        return pipeline.tune(prepared, params.model_copy(update={"n_trials": n}), url, run_key=run_key,
                             threads=policy_for(None))

    t0 = time.perf_counter()
    tuned = tune(n_trials)
    tune_s = time.perf_counter() - t0
    base = _fit(prepared, tuned.best, params)

    complete = sorted((t for t in tuned.trials if t.state == optuna.trial.TrialState.COMPLETE
                       and t.user_attrs.get("run_key") == run_key), key=lambda t: t.value or 0.0, reverse=True)
    top = [base] + [_fit(prepared, t, params) for t in complete[1:k]]
    seeds = [base] + [_fit(prepared, tuned.best, params.model_copy(update={"seed": seed + 1000 * i}))
                      for i in range(1, k)]
    budget = max(sum(f["seconds"] for f in top[1:]), sum(f["seconds"] for f in seeds[1:]))

    extra = max(1, round(budget / (tune_s / n_trials)))  # as many trials as the base run does in that time
    t0 = time.perf_counter()
    more = tune(n_trials + extra)  # the same run key: the study runs the extra trials, one sampler as in one run
    trials_s = time.perf_counter() - t0
    if more.best.number == tuned.best.number:
        more_fit = {**base, "seconds": 0.0}
    else:
        more_fit = _fit(prepared, more.best, params)
    return {
        "seed": seed, "tune_seconds": tune_s, "best_trial": tuned.best.number, "best_trial_val": tuned.best.value,
        "base": base,
        "top_k": {"fits": top, "kept": _best_by_val(top), "extra_seconds": sum(f["seconds"] for f in top[1:])},
        "more_seeds": {"fits": seeds, "kept": _best_by_val(seeds),
                       "extra_seconds": sum(f["seconds"] for f in seeds[1:])},
        "more_trials": {"trials": extra, "best_trial": more.best.number, "best_trial_val": more.best.value,
                        "kept": more_fit, "extra_seconds": trials_s + more_fit["seconds"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--k", type=int, default=3, help="configurations (or seeds) fitted in the refit arms")
    defaults = RunParams()
    parser.add_argument("--n-trials", type=int, default=defaults.n_trials)
    parser.add_argument("--max-epochs", type=int, default=defaults.max_epochs)
    parser.add_argument("--final-epochs", type=int, default=defaults.final_epochs)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    quiet_optuna()
    bound_native_caches(adaptive=True)  # as the flow's process does (the default thread policy)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            budgets = {"n_trials": args.n_trials, "max_epochs": args.max_epochs, "final_epochs": args.final_epochs}
            run = one_seed(seed, args.k, budgets, Path(tmp))
            runs.append(run)
            print(f"seed {seed}: base test {run['base']['test']:.4f}; top-{args.k} "
                  f"{run['top_k']['kept']['test']:.4f} (+{run['top_k']['extra_seconds']:.0f} s); more seeds "
                  f"{run['more_seeds']['kept']['test']:.4f} (+{run['more_seeds']['extra_seconds']:.0f} s); "
                  f"+{run['more_trials']['trials']} trials {run['more_trials']['kept']['test']:.4f} "
                  f"(+{run['more_trials']['extra_seconds']:.0f} s)", flush=True)
    result = {"machine": common.machine(), "load": common.load_average(), "k": args.k, "n_trials": args.n_trials,
              "max_epochs": args.max_epochs, "final_epochs": args.final_epochs, "runs": runs}
    for arm in ("base", "top_k", "more_seeds", "more_trials"):
        tests = [r[arm]["test"] if arm == "base" else r[arm]["kept"]["test"] for r in runs]
        result[f"mean_test_{arm}"] = sum(tests) / len(tests)
        print(f"{arm}: mean test {result[f'mean_test_{arm}']:.4f} over seeds {args.seeds}")
    common.write_result(args.out, result)


if __name__ == "__main__":
    main()
