"""torch.compile: does compiling the training step pay for its compile time?

Times, at batch 64 on 6,400 random samples (100 steps per round), mnist-flow's train_epoch with the eager
hand-written step (mnist_flow.training.step) and with ``torch.compile`` of that step (inductor, default mode),
alternating after a first compiled epoch whose time (the compilation, with inductor's caches empty) is
reported separately, for each precision. Break-even = compile seconds / seconds saved per step. The shapes are fixed here; in a study
the hidden sizes are searched, so every trial with new sizes compiles again.

    python benchmarks/bench_compile.py --threads 0 --repeats 3 --out /tmp/compile.json
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tempfile
from pathlib import Path

# A cold compile, as a trial with new hidden sizes meets it: inductor's on-disk caches start empty.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-compile-inductor-")
atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import common
import torch

from mnist_flow.params import TrainConfig
from mnist_flow.training.loop import build_model, make_step, train_epoch

STEPS = 100


class Compiled:
    """A step whose call runs through torch.compile (train_epoch only needs ``dtype`` and the call)."""

    def __init__(self, step) -> None:
        self.dtype = step.dtype
        self._call = torch.compile(step.__call__)

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._call(inputs, targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    threads = common.set_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(STEPS * 64, 784, generator=g), torch.randint(0, 10, (STEPS * 64,), generator=g)
    rows = []
    for precision in ("fp32", "bf16"):
        config = TrainConfig(hidden=(500, 256), batch_size=64, precision=precision)
        eager = make_step(build_model(config), config, x.shape[0])
        compiled = Compiled(make_step(build_model(config), config, x.shape[0]))
        train_epoch(eager, x[:640], y[:640], 64, g)
        with common.timed() as first:
            train_epoch(compiled, x[:640], y[:640], 64, g)  # compiles the step

        def run(step) -> common.Timing:
            with common.timed() as t:
                train_epoch(step, x, y, 64, g)
            return t

        timings = common.alternate({"eager": lambda: run(eager), "compiled": lambda: run(compiled)}, args.repeats)
        med = {k: common.median([t.wall for t in v]) / STEPS for k, v in timings.items()}
        cpu = {k: common.median([t.cpu for t in v]) / STEPS for k, v in timings.items()}
        saved = med["eager"] - med["compiled"]
        rows.append({"precision": precision, "compile_s": first.wall,
                     "ms_per_step": {k: 1000 * v for k, v in med.items()},
                     "cpu_ms_per_step": {k: 1000 * v for k, v in cpu.items()},
                     "break_even_steps": first.wall / saved if saved > 0 else None})
    common.write_result(args.out, {
        "benchmark": "compile", "command": f"python benchmarks/bench_compile.py --threads {args.threads} "
                                           f"--repeats {args.repeats}",
        "threads": threads, "rows": rows, "load_after": common.load_average()})


if __name__ == "__main__":
    main()
