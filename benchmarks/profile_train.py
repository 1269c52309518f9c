"""Where an epoch of train_epoch spends its time: torch.profiler over batch-64 steps on Fashion-MNIST.

Profiles ``--steps`` steps of mnist-flow's train_epoch (784-500-256-10, SGD momentum, batch 64) on the
first samples of the 54,000-sample training split, and groups the operators' self CPU time into
matmul, SGD update, casts, loss, activation, batch gathering and the rest. ``--precision`` picks the
step's arithmetic; ``--autograd`` profiles the plain autograd loop instead (benchmarks/common.py), to
see what the hand-written step removed. Run it at 1 and at 2 threads to see what intra-op threading
does on this machine.

    python benchmarks/profile_train.py --threads 1 --steps 300 --precision bf16 --out /tmp/profile.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import common
import torch
from torch.profiler import ProfilerActivity, profile

from mnist_flow.params import TrainConfig
from mnist_flow.training.loop import build_model, make_step, train_epoch

GROUPS = {
    "matmul (mm, addmm)": ("aten::mm", "aten::addmm"),
    "SGD update (add, mul)": ("aten::_foreach_add_", "aten::_foreach_mul_", "aten::_foreach_add",
                              "aten::add_", "aten::add", "aten::mul_", "aten::mul"),
    "casts (copy_, _to_copy)": ("aten::copy_", "aten::_to_copy"),
    "loss (log_softmax, nll and their backward)": ("aten::_log_softmax", "aten::_log_softmax_backward_data",
                                                   "aten::nll_loss_forward", "aten::nll_loss_backward"),
    "activation (relu, threshold_backward)": ("aten::clamp_min", "aten::clamp_min_", "aten::threshold_backward"),
    "softmax gradient (exp_, gather, scatter_add_)": ("aten::exp_", "aten::gather", "aten::scatter_add_"),
    "bias gradient (sum)": ("aten::sum",),
    "batch gathering (index_select)": ("aten::index_select",),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--autograd", action="store_true", help="profile the plain autograd loop instead")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    threads = common.set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        prepared = common.fashion_prepared(Path(tmp))
    n = args.steps * 64
    x, y = prepared.splits.train_x[:n].clone(), prepared.splits.train_y[:n].clone()
    config = TrainConfig(hidden=(500, 256), lr=0.01, momentum=0.9, batch_size=64, epochs=1, precision=args.precision)
    model = build_model(config)
    if args.autograd:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)

        def epoch(generator: torch.Generator) -> None:
            common.autograd_epoch(model, x, y, optimizer, 64, generator, args.precision)
    else:
        step = make_step(model, config, n)

        def epoch(generator: torch.Generator) -> None:
            train_epoch(step, x, y, 64, generator)
    generator = torch.Generator().manual_seed(0)
    epoch(generator)  # warm-up
    with common.timed() as plain:
        epoch(generator)
    with profile(activities=[ProfilerActivity.CPU]) as prof, common.timed() as profiled:
        epoch(generator)
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
                                           f"--steps {args.steps} --precision {args.precision}"
                                           + (" --autograd" if args.autograd else ""),
        "loop": "autograd" if args.autograd else "mnist-flow", "precision": args.precision,
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
