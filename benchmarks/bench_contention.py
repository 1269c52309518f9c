"""Contention: epoch time, tuning throughput and `make run`, quiet and next to one and two CPU-bound processes.

A Prefect worker shares its machine with the worker itself, logging, often the server: the default must
be fast there, not only on an idle machine. Every figure is measured side by side in one run, each
command in a fresh child process with a fresh MNIST_FLOW_HOME; the neighbours are `python -c "while True:
pass"` processes started before the command and killed after it. Conditions and variants alternate
within each round.

- epoch: the seed configuration (784-500-256-10, SGD lr 0.01 momentum 0.9, batch 64) on Fashion-MNIST,
  `mnist-flow train --epochs E --json`, median epoch seconds; policies: the default (adaptive threads),
  `MNIST_FLOW_THREADS=1`, `MNIST_FLOW_THREADS=2`.
- tune: `flows/mnist.py` on Fashion-MNIST at the default budgets (20 trials of at most 8 epochs),
  trials per minute of the tune stage and the best validation accuracy; `workers=auto` (the default:
  single-threaded trial processes), `workers=1` (trials in the flow's process, adaptive threads) and
  `workers=1` with `MNIST_FLOW_THREADS=1`. With `--seeds`, each variant runs once per seed in each round:
  the best validation accuracy of one seed is one TPE path over 20 trials, so comparing the designs'
  search quality needs several seeds (the per-seed table and the mean difference in the result).
- make run: the whole default run on Fashion-MNIST (wall, peak RSS of the largest process, test accuracy).

    python benchmarks/bench_contention.py --out /tmp/contention.json            # full: about 70 minutes (estimated)
    python benchmarks/bench_contention.py --quick --out /tmp/contention.json    # short check: 10-15 minutes
    python benchmarks/bench_contention.py --only tune --conditions quiet --repeats 1 --seeds 0 1 2  # search quality
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import common
from proc import run_measured

CONDITIONS = {"quiet": 0, "1 CPU-bound neighbour": 1, "2 CPU-bound neighbours": 2}
FASHION = ["--dataset", "fashion-mnist", "--source", "dir", "--data-dir", str(common.FASHION_DIR)]
SPIN = "while True: pass"


@contextmanager
def neighbours(count: int):
    procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(count)]
    try:
        time.sleep(0.5 if count else 0)
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def env_for(home: str, threads: int | None) -> dict[str, str]:
    """A fresh home; ``threads`` pins MNIST_FLOW_THREADS, None leaves the product's default policy."""
    env = common.fresh_home_env(home, threads=threads or 1)
    if threads is None:
        env.pop("MNIST_FLOW_THREADS", None)
        env.pop("OMP_NUM_THREADS", None)
    return env


def _json_out(text: str) -> dict[str, Any]:
    return json.JSONDecoder().raw_decode(text[text.index("{"):])[0]


def run_epoch(epochs: int, threads: int | None, count: int) -> dict[str, Any]:
    cmd = [str(common.BIN / "mnist-flow"), "train", *FASHION, "--epochs", str(epochs), "--json"]
    with tempfile.TemporaryDirectory(prefix="bench-cont-") as home, neighbours(count):
        res = run_measured(cmd, env=env_for(home, threads), cwd=common.ROOT)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    out = _json_out(res.stdout)
    return {"epoch_seconds": out["epoch_seconds"], "median_s": common.median(out["epoch_seconds"]),
            "test_accuracy": out["test_accuracy"], "threads": out.get("threads")}


