"""Evaluation: a full Fashion-MNIST test-set pass, mnist-flow's evaluate against the seed tutorial's test loop.

Both evaluate the same weights (an MLP trained for one epoch, copied into the seed's Net) on the 10,000
test images: the seed through torchvision's FashionMNIST dataset with ToTensor + Normalize and a
batch-1000 DataLoader under no_grad, mnist-flow on the normalised in-memory tensor in batches of 8192
under inference_mode. The two must agree on the accuracy; the timings alternate and the medians are
reported.

    python benchmarks/bench_eval.py --threads 1 --repeats 5 --out /tmp/eval.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import common
import torch

from mnist_flow.params import TrainConfig
from mnist_flow.training.loop import build_model, evaluate, make_step, train_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    threads = common.set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        work = Path(tmp)
        prepared = common.fashion_prepared(work / "cache")
        _, test_ds = common.seed_datasets(work / "tv")
        config = TrainConfig(hidden=(500, 256), epochs=1)
        model = build_model(config)
        s = prepared.splits
        train_epoch(make_step(model, config, s.train_x.shape[0]), s.train_x, s.train_y, 64,
                    torch.Generator().manual_seed(0))
        net = common.seed_net_like(model)
        loader = torch.utils.data.DataLoader(test_ds, batch_size=1000, shuffle=False)
        results: dict[str, tuple[float, float]] = {}

        def seed() -> common.Timing:
            with common.timed() as t:
                results["seed"] = common.seed_test(net, loader)
            return t

        def ours(name: str, precision: str):
            def run() -> common.Timing:
                with common.timed() as t:
                    r = evaluate(model, prepared.test_x, prepared.test_y, precision=precision)
                results[name] = (r.loss, r.accuracy)
                return t
            return run

        variants = {"seed": seed, "mnist-flow": ours("mnist-flow", "fp32"),
                    "mnist-flow, bf16 autocast": ours("mnist-flow, bf16 autocast", "bf16")}
        for run in variants.values():  # warm-up
            run()
        load_before = common.load_average()
        timings = common.alternate(variants, args.repeats)
    med = {k: {"wall": common.median([t.wall for t in v]), "cpu": common.median([t.cpu for t in v])}
           for k, v in timings.items()}
    result = {
        "benchmark": "eval", "command": f"python benchmarks/bench_eval.py --threads {args.threads} "
                                        f"--repeats {args.repeats}",
        "threads": threads, "repeats": args.repeats, "samples": int(prepared.test_y.numel()),
        "rows": [{"variant": k, "s_per_pass": med[k]["wall"], "cpu_s_per_pass": med[k]["cpu"],
                  "samples_per_s": prepared.test_y.numel() / med[k]["wall"],
                  "speedup_vs_seed": med["seed"]["wall"] / med[k]["wall"],
                  "cpu_speedup_vs_seed": med["seed"]["cpu"] / med[k]["cpu"],
                  "runs_wall": [round(t.wall, 4) for t in timings[k]],
                  "loss": results[k][0], "accuracy": results[k][1]} for k in timings],
        "accuracy_agrees": abs(results["seed"][1] - results["mnist-flow"][1]) < 1e-6,
        "load_before": load_before, "load_after": common.load_average(),
    }
    common.write_result(args.out, result)


if __name__ == "__main__":
    main()
