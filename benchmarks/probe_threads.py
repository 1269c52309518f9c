"""What the adaptive thread policy measures and chooses, epoch by epoch, on the seed configuration.

Trains 784-500-256-10 (batch 64, precision=auto) for a few epochs of random Fashion-MNIST-sized data
(54,000 samples, an evaluation of 6,000 after each epoch, as a fit does) with
``AdaptiveThreads.for_cpus()``, and prints each epoch's time, the first probe steps with each thread
count (ms) and the policy's decisions. ``--cache-entries`` sets oneDNN's two kernel caches (default:
what mnist-flow sets for an adaptive process). A diagnostic, not a benchmark: it prints, it does not
write the page.

    python benchmarks/probe_threads.py                     # mnist-flow's caches
    python benchmarks/probe_threads.py --cache-entries 16  # the trial processes' size
"""

from __future__ import annotations

import argparse
import math
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-entries", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    if args.cache_entries is not None:
        os.environ["LRU_CACHE_CAPACITY"] = os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(args.cache_entries)

    import torch

    from mnist_flow.params import TrainConfig, resolve_precision
    from mnist_flow.training import threads as th
    from mnist_flow.training.loop import build_model, evaluate, make_step, train_epoch

    th.bound_native_caches(adaptive=True)
    print("kernel cache entries:", os.environ["LRU_CACHE_CAPACITY"], os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"])
    probed: list[tuple[int, int, float]] = []  # (epoch, threads, ms) of each probe step
    observe = th.AdaptiveStep._observe

    def recording(self: th.AdaptiveStep, threads: int, seconds: float) -> None:
        if self._probe:
            probed.append((self._calls // self._per_epoch, threads, round(seconds * 1000, 2)))
        observe(self, threads, seconds)

    th.AdaptiveStep._observe = recording  # type: ignore[method-assign]
    n = 54_000
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)
    vx, vy = torch.randn(6_000, 784, generator=g), torch.randint(0, 10, (6_000,), generator=g)
    config = TrainConfig(precision=resolve_precision("auto"), batch_size=64)
    policy = th.AdaptiveThreads.for_cpus()
    model = build_model(config)
    step = policy.wrap(make_step(model, config, n), math.ceil(n / config.batch_size))
    for epoch in range(args.epochs):
        start = time.perf_counter()
        train_epoch(step, x, y, config.batch_size, g)
        evaluate(model, vx, vy, precision=config.precision)
        firsts = {t: [ms for e, c, ms in probed if e == epoch and c == t][:2] for t in policy.candidates}
        print(f"epoch {epoch + 1}: {time.perf_counter() - start:.2f} s; first probe steps (ms): {firsts}")
    print(th.describe(policy))


if __name__ == "__main__":
    main()
