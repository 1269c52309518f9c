"""The one training loop: used by the Optuna objective, the final fit and the benchmarks.

Data lives in memory as tensors (features already normalised); batches are drawn by index
from a seeded permutation, so there are no per-sample transforms and no DataLoader.

    from mnist_flow.train import TrainConfig, train_model
    model, history = train_model(TrainConfig(epochs=2), train_x, train_y, val_x, val_y)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mnist_flow.errors import ConfigError
from mnist_flow.model import MLP
from mnist_flow.step import MLPStep, constant, one_cycle

Schedule = Literal["constant", "onecycle"]
SCHEDULES: tuple[str, ...] = ("constant", "onecycle")
Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


def default_precision() -> Precision:
    """bf16 where the hardware does bfloat16 matmuls natively (CUDA with bf16, AVX512-BF16/AMX CPUs), else fp32."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:
        return "fp32"
    return "bf16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "fp32"


def resolve_precision(precision: str) -> str:
    """``"auto"`` becomes :func:`default_precision`; an explicit precision is kept as it is."""
    return default_precision() if precision == "auto" else precision


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The autocast context of evaluation for ``precision`` (disabled for fp32); training does its
    own casting (mnist_flow.step)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; saved with every model as its hyperparameters."""

    hidden: tuple[int, ...] = (500, 256)
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 64
    epochs: int = 10
    weight_decay: float = 0.0
    schedule: Schedule = "constant"
    seed: int = 0
    #: Arithmetic of the forward and backward passes. Weights, optimizer state and loss stay float32;
    #: "bf16" runs the matmuls in bfloat16, about 1.5x faster on CPUs with AVX512-BF16 (docs/benchmarks.md).
    precision: Precision = "fp32"

    def validate(self) -> "TrainConfig":
        """Raise ConfigError naming the first bad value; return self so calls chain."""
        problems = []
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"learning rate must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            problems.append(f"momentum must be in [0, 1), got {self.momentum}")
        if not self.hidden or any(int(h) < 1 for h in self.hidden):
            problems.append(f"hidden sizes must be integers >= 1, got {list(self.hidden)}")
        if self.batch_size < 1:
            problems.append(f"batch size must be >= 1, got {self.batch_size}")
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if self.weight_decay < 0:
            problems.append(f"weight decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if problems:
            raise ConfigError("Invalid training parameters: " + "; ".join(problems) + ".",
                              fix="Correct the parameter and run again.")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    def with_(self, **changes: Any) -> "TrainConfig":
        return replace(self, **changes)


@dataclass(frozen=True)
class EpochStats:
    """One epoch's training loss, validation loss and accuracy, and the seconds its training pass took."""

    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    seconds: float


@dataclass
class History:
    """The epochs of a fit, in order."""

    epochs: list[EpochStats] = field(default_factory=list)

    @property
    def last(self) -> EpochStats:
        return self.epochs[-1]

    def column(self, name: str) -> list[float]:
        return [getattr(e, name) for e in self.epochs]


@dataclass(frozen=True)
class EvalResult:
    """Mean cross-entropy, accuracy and the predicted class of every sample."""

    loss: float
    accuracy: float
    predictions: torch.Tensor  # int64 [N] on the CPU


def select_device(name: str = "auto") -> torch.device:
    """auto: CUDA, then MPS, then CPU. An explicit device that is absent is a ConfigError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(name, False):
        raise ConfigError(f"Device {name!r} is not available on this machine.",
                          fix="Use --device auto or cpu (MNIST_FLOW_DEVICE).")
    return torch.device(name)


def build_model(config: TrainConfig, device: torch.device | str = "cpu") -> MLP:
    """A freshly initialised MLP; the initial weights depend only on ``config.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = MLP(config.hidden)
    return model.to(device)


def make_step(model: nn.Module, config: TrainConfig, train_samples: int) -> MLPStep:
    """The hand-written SGD step (mnist_flow.step) with the config's learning-rate schedule over
    ``config.epochs`` passes of ``train_samples`` samples in batches of ``config.batch_size``."""
    if config.schedule == "onecycle":
        steps_per_epoch = math.ceil(train_samples / config.batch_size)
        schedule = one_cycle(config.lr, total_steps=config.epochs * steps_per_epoch)
    else:
        schedule = constant(config.lr)
    return MLPStep(model, lr=schedule, momentum=config.momentum, weight_decay=config.weight_decay,
                   precision=config.precision)


