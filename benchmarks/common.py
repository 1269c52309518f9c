"""Shared pieces of the benchmarks: the data, the seed tutorial's code, timers, the machine description.

Every benchmark runs its compared variants in one process, alternating, and reports the median of
the repetitions: the machine may be shared, so only ratios measured side by side mean much. Times are
given as wall-clock seconds and as the process's CPU seconds (``time.process_time``); with one
intra-op thread the CPU seconds are the work done, untouched by time spent waiting for a core.
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
FASHION_DIR = Path(os.environ.get("BENCH_FASHION_DIR", "/usr/share/datasets/fashion-mnist"))
PYTHON = sys.executable
BIN = Path(PYTHON).parent  # the venv's scripts: mnist-flow, prefect


# --- timing ----------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    wall: float
    cpu: float


@contextmanager
def timed() -> Iterator[Timing]:
    """Measure the wall-clock and CPU seconds of the block."""
    t = Timing(0.0, 0.0)
    w0, c0 = time.perf_counter(), time.process_time()
    yield t
    t.wall, t.cpu = time.perf_counter() - w0, time.process_time() - c0


def fresh_home_env(home: str, threads: int = 1) -> dict[str, str]:
    """The environment of a measured child process: its own MNIST_FLOW_HOME and PREFECT_HOME (created),
    no analytics, no server from the caller's shell, ``threads`` intra-op threads (one by default: see the
    threads section; OpenMP's own variable is pinned only then)."""
    env = {**os.environ, "MNIST_FLOW_HOME": home, "PREFECT_HOME": f"{home}/prefect",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MNIST_FLOW_THREADS": str(threads),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}  # a busy machine starts it slowly
    env.pop("PREFECT_API_URL", None)
    env.pop("OMP_NUM_THREADS", None)
    if threads == 1:
        env["OMP_NUM_THREADS"] = "1"
    os.makedirs(env["PREFECT_HOME"], exist_ok=True)
    return env


def median(values: list[float]) -> float:
    return statistics.median(values)


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def set_threads(threads: int | None) -> int:
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# --- the data ---------------------------------------------------------------------------------------------------


def fashion_prepared(cache_dir: Path, val_fraction: float = 0.1, seed: int = 0):
    """Fashion-MNIST as the pipeline prepares it (stratified 10% validation split, normalised, CPU)."""
    from mnist_flow import pipeline
    from mnist_flow.data.datasets import load_dataset

    bundle = load_dataset("fashion-mnist", "dir", data_dir=FASHION_DIR, cache_dir=cache_dir)
    return pipeline.prepare(bundle, val_fraction=val_fraction, seed=seed, device="cpu")


def train_indices(labels: torch.Tensor, val_fraction: float = 0.1, seed: int = 0) -> torch.Tensor:
    from mnist_flow.data.datasets import stratified_split

    return stratified_split(labels, val_fraction, seed)[0]


# --- the seed tutorial, verbatim in substance ------------------------------------------------------------------


class SeedNet(nn.Module):
    """The seed's network: 784-500-256-10 with ReLU and a log_softmax output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 500)
        self.fc2 = nn.Linear(500, 256)
        self.fc3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 28 * 28)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = self.fc3(x)
        return F.log_softmax(x, dim=1)


def seed_net_like(model: nn.Module) -> SeedNet:
    """A SeedNet holding the same weights as an mnist-flow MLP (500, 256)."""
    net = SeedNet()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for dst, src in zip((net.fc1, net.fc2, net.fc3), linears, strict=True):
        dst.weight.data.copy_(src.weight.data)
        dst.bias.data.copy_(src.bias.data)
    return net


def torchvision_root(workdir: Path) -> Path:
    """A torchvision dataset root holding the same Fashion-MNIST files, unpacked as torchvision expects."""
    raw = workdir / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for gz in FASHION_DIR.glob("*.gz"):
        target = raw / gz.name[:-3]
        if not target.exists():
            with gzip.open(gz, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return workdir


def seed_datasets(workdir: Path):
    """The seed's datasets: torchvision FashionMNIST with ToTensor + Normalize((0.5,), (0.5,))."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    root = torchvision_root(workdir)
    train = datasets.FashionMNIST(str(root), train=True, download=False, transform=transform)
    test = datasets.FashionMNIST(str(root), train=False, download=False, transform=transform)
    return train, test


def seed_train_epoch(model: nn.Module, loader, optimizer, criterion) -> float:
    """The seed's train() loop, without its progress prints."""
    model.train()
    total = 0.0
    for data, target in loader:
        optimizer.zero_grad()
        output = model(data)
        loss = criterion(output, target)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(data)
    return total / len(loader.dataset)


def seed_test(model: nn.Module, loader) -> tuple[float, float]:
    """The seed's test() loop: summed NLL and argmax accuracy under no_grad."""
    model.eval()
    test_loss = 0.0
    correct = 0
    with torch.no_grad():
        for data, target in loader:
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            pred = output.argmax(dim=1, keepdim=True)
            correct += pred.eq(target.view_as(pred)).sum().item()
    n = len(loader.dataset)
    return test_loss / n, correct / n


# --- the plain in-memory loop: autograd, autocast and torch.optim.SGD --------------------------------------------


def autograd_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
                   batch_size: int, generator: torch.Generator, precision: str = "fp32") -> float:
    """What mnist-flow's loop was before the hand-written step: the same in-memory index batching, with
    autograd, autocast for bf16 and a torch optimizer. The reference that shows what the step saves."""
    model.train()
    n = x.shape[0]
    order = torch.randperm(n, generator=generator)
    total = torch.zeros(())
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x.index_select(0, idx))
        loss = F.cross_entropy(logits.float(), y.index_select(0, idx))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total.add_(loss.detach(), alpha=idx.numel())
    return total.item() / n


