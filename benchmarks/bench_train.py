"""Training throughput: the seed tutorial's loop against mnist-flow's train_epoch, and both against the FLOP floor.

mnist-flow's loop (train_epoch with the hand-written step of mnist_flow.training.step) runs in fp32 and in bf16; the
plain in-memory autograd loop (autograd, autocast, torch.optim.SGD; benchmarks/common.py) runs beside
it to show what the hand-written step saves. The command of the core issue's check,
``mnist-flow train ... --hidden 500,256 --lr 0.01 --momentum 0.9 --batch-size 64 --epochs 1 --json``, runs in
each round too (a child process; its per-epoch ``epoch_seconds`` is the figure, so its start-up and data
loading are not counted) unless ``--no-cli``.

Same data (Fashion-MNIST, the 54,000 training samples left after the pipeline's stratified 10% validation
split), same model (784-500-256-10), same optimizer (SGD lr 0.01, momentum 0.9), batch 64. Each round
runs one epoch of every variant and one measurement of the matmul rate, so all figures share the
machine's state; the table gives medians over the rounds.

The FLOP floor of an epoch is 3 x 2 x multiply-adds per sample x samples divided by the sustained rate of
the very GEMMs one batch-64 training step performs (forward, input-gradient and weight-gradient of every
layer), timed with torch.mm into preallocated outputs in the same process. The large-GEMM rate (2048^3)
is reported as the machine's practical matmul peak.

    python benchmarks/bench_train.py --threads 1 --repeats 3 --out /tmp/train.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import common
import torch
from torch import nn

from mnist_flow.params import TrainConfig
from mnist_flow.training.loop import build_model, make_step, train_epoch
from mnist_flow.training.model import multiply_adds_per_sample

HIDDEN = (500, 256)
BATCH = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-seed", action="store_true", help="skip the (slow) seed loop")
    parser.add_argument("--no-cli", action="store_true", help="skip the `mnist-flow train --json` runs")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    threads = common.set_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        prepared = common.fashion_prepared(work / "cache")
        x, y = prepared.splits.train_x, prepared.splits.train_y
        n = x.shape[0]
        config = TrainConfig(hidden=HIDDEN, lr=0.01, momentum=0.9, batch_size=BATCH, epochs=1, seed=0)

        train_ds, _ = common.seed_datasets(work / "tv")
        seed_subset = torch.utils.data.Subset(train_ds, common.train_indices(train_ds.targets).tolist())
        assert len(seed_subset) == n

        losses: dict[str, list[float]] = {}

        def ours(name: str, precision: str):
            def run() -> common.Timing:
                cfg = config.with_(precision=precision)
                step = make_step(build_model(cfg), cfg, n)
                generator = torch.Generator().manual_seed(0)
                with common.timed() as t:
                    loss = train_epoch(step, x, y, BATCH, generator)
                losses.setdefault(name, []).append(loss)
                return t
            return run

        def autograd(name: str, precision: str):
            def run() -> common.Timing:
                model = build_model(config)
                optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
                generator = torch.Generator().manual_seed(0)
                with common.timed() as t:
                    loss = common.autograd_epoch(model, x, y, optimizer, BATCH, generator, precision)
                losses.setdefault(name, []).append(loss)
                return t
            return run

        def seed() -> common.Timing:
            torch.manual_seed(0)
            net = common.SeedNet()
            loader = torch.utils.data.DataLoader(seed_subset, batch_size=BATCH, shuffle=True)
            optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
            with common.timed() as t:
                loss = common.seed_train_epoch(net, loader, optimizer, nn.CrossEntropyLoss())
            losses.setdefault("seed", []).append(loss)
            return t

        def cli(name: str, precision: str):
            """`mnist-flow train` with the seed configuration, as the core issue states its check."""
            cmd = [str(common.BIN / "mnist-flow"), "train", "--dataset", "fashion-mnist",
                   "--source", "dir", "--data-dir", str(common.FASHION_DIR), "--hidden", "500,256", "--lr", "0.01",
                   "--momentum", "0.9", "--batch-size", str(BATCH), "--epochs", "1", "--seed", "0",
                   "--precision", precision, "--json"]
            env = common.fresh_home_env(str(work / "cli-home"), threads=threads)

            def run() -> common.Timing:
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=600).stdout
                report = json.loads(out)
                assert report["train_samples"] == n, report["train_samples"]
                losses.setdefault(name, []).append(report.get("train_loss", [float("nan")])[-1])
                seconds = report["epoch_seconds"][0]
                return common.Timing(seconds, float("nan"))  # the child's CPU time per epoch is not reported
            return run

        rates: dict[str, list[common.Timing]] = {"step": [], "big": []}

        def floor() -> common.Timing:
            step, big = common.step_gemm_rate(HIDDEN, BATCH), common.big_gemm_rate()
            rates["step"].append(step)
            rates["big"].append(big)
            flops = 6 * multiply_adds_per_sample(HIDDEN) * n
            return common.Timing(flops / step.wall, flops / step.cpu)

        # Warm up every code path once (allocator, oneDNN kernels, DataLoader imports).
        for precision in ("fp32", "bf16"):
            cfg = config.with_(precision=precision)
            warm = make_step(build_model(cfg), cfg, 640)
            train_epoch(warm, x[:640], y[:640], BATCH, torch.Generator().manual_seed(0))
        common.step_gemm_rate(HIDDEN, BATCH, repeats=5)

        variants = {"floor": floor, "mnist-flow": ours("mnist-flow", "fp32")}
        if not args.no_seed:
            variants["seed"] = seed
        variants["mnist-flow, bf16"] = ours("mnist-flow, bf16", "bf16")
        if not args.no_cli:
            variants["`mnist-flow train --json`, fp32"] = cli("`mnist-flow train --json`, fp32", "fp32")
            variants["`mnist-flow train --json`, bf16"] = cli("`mnist-flow train --json`, bf16", "bf16")
        variants["autograd loop"] = autograd("autograd loop", "fp32")
        variants["autograd loop, bf16 autocast"] = autograd("autograd loop, bf16 autocast", "bf16")
        load_before = common.load_average()
        timings = common.alternate(variants, args.repeats)
        load_after = common.load_average()

    flops = 6 * multiply_adds_per_sample(HIDDEN) * n
    med = {k: {"wall": common.median([t.wall for t in v]), "cpu": common.median([t.cpu for t in v])}
           for k, v in timings.items()}
    rows = []
    for name in [k for k in variants if k != "floor"]:
        row = {"variant": name, "s_per_epoch": med[name]["wall"], "cpu_s_per_epoch": med[name]["cpu"],
               "samples_per_s": n / med[name]["wall"],
               "ratio_to_floor": med[name]["wall"] / med["floor"]["wall"],
               "cpu_ratio_to_floor": med[name]["cpu"] / med["floor"]["cpu"],
               "runs_wall": [round(t.wall, 3) for t in timings[name]],
               "final_loss": losses[name][-1]}
        if "seed" in med:
            row["speedup_vs_seed"] = med["seed"]["wall"] / med[name]["wall"]
            row["cpu_speedup_vs_seed"] = med["seed"]["cpu"] / med[name]["cpu"]
        rows.append(row)
    result = {
        "benchmark": "train", "command": f"python benchmarks/bench_train.py --threads {args.threads} "
                                         f"--repeats {args.repeats}",
        "threads": threads, "repeats": args.repeats, "samples": n, "batch": BATCH, "hidden": list(HIDDEN),
        "flops_per_epoch": flops, "multiply_adds_per_sample": multiply_adds_per_sample(HIDDEN),
        "floor_s_per_epoch": med["floor"]["wall"], "floor_cpu_s_per_epoch": med["floor"]["cpu"],
        "step_gemm_gflops": common.median([r.wall for r in rates["step"]]) / 1e9,
        "step_gemm_gflops_cpu": common.median([r.cpu for r in rates["step"]]) / 1e9,
        "big_gemm_gflops": common.median([r.wall for r in rates["big"]]) / 1e9,
        "big_gemm_gflops_cpu": common.median([r.cpu for r in rates["big"]]) / 1e9,
        "rows": rows, "losses": losses, "load_before": load_before, "load_after": load_after,
    }
    common.write_result(args.out, result)


if __name__ == "__main__":
    main()