def train_epoch(step: MLPStep, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                generator: torch.Generator) -> float:
    """One pass over (x, y) in a seeded random order; returns the mean training loss.

    The order comes from ``generator`` (a CPU generator, so the batches are the same on every
    device). Full batches are gathered into two buffers allocated once per epoch and cast to the
    step's precision batch by batch (a bfloat16 copy of the whole set would cost memory, not time);
    the loss is summed on the device and read back once, so the loop never waits for the device
    mid-epoch.
    """
    n = x.shape[0]
    order = torch.randperm(n, generator=generator).to(x.device, non_blocking=True)
    xb = x.new_empty((min(batch_size, n), *x.shape[1:]))
    yb = y.new_empty((min(batch_size, n),))
    total = torch.zeros((), device=x.device)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if idx.numel() == xb.shape[0]:
            inputs, targets = torch.index_select(x, 0, idx, out=xb), torch.index_select(y, 0, idx, out=yb)
        else:  # the last, shorter batch
            inputs, targets = x.index_select(0, idx), y.index_select(0, idx)
        total.add_(step(inputs.reshape(inputs.shape[0], -1).to(step.dtype), targets))
    return total.item() / n


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 8192,
             precision: str = "fp32") -> EvalResult:
    """Loss, accuracy and predictions in large batches, with autograd off (fp32 unless told otherwise)."""
    model.eval()
    if x.shape[0] == 0:
        return EvalResult(float("nan"), float("nan"), torch.empty(0, dtype=torch.long))
    loss = torch.zeros((), device=x.device)
    preds = []
    for start in range(0, x.shape[0], batch_size):
        with autocast(x.device, precision):
            logits = model(x[start:start + batch_size]).float()
        yb = y[start:start + batch_size]
        loss += F.cross_entropy(logits, yb, reduction="sum")
        preds.append(logits.argmax(dim=1))
    predictions = torch.cat(preds)
    accuracy = (predictions == y).float().mean().item()
    return EvalResult(loss.item() / x.shape[0], accuracy, predictions.cpu())


EpochCallback = Callable[[EpochStats], None]


def fit(model: nn.Module, config: TrainConfig, train_x: torch.Tensor, train_y: torch.Tensor,
        val_x: torch.Tensor, val_y: torch.Tensor, *, on_epoch: EpochCallback | None = None,
        threads: Any = None) -> History:
    """Train ``model`` in place for ``config.epochs``; ``on_epoch`` sees each epoch and may raise to stop.

    ``threads``: a :mod:`mnist_flow.threads` policy choosing the intra-op threads (None: torch's current).
    """
    config.validate()
    generator = torch.Generator().manual_seed(config.seed)
    step = make_step(model, config, train_samples=train_x.shape[0])
    if threads is not None:  # the thread policy times the steps and sets the thread count
        step = threads.wrap(step, steps_per_epoch=math.ceil(train_x.shape[0] / config.batch_size))
    history = History()
    for epoch in range(1, config.epochs + 1):
        start = time.perf_counter()
        train_loss = train_epoch(step, train_x, train_y, config.batch_size, generator)
        seconds = time.perf_counter() - start
        val = evaluate(model, val_x, val_y, precision=config.precision)
        stats = EpochStats(epoch, train_loss, val.loss, val.accuracy, seconds)
        history.epochs.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
    return history


def train_model(config: TrainConfig, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
                val_y: torch.Tensor, *, device: torch.device | str = "cpu",
                on_epoch: EpochCallback | None = None, threads: Any = None) -> tuple[MLP, History]:
    """Build a seeded model on ``device`` and fit it; the tensors must already be on ``device``."""
    config.validate()
    model = build_model(config, device)
    history = fit(model, config, train_x, train_y, val_x, val_y, on_epoch=on_epoch, threads=threads)
    return model, history