# --- matmul rates ----------------------------------------------------------------------------------------------


def step_gemm_rate(hidden: tuple[int, ...], batch: int, repeats: int = 50) -> Timing:
    """FLOP/s of the GEMMs of one training step at ``batch`` (forward, input-grad and weight-grad of
    every layer), counted as 3 x 2 x multiply-adds; returned as rates against wall and CPU time."""
    from mnist_flow.training.model import multiply_adds_per_sample

    sizes = (784, *hidden, 10)
    acts = [torch.randn(batch, s) for s in sizes]
    weights = [torch.randn(o, i) for i, o in zip(sizes[:-1], sizes[1:])]
    outs = []
    for i, w in enumerate(weights):
        outs.append((torch.empty(batch, w.shape[0]), torch.empty(batch, w.shape[1]), torch.empty_like(w)))

    def step() -> None:
        for i, w in enumerate(weights):
            fwd, dx, dw = outs[i]
            torch.mm(acts[i], w.t(), out=fwd)
            torch.mm(acts[i + 1], w, out=dx)
            torch.mm(acts[i + 1].t(), acts[i], out=dw)

    for _ in range(5):
        step()
    flops = 6 * multiply_adds_per_sample(hidden) * batch * repeats
    with timed() as t:
        for _ in range(repeats):
            step()
    return Timing(flops / t.wall, flops / t.cpu)


def big_gemm_rate(n: int = 2048, repeats: int = 4) -> Timing:
    """FLOP/s of a large square GEMM: the machine's practical matmul peak."""
    a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=out)
    with timed() as t:
        for _ in range(repeats):
            torch.mm(a, b, out=out)
    flops = 2 * n**3 * repeats
    return Timing(flops / t.wall, flops / t.cpu)


# --- machine and results ---------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "threads_default": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                            "cuda_available": torch.cuda.is_available(),
                            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)")}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache",
                               "Hypervisor vendor"):
                info[key.strip()] = value.strip()
        info["avx512"] = "avx512f" in lscpu
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()
        info["memory_gib"] = round(int(mem[1]) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    return info


def write_result(path: Path | None, result: dict[str, Any]) -> None:
    """Print the result and, when asked, save it as JSON for run_all.py."""
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def alternate(variants: dict[str, Callable[[], Timing]], repeats: int,
              log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict[str, list[Timing]]:
    """Run each variant once per round, rounds in a row, and collect the timings."""
    out: dict[str, list[Timing]] = {k: [] for k in variants}
    for r in range(repeats):
        for name, fn in variants.items():
            t = fn()
            out[name].append(t)
            log(f"  round {r + 1}/{repeats} {name}: wall {t.wall:.3f}s cpu {t.cpu:.3f}s (load {load_average()})")
    return out
