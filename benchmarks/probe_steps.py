"""Step times of the seed configuration with one and two intra-op threads: median, mean, p95, max (a diagnostic).

Next to a CPU-bound process most two-thread steps stay fast and a few stall for a descheduled thread, so the
median hides what an epoch costs; the mean does not (docs/benchmarks.md, findings, "Contention, third pass").
Random Fashion-MNIST-sized data, batches of 64, precision=auto; 600 steps per thread count, twice.

    python benchmarks/probe_steps.py
    python -c "while True: pass" & python benchmarks/probe_steps.py; kill %1   # next to a neighbour
"""

from __future__ import annotations

import statistics
import time


def main() -> None:
    import torch

    from mnist_flow.params import TrainConfig, resolve_precision
    from mnist_flow.training import threads as th
    from mnist_flow.training.loop import build_model, make_step

    th.bound_native_caches(adaptive=True)
    n = 54_000
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)
    config = TrainConfig(precision=resolve_precision("auto"), batch_size=64)
    model = build_model(config)
    step = make_step(model, config, n)
    for threads in (1, 2, 1, 2):
        torch.set_num_threads(threads)
        times = []
        for _ in range(600):
            idx = torch.randint(0, n, (64,), generator=g)
            start = time.perf_counter()
            step(x[idx].to(step.dtype), y[idx])
            times.append(time.perf_counter() - start)
        ms = [1000 * t for t in times[1:]]  # without the warm-up step
        windows = [ms[i : i + 8] for i in range(0, len(ms) - 8, 8)]
        print(
            f"{threads} thread(s): median {statistics.median(ms):.2f} mean {statistics.fmean(ms):.2f} "
            f"p95 {statistics.quantiles(ms, n=20)[18]:.2f} max {max(ms):.1f} ms; of 8-step windows, the largest "
            f"median {max(map(statistics.median, windows)):.2f} and mean {max(map(statistics.fmean, windows)):.2f} ms"
        )


if __name__ == "__main__":
    main()
