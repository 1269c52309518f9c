"""Memory: peak RSS of the trainer (`mnist-flow train`) and of a whole flow run, against `import torch` alone.

Each command runs as a child with a fresh MNIST_FLOW_HOME on Fashion-MNIST (60,000 + 10,000 images in
memory). Reported per command: the largest single process's peak (from wait4) and the peak of the RSS
summed over the process tree (sampled every 50 ms), median of the repetitions.

    python benchmarks/bench_memory.py --repeats 3 --out /tmp/memory.json
"""

from __future__ import annotations

import argparse
import shlex
import tempfile
from pathlib import Path

import common
from proc import run_measured

BIN = common.BIN


def commands(data_dir: Path) -> dict[str, list[str]]:
    fashion = ["--dataset", "fashion-mnist", "--source", "dir", "--data-dir", str(data_dir)]
    return {
        "python -c 'import torch'": [common.PYTHON, "-c", "import torch"],
        "mnist-flow train (1 epoch)": [str(BIN / "mnist-flow"), "train", *fashion, "--epochs", "1", "--json"],
        "flows/mnist.py (2 trials x 1 epoch, final 1 epoch)": [
            common.PYTHON, str(common.ROOT / "flows" / "mnist.py"), *fashion, "--n-trials", "2", "--max-epochs", "1",
            "--final-epochs", "1", "--json"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cmds = commands(common.FASHION_DIR)
    runs: dict[str, list] = {k: [] for k in cmds}
    for r in range(args.repeats):
        for name, cmd in cmds.items():
            with tempfile.TemporaryDirectory(prefix="bench-mem-") as home:
                env = common.fresh_home_env(home)
                res = run_measured(cmd, env=env, cwd=common.ROOT)
            if res.returncode != 0:
                raise SystemExit(f"{name} failed ({res.returncode}):\n{res.stderr[-3000:]}")
            runs[name].append(res)
            print(f"  round {r + 1} {name}: {res.wall:.1f}s, process peak {res.maxrss_mb:.0f} MB, "
                  f"tree peak {res.tree_peak_mb:.0f} MB (load {common.load_average()})", flush=True)
    rows = [{"command": name, "shell": shlex.join(cmds[name]).replace(str(common.ROOT) + "/", ""),
             "process_peak_mb": common.median([r.maxrss_mb for r in v]),
             "tree_peak_mb": common.median([r.tree_peak_mb for r in v]),
             "wall_s": common.median([r.wall for r in v]),
             "runs_process_peak_mb": [round(r.maxrss_mb) for r in v]} for name, v in runs.items()]
    common.write_result(args.out, {"benchmark": "memory", "command": f"python benchmarks/bench_memory.py "
                                   f"--repeats {args.repeats}", "repeats": args.repeats, "rows": rows,
                                   "env": "MNIST_FLOW_THREADS=1 OMP_NUM_THREADS=1, fresh MNIST_FLOW_HOME per run",
                                   "load_after": common.load_average()})


if __name__ == "__main__":
    main()
