"""Intra-op threads: train_epoch at batch 64 with 1 and 2 threads, with OpenMP's default and passive wait policy.

Each configuration runs in its own child process (OMP_WAIT_POLICY is read when OpenMP starts) on 6,400
random samples (100 steps, 784-500-256-10, SGD momentum); rounds alternate the configurations and the
medians are reported. On a machine whose cores are shared with other work, threads that spin at
OpenMP barriers wait for a core the other thread does not have.

    python benchmarks/bench_threads.py --repeats 3 --out /tmp/threads.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

import common

CHILD = """
import json, time, torch
from mnist_flow.training.loop import build_model, make_step, train_epoch
from mnist_flow.params import TrainConfig
torch.set_num_threads({threads})
g = torch.Generator().manual_seed(0)
x, y = torch.randn(6400, 784, generator=g), torch.randint(0, 10, (6400,), generator=g)
config = TrainConfig(hidden=(500, 256), batch_size=64)
step = make_step(build_model(config), config, x.shape[0])
train_epoch(step, x[:640], y[:640], 64, g)
w, c = time.perf_counter(), time.process_time()
train_epoch(step, x, y, 64, g)
print(json.dumps({{"wall": time.perf_counter() - w, "cpu": time.process_time() - c}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    configs = {f"{t} thread{'s' if t > 1 else ''}, OMP_WAIT_POLICY={p or '(default)'}": (t, p)
               for t in (1, 2) for p in (None, "PASSIVE")}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in configs}
    for r in range(args.repeats):
        for name, (threads, policy) in configs.items():
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
            if policy:
                env["OMP_WAIT_POLICY"] = policy
            out = subprocess.run([common.PYTHON, "-c", CHILD.format(threads=threads)], env=env, cwd=common.ROOT,
                                 capture_output=True, text=True, check=True, timeout=600).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
            print(f"  round {r + 1} {name}: {runs[name][-1]} (load {common.load_average()})", flush=True)
    rows = [{"config": k, "ms_per_step": 1000 * common.median([e["wall"] for e in v]) / 100,
             "cpu_ms_per_step": 1000 * common.median([e["cpu"] for e in v]) / 100,
             "runs_wall": [round(e["wall"], 3) for e in v]} for k, v in runs.items()]
    common.write_result(args.out, {"benchmark": "threads", "command": f"python benchmarks/bench_threads.py "
                                   f"--repeats {args.repeats}", "rows": rows, "load_after": common.load_average()})


if __name__ == "__main__":
    main()