def run_flow(budget: list[str], workers: str, threads: int | None, count: int, seed: int = 0) -> dict[str, Any]:
    cmd = [common.PYTHON, str(common.ROOT / "flows" / "mnist.py"), *FASHION, *budget, "--workers", workers,
           "--seed", str(seed), "--json"]
    with tempfile.TemporaryDirectory(prefix="bench-cont-") as home, neighbours(count):
        res = run_measured(cmd, env=env_for(home, threads), cwd=common.ROOT)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    summary = _json_out(res.stdout)
    tune_s = summary["seconds"]["tune"]
    return {"wall_s": res.wall, "tune_s": tune_s, "stages": summary["seconds"],
            "trials_per_minute": summary["trials"]["finished"] / tune_s * 60,
            "epochs": summary["trials"]["epochs"], "epochs_per_minute": summary["trials"]["epochs"] / tune_s * 60,
            "seed": seed, "best_val_accuracy": summary["best"]["val_accuracy"], "test_accuracy": summary["metrics"]["test_accuracy"],
            "complete": summary["trials"]["complete"], "pruned": summary["trials"]["pruned"],
            "process_peak_mb": res.maxrss_mb, "tree_peak_mb": res.tree_peak_mb}


EPOCH_POLICIES = {"default (adaptive threads)": None, "MNIST_FLOW_THREADS=1": 1, "MNIST_FLOW_THREADS=2": 2}
TUNE_VARIANTS = {"workers=auto (default)": ("auto", None), "workers=1, adaptive threads": ("1", None),
                 "workers=1, MNIST_FLOW_THREADS=1": ("1", 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small budgets: checks the benchmark, not the targets")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--only", nargs="*", choices=["epoch", "tune", "make-run"], default=None)
    parser.add_argument("--conditions", nargs="*", choices=list(CONDITIONS), default=None,
                        help="only these conditions (default: all three)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0],
                        help="run seeds of the tune part (default: 0); each variant runs once per seed and round")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    parts = args.only or ["epoch", "tune", "make-run"]
    conditions = {c: n for c, n in CONDITIONS.items() if not args.conditions or c in args.conditions}
    repeats = args.repeats or (1 if args.quick else 2)
    epochs = 1 if args.quick else 3
    tune_budget = (["--n-trials", "4", "--max-epochs", "2", "--final-epochs", "1"] if args.quick
                   else ["--n-trials", "20", "--max-epochs", "8", "--final-epochs", "1"])
    run_budget = ["--n-trials", "4", "--max-epochs", "2", "--final-epochs", "2"] if args.quick else []
    runs: dict[str, dict[str, dict[str, list]]] = {"epoch": {}, "tune": {}, "make-run": {}}

    def record(part: str, variant: str, condition: str, result: dict[str, Any]) -> None:
        runs[part].setdefault(variant, {}).setdefault(condition, []).append(result)
        brief = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()
                 if k in ("seed", "median_s", "trials_per_minute", "best_val_accuracy", "wall_s", "process_peak_mb",
                          "test_accuracy")}
        print(f"  {part} | {variant} | {condition}: {brief} (load {common.load_average()})", flush=True)

    for r in range(repeats):
        print(f"round {r + 1}/{repeats}", flush=True)
        for condition, count in conditions.items():
            if "epoch" in parts:
                for name, threads in EPOCH_POLICIES.items():
                    record("epoch", name, condition, run_epoch(epochs, threads, count))
            if "tune" in parts:
                for seed in args.seeds:
                    for name, (workers, threads) in TUNE_VARIANTS.items():
                        record("tune", name, condition, run_flow(tune_budget, workers, threads, count, seed))
            if "make-run" in parts and count < 2:
                record("make-run", "make run (defaults)", condition, run_flow(run_budget, "auto", None, count))

    def med(part: str, variant: str, condition: str, key: str) -> float | None:
        values = [x[key] for x in runs[part].get(variant, {}).get(condition, [])]
        return common.median(values) if values else None

    summary: dict[str, Any] = {"epoch": {}, "tune": {}, "make-run": {}}
    for part, table in runs.items():
        for variant, by_condition in table.items():
            for condition, results in by_condition.items():
                keys = [k for k, v in results[0].items() if isinstance(v, (int, float)) and k != "seed"]
                summary[part].setdefault(variant, {})[condition] = {
                    **{k: common.median([x[k] for x in results]) for k in keys},
                    "runs": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in x.items()}
                             for x in results]}
    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    one_quiet = med("epoch", "MNIST_FLOW_THREADS=1", "quiet", "median_s")
    two_quiet = med("epoch", "MNIST_FLOW_THREADS=2", "quiet", "median_s")
    run = "make run (defaults)"
    peaks = [x["process_peak_mb"] for c in runs["make-run"].get(run, {}).values() for x in c]
    targets: dict[str, Any] = {
        "default epoch next to 1 neighbour / quiet 1-thread epoch (<= 1.3)": ratio(
            med("epoch", "default (adaptive threads)", "1 CPU-bound neighbour", "median_s"), one_quiet),
        "quiet default epoch / best of quiet 1 and 2 threads (<= 1.10)": ratio(
            med("epoch", "default (adaptive threads)", "quiet", "median_s"),
            min(one_quiet, two_quiet) if one_quiet and two_quiet else None),
        "quiet tuning throughput workers=auto / workers=1 (>= 1.7)": ratio(
            med("tune", "workers=auto (default)", "quiet", "trials_per_minute"),
            med("tune", "workers=1, adaptive threads", "quiet", "trials_per_minute")),
        "quiet tuning epochs per minute workers=auto / workers=1": ratio(
            med("tune", "workers=auto (default)", "quiet", "epochs_per_minute"),
            med("tune", "workers=1, adaptive threads", "quiet", "epochs_per_minute")),
        "quiet tuning throughput workers=auto / workers=1 with MNIST_FLOW_THREADS=1": ratio(
            med("tune", "workers=auto (default)", "quiet", "trials_per_minute"),
            med("tune", "workers=1, MNIST_FLOW_THREADS=1", "quiet", "trials_per_minute")),
        "make run wall s, quiet (<= 180)": med("make-run", run, "quiet", "wall_s"),
        "make run wall s, 1 neighbour (<= 240)": med("make-run", run, "1 CPU-bound neighbour", "wall_s"),
        "make run test accuracy, quiet (>= 0.900)": med("make-run", run, "quiet", "test_accuracy"),
        "make run peak RSS of the largest process MB (<= 1536)": max(peaks) if peaks else None,
    }
    # search quality by seed: the mean over the seeds of each variant's best validation accuracy (the median
    # over the rounds for a seed), and the default's difference to one worker's
    search: dict[str, dict[str, Any]] = {}
    for variant, by_condition in runs["tune"].items():
        for condition, results in by_condition.items():
            by_seed = {seed: common.median([x["best_val_accuracy"] for x in results if x["seed"] == seed])
                       for seed in sorted({x["seed"] for x in results})}
            search.setdefault(variant, {})[condition] = {
                "by_seed": by_seed, "mean": sum(by_seed.values()) / len(by_seed)}
    summary["search"] = search

    def mean_best(variant: str) -> float | None:
        return search.get(variant, {}).get("quiet", {}).get("mean")

    auto_best, one_best = mean_best("workers=auto (default)"), mean_best("workers=1, adaptive threads")
    if auto_best is not None and one_best is not None:
        targets[f"quiet best val accuracy workers=auto - workers=1, mean of {len(args.seeds)} seed(s)"] = (
            auto_best - one_best)
    targets = {k: v for k, v in targets.items() if v is not None}
    common.write_result(args.out, {
        "benchmark": "contention", "command": "python benchmarks/bench_contention.py"
        + (" --quick" if args.quick else "") + (f" --repeats {args.repeats}" if args.repeats else "")
        + (f" --only {' '.join(args.only)}" if args.only else "")
        + (f" --conditions {' '.join(repr(c) if ' ' in c else c for c in args.conditions)}" if args.conditions else "")
        + (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != [0] else ""),
        "quick": args.quick, "repeats": repeats, "seeds": args.seeds, "epochs": epochs, "tune_budget": tune_budget,
        "run_budget": run_budget or "defaults", "conditions": list(conditions), "summary": summary,
        "targets": targets, "cpus": common.machine().get("CPU(s)"), "load_after": common.load_average()})


if __name__ == "__main__":
    main()
