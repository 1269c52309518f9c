"""Orchestration overhead: the same Optuna study through `mnist-flow tune` (bare) and through the Prefect flow.

Same seed, same trials (the bundled MNIST sample, 6 trials x 3 epochs by default), a fresh MNIST_FLOW_HOME for
every run, rounds alternating. Compared: the tune stage's seconds (``seconds.tune`` of `mnist-flow tune --json`
against ``seconds.tune`` of the flow's JSON summary). The temporary Prefect server's start-up is timed
separately (prefect's SubprocessASGIServer, as the flow starts it when PREFECT_API_URL is unset), and so is
each command's whole wall time.

    python benchmarks/bench_orchestration.py --repeats 3 --out /tmp/orchestration.json
    python benchmarks/bench_orchestration.py --data fashion-mnist --n-trials 6 --max-epochs 4   # full-size trials

``--data fashion-mnist`` runs the study on the full Fashion-MNIST (``BENCH_FASHION_DIR``), where a trial lasts
seconds rather than a fraction of one: Prefect's cost is per run and per trial, so its share depends on
the trials' length.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import common
from proc import run_measured

BIN = common.BIN
SERVER_START = """
import time
t = time.perf_counter()
from prefect.server.api.server import SubprocessASGIServer
server = SubprocessASGIServer()
server.start()
print(time.perf_counter() - t)
server.stop()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-trials", type=int, default=6)
    parser.add_argument("--max-epochs", type=int, default=3)
    parser.add_argument("--data", choices=("sample", "fashion-mnist"), default="sample",
                        help="the bundled MNIST sample, or the full Fashion-MNIST")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    data = (["--source", "sample"] if args.data == "sample" else
            ["--dataset", "fashion-mnist", "--source", "dir", "--data-dir", str(common.FASHION_DIR)])
    study = [*data, "--n-trials", str(args.n_trials), "--max-epochs", str(args.max_epochs),
             "--seed", "0"]
    cmds = {"mnist-flow tune": [str(BIN / "mnist-flow"), "tune", *study, "--json"],
            "flows/mnist.py": [common.PYTHON, str(common.ROOT / "flows" / "mnist.py"), *study, "--final-epochs", "1",
                               "--json"],
            "server start": [common.PYTHON, "-c", SERVER_START]}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in cmds}
    for r in range(args.repeats):
        for name, cmd in cmds.items():
            with tempfile.TemporaryDirectory(prefix="bench-orch-") as home:
                env = common.fresh_home_env(home)
                res = run_measured(cmd, env=env, cwd=common.ROOT)
            if res.returncode != 0:
                raise SystemExit(f"{name} failed ({res.returncode}):\n{res.stderr[-3000:]}")
            if name == "server start":
                entry = {"wall": res.wall, "stage": float(res.stdout.strip().splitlines()[-1])}
            else:
                text = res.stdout
                summary = json.loads(text[text.index("{"):])
                entry = {"wall": res.wall, "stage": float(summary["seconds"]["tune"]),
                         "stages_total": float(sum(summary["seconds"].values()))}
            runs[name].append(entry)
            print(f"  round {r + 1} {name}: {entry} (load {common.load_average()})", flush=True)
    med = {k: {f: common.median([e[f] for e in v]) for f in v[0]} for k, v in runs.items()}
    bare, flow = med["mnist-flow tune"]["stage"], med["flows/mnist.py"]["stage"]
    common.write_result(args.out, {
        "benchmark": "orchestration", "command": f"python benchmarks/bench_orchestration.py --repeats {args.repeats} "
                                                 f"--n-trials {args.n_trials} --max-epochs {args.max_epochs} --data {args.data}",
        "commands": {k: " ".join(v).replace(str(common.ROOT) + "/", "") for k, v in cmds.items()},
        "median": med, "runs": runs, "tune_overhead_percent": 100 * (flow - bare) / bare,
        "env": "MNIST_FLOW_THREADS=1 OMP_NUM_THREADS=1, fresh MNIST_FLOW_HOME per run",
        "load_after": common.load_average()})


if __name__ == "__main__":
    main()
