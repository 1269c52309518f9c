"""The one training loop: used by the Optuna objective, the final fit and the benchmarks.

Data lives in memory as tensors (features already normalised); batches are drawn by index
from a seeded permutation, so there are no per-sample transforms and no DataLoader.

    from mnist_flow.training.loop import train_model
    from mnist_flow.params import TrainConfig
    model, history = train_model(TrainConfig(epochs=2), train_x, train_y, val_x, val_y)
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mnist_flow.errors import ConfigError, TrainingDiverged
from mnist_flow.params import TrainConfig
from mnist_flow.training.model import MLP
from mnist_flow.training.step import MLPStep, constant, one_cycle


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The autocast context of evaluation for ``precision`` (disabled for fp32); training does its
    own casting (mnist_flow.training.step)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


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
    """The epochs of a fit, in order; with ``keep_best``, which epoch's weights the model holds; and what the
    divergence guard did (``events``, one sentence each)."""

    epochs: list[EpochStats] = field(default_factory=list)
    best_epoch: int | None = None
    events: list[str] = field(default_factory=list)

    @property
    def last(self) -> EpochStats:
        return self.epochs[-1]

    @property
    def best(self) -> EpochStats:
        """The epoch whose weights the model ended with: ``best_epoch`` if the fit kept its best, else the last."""
        return next((e for e in self.epochs if e.epoch == self.best_epoch), self.last)

    @property
    def recoveries(self) -> int:
        return len(self.events)

    def column(self, name: str) -> list[float]:
        return [getattr(e, name) for e in self.epochs]


@dataclass(frozen=True)
class EvalResult:
    """Mean cross-entropy, accuracy and the predicted class of every sample; ``constant``: the logits were the
    same for every sample (a dead network: every ReLU of a layer off)."""

    loss: float
    accuracy: float
    predictions: torch.Tensor  # int64 [N] on the CPU
    constant: bool = False


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
        raise ConfigError(
            f"Device {name!r} is not available on this machine.", fix="Use --device auto or cpu (MNIST_FLOW_DEVICE)."
        )
    return torch.device(name)


#: The initial weights come from torch's global generator (seeded, then restored): fits that run at once in
#: threads (the final fits of several seeds) take turns, or one's seed would draw another's weights.
_INIT_LOCK = threading.Lock()


def build_model(config: TrainConfig, device: torch.device | str = "cpu") -> MLP:
    """A freshly initialised MLP; the initial weights depend only on ``config.seed`` (also when fits run in threads)."""
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = MLP(config.hidden)
    return model.to(device)


def make_step(model: nn.Module, config: TrainConfig, train_samples: int) -> MLPStep:
    """The hand-written SGD step (mnist_flow.training.step) with the config's learning-rate schedule over
    ``config.epochs`` passes of ``train_samples`` samples in batches of ``config.batch_size``."""
    if config.schedule == "onecycle":
        steps_per_epoch = math.ceil(train_samples / config.batch_size)
        schedule = one_cycle(config.lr, total_steps=config.epochs * steps_per_epoch)
    else:
        schedule = constant(config.lr)
    return MLPStep(
        model, lr=schedule, momentum=config.momentum, weight_decay=config.weight_decay, precision=config.precision
    )


#: train_epoch reads its running loss back every this many steps (at least four times an epoch; one wait
#: for the device each time) to stop a diverging epoch within that many steps; 0 checks only at the end of
#: the epoch. The overhead is measured in docs/benchmarks.md ("Divergence guard").
CHECK_EVERY = 32
#: A window of steps whose mean loss is above this many times the loss of a uniform guess (ln of the
#: number of classes: 2.30 for 10) is exploding.
EXPLODE_FACTOR = 4.0
#: A loss that went back above a uniform guess's after a window below this fraction of it has relapsed:
#: too high a rate killed the ReLUs and the net predicts one class (finite loss, chance accuracy).
RELAPSE_FRACTION = 2 / 3


class Divergence(ArithmeticError):
    """Raised by :func:`train_epoch` (and :func:`fit` for the validation loss) when the loss is non-finite,
    exploding or relapsed; :func:`fit` turns it into a recovery or a :class:`~mnist_flow.errors.TrainingDiverged`."""

    def __init__(self, loss: float, samples: int, where: str = "training", how: str = "non-finite") -> None:
        super().__init__(f"{how} {where} loss {loss:.4g} after {samples} samples of the epoch")
        self.loss, self.samples, self.where, self.how = loss, samples, where, how


class LossWatch:
    """The divergence criteria of a fit, applied to the mean loss of each window of steps.

    Keeps the lowest window seen across the epochs of one fit (pass the same watch to every epoch).
    """

    def __init__(self, classes: int) -> None:
        self.chance = math.log(max(classes, 2))
        self.lowest = math.inf

    def check(self, window: float, samples: int) -> None:
        if not math.isfinite(window):
            raise Divergence(window, samples)
        if window > EXPLODE_FACTOR * self.chance:
            raise Divergence(window, samples, how="exploding")
        if window > self.chance and self.lowest < RELAPSE_FRACTION * self.chance:
            raise Divergence(window, samples, how=f"relapsed (lowest {self.lowest:.3g})")
        self.lowest = min(self.lowest, window)


def train_epoch(
    step: MLPStep,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    *,
    check_every: int = CHECK_EVERY,
    watch: LossWatch | None = None,
) -> float:
    """One pass over (x, y) in a seeded random order; returns the mean training loss.

    The order comes from ``generator`` (a CPU generator, so the batches are the same on every
    device). Full batches are gathered into two buffers allocated once per epoch and cast to the
    step's precision batch by batch (a bfloat16 copy of the whole set would cost memory, not time);
    the loss is summed on the device and read back every ``check_every`` steps (at least four times
    an epoch) and at the end, so the loop waits for the device only that often. A non-finite,
    exploding or relapsed mean loss (:class:`LossWatch`) in any such window raises :class:`Divergence`
    at once: the rest of the epoch is not trained.
    """
    n = x.shape[0]
    watch = watch or LossWatch(step.weights[-1].shape[0])
    order = torch.randperm(n, generator=generator).to(x.device, non_blocking=True)
    xb = x.new_empty((min(batch_size, n), *x.shape[1:]))
    yb = y.new_empty((min(batch_size, n),))
    total = torch.zeros((), device=x.device)
    every = min(check_every, max(1, math.ceil(n / batch_size) // 4)) if check_every else 0
    seen, counted = 0.0, 0

    def check(done: int) -> None:
        nonlocal seen, counted
        now = total.item()  # the one wait for the device
        if done > counted:
            watch.check((now - seen) / (done - counted) if math.isfinite(now) else now, done)
        seen, counted = now, done

    for k, start in enumerate(range(0, n, batch_size), 1):
        idx = order[start : start + batch_size]
        if idx.numel() == xb.shape[0]:
            inputs, targets = torch.index_select(x, 0, idx, out=xb), torch.index_select(y, 0, idx, out=yb)
        else:  # the last, shorter batch
            inputs, targets = x.index_select(0, idx), y.index_select(0, idx)
        total.add_(step(inputs.reshape(inputs.shape[0], -1).to(step.dtype), targets))
        if every and k % every == 0:
            check(min(start + batch_size, n))
    check(n)
    return seen / n


@torch.inference_mode()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 8192, precision: str = "fp32"
) -> EvalResult:
    """Loss, accuracy and predictions in large batches, with autograd off (fp32 unless told otherwise)."""
    model.eval()
    if x.shape[0] == 0:
        return EvalResult(float("nan"), float("nan"), torch.empty(0, dtype=torch.long))
    loss = torch.zeros((), device=x.device)
    preds, highs, lows = [], [], []
    for start in range(0, x.shape[0], batch_size):
        with autocast(x.device, precision):
            logits = model(x[start : start + batch_size]).float()
        yb = y[start : start + batch_size]
        loss += F.cross_entropy(logits, yb, reduction="sum")
        preds.append(logits.argmax(dim=1))
        highs.append(logits.amax(dim=0))
        lows.append(logits.amin(dim=0))
    predictions = torch.cat(preds)
    accuracy = (predictions == y).float().mean().item()
    spread = torch.stack(highs).amax(dim=0) - torch.stack(lows).amin(dim=0)
    constant = x.shape[0] > 1 and bool(spread.max() == 0)
    return EvalResult(loss.item() / x.shape[0], accuracy, predictions.cpu(), constant)


EpochCallback = Callable[[EpochStats], None]

#: A guarded fit's validation accuracy collapsed when it loses half its gain over chance, once that gain
#: was at least this (below it, an epoch-to-epoch swing of a weak model on a small split is noise).
COLLAPSE_MIN_GAIN = 0.2
#: A recovery multiplies the learning rate of the rest of the fit by this.
RECOVERY_FACTOR = 0.5


def all_finite(model: nn.Module) -> bool:
    """Whether every parameter of ``model`` is finite (a diverged model's are not)."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


class _Checkpoint:
    """The best state of a fit so far (weights and momenta, by validation accuracy, then loss)."""

    def __init__(self, step: MLPStep, epoch: int, val: EvalResult) -> None:
        self.epoch, self.accuracy, self.loss = epoch, val.accuracy, val.loss
        self.tensors = [t.clone() for t in self._state(step)]

    @staticmethod
    def _state(step: MLPStep) -> list[torch.Tensor]:
        return [*step.weights, *step.biases, *step.weight_momenta, *step.bias_momenta]

    def beaten_by(self, val: EvalResult) -> bool:
        if math.isnan(val.accuracy):  # no validation samples: nothing to choose by, keep the latest
            return True
        return math.isfinite(val.loss) and (val.accuracy, -val.loss) > (self.accuracy, -self.loss)

    def restore(self, step: MLPStep) -> None:
        for live, saved in zip(self._state(step), self.tensors, strict=True):
            live.copy_(saved)
        for low, param in zip([*step.low_weights, *step.low_biases], [*step.weights, *step.biases], strict=True):
            low.copy_(param)


def _scaled(schedule: Callable[[int], float], factor: float) -> Callable[[int], float]:
    return lambda k: factor * schedule(k)


def _check_collapse(val: EvalResult, val_y: torch.Tensor, best: _Checkpoint, samples: int) -> None:
    """The validation criteria of a guarded fit: the model predicts one class for every validation sample
    (dead ReLUs), or, having been at least :data:`COLLAPSE_MIN_GAIN` above chance, it lost more than half
    of its best accuracy above chance in one epoch."""
    classes = int(val_y.max()) + 1 if val_y.numel() else 0
    if classes < 2 or math.isnan(best.accuracy):
        return
    chance = 1 / classes
    if val.predictions.unique().numel() == 1 and val_y.unique().numel() > 1:
        raise Divergence(val.loss, samples, "validation", how="collapsed (one class predicted) with")
    if best.accuracy - chance >= COLLAPSE_MIN_GAIN and val.accuracy - chance < 0.5 * (best.accuracy - chance):
        raise Divergence(
            val.loss,
            samples,
            "validation",
            how=f"collapsed (val accuracy {val.accuracy:.4f}, best {best.accuracy:.4f}) with",
        )


def fit(
    model: nn.Module,
    config: TrainConfig,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    on_epoch: EpochCallback | None = None,
    recover: int = 0,
    keep_best: bool = False,
    check_every: int = CHECK_EVERY,
    threads: Any = None,
) -> History:
    """Train ``model`` in place for ``config.epochs``; ``on_epoch`` sees each epoch and may raise to stop.

    A non-finite, exploding or relapsed loss (:class:`LossWatch`; a non-finite validation loss too, or a dead
    network whose output no longer depends on its input) stops the epoch at once; a guarded fit (``recover``
    or ``keep_best``) also treats a collapse of the validation accuracy as a divergence (one class predicted
    for all, or half the best accuracy above chance lost in one epoch). With ``recover=0`` that raises :class:`~mnist_flow.errors.TrainingDiverged` naming the epoch; otherwise, up to ``recover``
    times, the best state so far (the initial one at first) is restored, the learning rate of the rest of
    the fit is multiplied by :data:`RECOVERY_FACTOR` and the epoch is trained again, from the same point
    of the schedule; ``history.events`` says what was done. With ``keep_best`` the model ends with the
    weights of its best epoch by validation accuracy (``history.best_epoch``).

    ``threads``: a :mod:`mnist_flow.training.threads` policy choosing the intra-op threads (None: torch's current).
    """
    config.validate()
    generator = torch.Generator().manual_seed(config.seed)
    step = make_step(model, config, train_samples=train_x.shape[0])
    steps_per_epoch = math.ceil(train_x.shape[0] / config.batch_size)
    schedule, scale = step.lr, 1.0
    # the thread policy times the steps and sets the thread count; the step itself stays the one restored
    runner = threads.wrap(step, steps_per_epoch=steps_per_epoch) if threads is not None else step
    history = History()
    watch = LossWatch(step.weights[-1].shape[0])
    guarded = recover > 0 or keep_best
    best = _Checkpoint(step, 0, evaluate(model, val_x, val_y, precision=config.precision)) if guarded else None
    for epoch in range(1, config.epochs + 1):
        while True:  # once, or again after a recovery
            start = time.perf_counter()
            try:
                train_loss = train_epoch(
                    runner, train_x, train_y, config.batch_size, generator, check_every=check_every, watch=watch
                )
                seconds = time.perf_counter() - start
                val = evaluate(model, val_x, val_y, precision=config.precision)
                if val_x.shape[0] and not math.isfinite(val.loss):
                    raise Divergence(val.loss, train_x.shape[0], "validation")
                if val.constant:  # dead ReLUs (seen in fp32 at lr 5, the loss finite and under the bound)
                    raise Divergence(
                        val.loss, train_x.shape[0], "validation", how="dead network (same output for every input)"
                    )
                if best is not None:
                    _check_collapse(val, val_y, best, train_x.shape[0])
                break
            except Divergence as exc:
                if best is None or history.recoveries >= recover:
                    done = f"; {history.recoveries} recoveries tried before" if history.recoveries else ""
                    raise TrainingDiverged(
                        f"Training diverged in epoch {epoch} of {config.epochs} ({exc}) at learning rate "
                        f"{config.lr * scale:.4g}, momentum {config.momentum}{done}.",
                        fix="Lower the learning rate (lr_max) or the momentum (momentum_max).",
                        epoch=epoch,
                        loss=exc.loss,
                    ) from None
                best.restore(step)
                watch.lowest = math.inf  # the restored state starts a new record
                scale *= RECOVERY_FACTOR
                step.count = (epoch - 1) * steps_per_epoch
                restart = getattr(runner, "restart_epoch", None)  # a thread policy counts the epoch's steps too
                if restart is not None:
                    restart(epoch)
                step.lr = _scaled(schedule, scale)
                history.events.append(
                    f"epoch {epoch}: {exc}: restored the state of epoch {best.epoch} (val accuracy "
                    f"{best.accuracy:.4f}) and went on at {scale:g}x the learning rate"
                )
        stats = EpochStats(epoch, train_loss, val.loss, val.accuracy, seconds)
        history.epochs.append(stats)
        if best is not None and best.beaten_by(val):
            best = _Checkpoint(step, epoch, val)
        if on_epoch is not None:
            on_epoch(stats)
    if keep_best and best is not None:
        if best.epoch != config.epochs:
            best.restore(step)
        history.best_epoch = best.epoch
    return history


def train_model(
    config: TrainConfig,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    on_epoch: EpochCallback | None = None,
    recover: int = 0,
    keep_best: bool = False,
    threads: Any = None,
) -> tuple[MLP, History]:
    """Build a seeded model on ``device`` and fit it (see :func:`fit`); the tensors must already be on ``device``."""
    config.validate()
    model = build_model(config, device)
    history = fit(
        model,
        config,
        train_x,
        train_y,
        val_x,
        val_y,
        on_epoch=on_epoch,
        recover=recover,
        keep_best=keep_best,
        threads=threads,
    )
    return model, history
