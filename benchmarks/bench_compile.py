"""torch.compile: does compiling the MLP pay for its compile time in a training run?

Times, at batch 64 on 6,400 random samples (100 steps per round), mnist-flow's train_epoch with the eager
model and with ``torch.compile(model)`` (inductor, default mode), alternating after a first compiled call
whose time (the compilation) is reported separately. Break-even = compile seconds / seconds saved per step.

    python benchmarks/bench_compile.py --threads 1 --repeats 3 --out /tmp/compile.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import common
from mnist_flow.train import TrainConfig, build_model, make_optimizer, train_epoch

STEPS = 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    threads = common.set_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(STEPS * 64, 784, generator=g), torch.randint(0, 10, (STEPS * 64,), generator=g)
    config = TrainConfig(hidden=(500, 256), batch_size=64)
    eager = build_model(config)
    compiled_base = build_model(config)
    compiled = torch.compile(compiled_base)
    opt_e, opt_c = make_optimizer(eager, config), make_optimizer(compiled_base, config)
    train_epoch(eager, x[:640], y[:640], opt_e, 64, g)
    with common.timed() as first:
        train_epoch(compiled, x[:640], y[:640], opt_c, 64, g)  # compiles forward and backward
    variants = {"eager": lambda: _epoch(eager, x, y, opt_e, g), "compiled": lambda: _epoch(compiled, x, y, opt_c, g)}
    timings = common.alternate(variants, args.repeats)
    med = {k: common.median([t.wall for t in v]) / STEPS for k, v in timings.items()}
    cpu = {k: common.median([t.cpu for t in v]) / STEPS for k, v in timings.items()}
    saved = med["eager"] - med["compiled"]
    common.write_result(args.out, {
        "benchmark": "compile", "command": f"python benchmarks/bench_compile.py --threads {args.threads} "
                                           f"--repeats {args.repeats}",
        "threads": threads, "compile_s": first.wall, "ms_per_step": {k: 1000 * v for k, v in med.items()},
        "cpu_ms_per_step": {k: 1000 * v for k, v in cpu.items()},
        "break_even_steps": first.wall / saved if saved > 0 else None, "load_after": common.load_average()})


def _epoch(model, x, y, optimizer, g) -> common.Timing:
    with common.timed() as t:
        train_epoch(model, x, y, optimizer, 64, g)
    return t


if __name__ == "__main__":
    main()
