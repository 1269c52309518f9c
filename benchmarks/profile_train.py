"""Where an epoch of train_epoch spends its time: torch.profiler over batch-64 steps on Fashion-MNIST.

Profiles ``--steps`` steps of mnist-flow's train_epoch (784-500-256-10, SGD momentum, batch 64) on the
first samples of the 54,000-sample training split, and groups the operators' self CPU time into
matmul, optimizer, loss, activation, batch gathering and the rest. Run it at 1 and at 2 threads to
see what intra-op threading does on this machine.

    python benchmarks/profile_train.py --threads 1 --steps 300 --out /tmp/profile.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import common
from mnist_flow.train import TrainConfig, build_model, make_optimizer, train_epoch

GROUPS = {
    "matmul (mm, addmm)": ("aten::mm", "aten::addmm"),
    "optimizer (foreach add/mul)": ("aten::_foreach_add_", "aten::_foreach_mul_", "aten::_foreach_add",
                                    "aten::add_", "aten::mul_", "aten::mul"),
    "loss (log_softmax, nll and their backward)": ("aten::_log_softmax", "aten::_log_softmax_backward_data",
                                                   "aten::nll_loss_forward", "aten::nll_loss_backward"),
    "activation (relu, threshold_backward)": ("aten::clamp_min", "aten::threshold_backward"),
    "bias gradient (sum)": ("aten::sum",),
    "batch gathering (index_select)": ("aten::index_select",),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    threads = common.set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        prepared = common.fashion_prepared(Path(tmp))
    n = args.steps * 64
    x, y = prepared.splits.train_x[:n].clone(), prepared.splits.train_y[:n].clone()
    config = TrainConfig(hidden=(500, 256), lr=0.01, momentum=0.9, batch_size=64, epochs=1)
    model = build_model(config)
    optimizer = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(0)
    train_epoch(model, x, y, optimizer, 64, generator)  # warm-up
    with common.timed() as plain:
        train_epoch(model, x, y, optimizer, 64, generator)
    with profile(activities=[ProfilerActivity.CPU]) as prof, common.timed() as profiled:
        train_epoch(model, x, y, optimizer, 64, generator)
    averages = prof.key_averages()
    self_us = {e.key: e.self_cpu_time_total for e in averages}
    total_self = sum(self_us.values())
    grouped = {}
    for group, keys in GROUPS.items():
        grouped[group] = sum(self_us.get(k, 0.0) for k in keys)
    grouped["other operators"] = total_self - sum(grouped.values())
    shares = {k: round(100 * v / total_self, 1) for k, v in grouped.items()}
    result = {
        "benchmark": "profile", "command": f"python benchmarks/profile_train.py --threads {args.threads} "
                                           f"--steps {args.steps}",
        "threads": threads, "steps": args.steps, "ms_per_step_wall": 1000 * plain.wall / args.steps,
        "ms_per_step_cpu": 1000 * plain.cpu / args.steps,
        "ms_per_step_profiled": 1000 * profiled.wall / args.steps,
        "operator_self_ms_per_step": 1000 * total_self / 1e6 / args.steps,
        "group_ms_per_step": {k: round(v / 1000 / args.steps, 4) for k, v in grouped.items()},
        "group_share_percent": shares,
        "table": averages.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40),
        "load": common.load_average(),
    }
    common.write_result(args.out, result)


if __name__ == "__main__":
    main()
