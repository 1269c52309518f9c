"""The ensemble of the final fits against the fit that validation picks, on the test set.

For one configuration: ``pipeline.fit_best`` (the final fit: guarded, best epoch kept) with the run's seed S
and S+1000, ..., at once in threads (as the flow runs them), then each fit alone, the fit with the highest
validation accuracy (what ``final_model=best`` registers) and their ensemble
(``training.model.ensemble_mlp``, which ``final_model=ensemble`` registers where its validation accuracy is
at least the best fit's), all on the test set.

    python benchmarks/bench_ensemble.py --dataset fashion-mnist --seed 1 \\
        --params '{"lr": 0.0364, "momentum": 0.806, "hidden1": 704, "hidden2": 320}'
    python benchmarks/bench_ensemble.py --dataset mnist --seed 2 \\
        --params '{"lr": 0.01593, "momentum": 0.9676, "hidden1": 704, "hidden2": 320}'
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import bench_stability
import common
import torch

from mnist_flow import pipeline
from mnist_flow.params import RunParams
from mnist_flow.search.study import config_from_params
from mnist_flow.training.loop import evaluate
from mnist_flow.training.model import ensemble_mlp
from mnist_flow.training.threads import FixedThreads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["sample", "fashion-mnist", "mnist"], default="fashion-mnist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", type=json.loads, required=True, help="lr, momentum, hidden1, hidden2 (JSON)")
    parser.add_argument("--fits", type=int, default=RunParams().final_seeds)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = RunParams(seed=args.seed, final_seeds=args.fits)
    config = config_from_params(args.params, params.base_config()).with_(epochs=params.final_epochs)
    seeds = pipeline.final_seeds(params)
    with tempfile.TemporaryDirectory(prefix="bench-ensemble-") as tmp:
        prepared = bench_stability.prepared_for(args.dataset, Path(tmp), args.seed)
        start = time.perf_counter()
        with ThreadPoolExecutor(len(seeds)) as pool:
            fits = list(pool.map(lambda seed: pipeline.fit_best(prepared, config.with_(seed=seed),
                                                                threads=FixedThreads(1)), seeds))
        seconds = time.perf_counter() - start
        s = prepared.splits
        rows: list[dict[str, Any]] = [
            {"seed": seed, "val": history.best.val_accuracy, "test": pipeline.evaluate_test(model, prepared).accuracy}
            for seed, (model, history) in zip(seeds, fits, strict=True)]
        picked = max(rows, key=lambda row: row["val"])  # the first wins a tie, as in pipeline.final_fits
        ensemble = ensemble_mlp([model for model, _ in fits])
        val = evaluate(ensemble, s.val_x, s.val_y, precision=config.precision).accuracy
        result = {"command": "python benchmarks/bench_ensemble.py " + " ".join(
                      f"--{k} {json.dumps(v) if isinstance(v, dict) else v}" for k, v in vars(args).items()
                      if k != "out"),
                  "dataset": args.dataset, "config": config.to_dict(), "fits": rows, "picked": picked,
                  "ensemble": {"val": val, "test": pipeline.evaluate_test(ensemble, prepared).accuracy},
                  "rule": "ensemble" if val >= picked["val"] else "fit", "fit_seconds": round(seconds, 1),
                  "load_after": common.load_average()}
    result["gain_points"] = round(100 * ((result["ensemble"]["test"] if result["rule"] == "ensemble"
                                          else picked["test"]) - picked["test"]), 2)
    common.write_result(args.out, result)


if __name__ == "__main__":
    main()
