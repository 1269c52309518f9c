"""The final fit with and without the validation split in its training data (issue 13: the 0.900 bar).

For fixed configurations (the best trials of three default Fashion-MNIST runs), fit the final budget with
``--fits`` training seeds (run seed, +1000, ...; two at a time, one intra-op thread each, as the flow does)
on the training split alone (``train``) and on the training and validation splits (``train+val``, what
``final_data`` defaults to), and print each fit's validation and test accuracy and those of the ensembles
of the first 2, 3, ... fits. Selection never looks at the test set; it is only reported.

    python benchmarks/bench_final_data.py --data train train+val --fits 2 --runs 0 1 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import common
import torch

from mnist_flow import pipeline
from mnist_flow.data.datasets import load_dataset
from mnist_flow.params import RunParams
from mnist_flow.training.loop import evaluate
from mnist_flow.training.model import ensemble_mlp
from mnist_flow.training.threads import FixedThreads, bound_native_caches

#: The best trial of `flows/mnist.py --dataset fashion-mnist --seed S` (docs/benchmarks.md, "The ensemble of
#: the final fits"): lr, momentum, hidden sizes, by run seed S.
CONFIGS = {0: (0.242, 0.537, (640, 384)), 1: (0.0364, 0.806, (704, 320)), 2: (0.0199, 0.962, (448, 192))}


def one(run: int, data: str, fits: int, epochs: int | None, cache: Path) -> dict[str, Any]:
    params = RunParams.parse(dataset="fashion-mnist", source="dir", data_dir=str(common.FASHION_DIR), seed=run,
                             final_data=data)
    bundle = load_dataset("fashion-mnist", "dir", data_dir=common.FASHION_DIR, cache_dir=cache)
    prepared = pipeline.prepare(bundle, val_fraction=params.val_fraction, seed=run)
    splits = pipeline.final_splits(prepared, params)
    lr, momentum, hidden = CONFIGS[run]
    config = params.base_config().with_(lr=lr, momentum=momentum, hidden=hidden, epochs=epochs or params.final_epochs)
    seeds = pipeline.final_seeds(params.model_copy(update={"final_seeds": fits}))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        trained = list(pool.map(lambda seed: pipeline.fit_best(
            prepared, config.with_(seed=seed), threads=FixedThreads(1, "two fits at once"), splits=splits), seeds))
    seconds = time.perf_counter() - t0
    rows = [{"seed": seed, "val": history.best.val_accuracy, "kept_epoch": history.best.epoch,
             "test": pipeline.evaluate_test(model, prepared).accuracy} for seed, (model, history) in zip(seeds, trained)]
    ensembles = []
    for k in range(2, fits + 1):
        model = ensemble_mlp([m for m, _ in trained[:k]])
        val = evaluate(model, prepared.splits.val_x, prepared.splits.val_y, precision=config.precision)
        ensembles.append({"fits": k, "val": val.accuracy, "test": pipeline.evaluate_test(model, prepared).accuracy})
    return {"run": run, "data": data, "config": config.to_dict(), "train_samples": len(splits.train_y),
            "fits": rows, "ensembles": ensembles, "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", choices=["train", "train+val"], default=["train", "train+val"])
    parser.add_argument("--fits", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None, help="default: final_epochs")
    parser.add_argument("--runs", nargs="+", type=int, choices=sorted(CONFIGS), default=sorted(CONFIGS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    bound_native_caches(adaptive=False)
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-final-data-") as cache:
        for run in args.runs:
            for data in args.data:
                result = one(run, data, args.fits, args.epochs, Path(cache))
                results.append(result)
                fits = ", ".join(f"{f['seed']}: {f['val']:.4f}/{f['test']:.4f}" for f in result["fits"])
                ens = ", ".join(f"{e['fits']}: {e['val']:.4f}/{e['test']:.4f}" for e in result["ensembles"])
                print(f"run {run} {data:9} ({result['train_samples']} images, {result['seconds']} s) "
                      f"fits val/test {fits}; ensembles {ens}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"benchmark": "final_data", "results": results}, indent=2))


if __name__ == "__main__":
    main()
