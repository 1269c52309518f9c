"""Memory per trial: the RSS of the flow process after each of 50 trials run in it (workers=1).

`python flows/mnist.py --source sample --n-trials 50 --max-epochs 1 --final-epochs 1 --workers 1` runs as a
child; each time it logs a finished trial, this script reads the child's VmRSS and RssAnon from /proc.
Two variants, alternating: the default (oneDNN's two per-shape kernel caches bounded by
``mnist_flow.training.threads.bound_native_caches``) and the caches at PyTorch's own size (1,024 entries each,
what every run did before), which grew the process by 6-10 MB per trial.

    python benchmarks/bench_memory_trials.py --trials 50 --repeats 1 --out /tmp/memory_trials.json
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
import time
from pathlib import Path

import common

TRIAL_LINE = re.compile(r"trial (\d+)/(\d+) ")
UNBOUNDED = {"LRU_CACHE_CAPACITY": "1024", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}


def _status(pid: int) -> dict[str, float]:
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                values[key] = int(rest.split()[0]) / 1024
    except OSError:
        pass
    return values


def run_flow(trials: int, extra_env: dict[str, str]) -> dict:
    cmd = [common.PYTHON, str(common.ROOT / "flows" / "mnist.py"), "--source", "sample", "--n-trials", str(trials),
           "--max-epochs", "1", "--final-epochs", "1", "--workers", "1"]
    with tempfile.TemporaryDirectory(prefix="bench-memtrials-") as home:
        env = {**common.fresh_home_env(home), **extra_env, "PREFECT_LOGGING_COLORS": "false"}
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=common.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        rows = []
        assert proc.stdout is not None
        for line in proc.stdout:
            match = TRIAL_LINE.search(line)
            if match and "trial-process" not in line:
                rows.append({"trial": int(match.group(1)), **_status(proc.pid)})
        proc.wait(timeout=1800)
        wall = time.perf_counter() - start
    if proc.returncode != 0 or len(rows) != trials:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode} after {len(rows)} trial lines")
    return {"rows": rows, "wall_s": wall}


def slope(rows: list[dict], key: str, first: int) -> float:
    """MB per trial from trial ``first`` to the last (least squares)."""
    points = [(r["trial"], r[key]) for r in rows if r["trial"] >= first]
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    variants = {"bounded kernel caches (default)": {}, "PyTorch's caches (1,024 entries each)": UNBOUNDED}
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for r in range(args.repeats):
        for name, env in variants.items():
            runs[name].append(run_flow(args.trials, env))
            rows = runs[name][-1]["rows"]
            print(f"  round {r + 1} {name}: RSS {rows[0]['VmRSS']:.0f} -> {rows[-1]['VmRSS']:.0f} MB over "
                  f"{args.trials} trials (load {common.load_average()})", flush=True)
    first = min(10, args.trials // 2)
    out_rows = []
    for name, results in runs.items():
        last = results[-1]["rows"]
        out_rows.append({
            "variant": name, "env": variants[name],
            "rss_mb_by_trial": {r["trial"]: round(r["VmRSS"], 1) for r in last},
            "anon_mb_by_trial": {r["trial"]: round(r["RssAnon"], 1) for r in last},
            "slope_rss_mb_per_trial": [round(slope(x["rows"], "VmRSS", first), 2) for x in results],
            "slope_anon_mb_per_trial": [round(slope(x["rows"], "RssAnon", first), 2) for x in results],
            "wall_s": [round(x["wall_s"], 1) for x in results]})
    common.write_result(args.out, {
        "benchmark": "memory_trials", "command": f"python benchmarks/bench_memory_trials.py --trials {args.trials} "
        f"--repeats {args.repeats}", "trials": args.trials, "slope_from_trial": first, "rows": out_rows,
        "env": "MNIST_FLOW_THREADS=1 OMP_NUM_THREADS=1, fresh MNIST_FLOW_HOME per run, bundled sample, bf16 where "
               "the CPU has it (precision=auto)", "load_after": common.load_average()})


if __name__ == "__main__":
    main()
