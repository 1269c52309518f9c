"""How many intra-op threads a training run uses, and the process set-up of trial processes.

Two threads are at best about 1.45x faster than one on this MLP, and 5 to 35 times slower as soon
as another process wants a core: OpenMP's threads wait for each other at every operator
(docs/benchmarks.md, "Contention"). So nothing trains multi-threaded unless it measures that it pays:

- Trial processes (``workers > 1``) are single-threaded: :func:`single_threaded_process` runs in each
  of them before any trial (one OpenMP thread, passive waits, bounded kernel caches).
- A fit in a process of its own (the final fit, ``mnist-flow train``, trials with ``workers=1``) gets
  :class:`AdaptiveThreads` from :func:`policy_for`: at the start of every epoch it times a few steps
  with one thread and with more, in turn, keeps more only while they are measured faster, watches every step
  and falls back to one thread at once when the steps slow down (a neighbour took a core), probing
  again a little later in the epoch (the slowdown may have been a passing stall).
  More than one thread is only used for batch shapes whose results it verified to be bitwise equal to
  one thread's (:meth:`AdaptiveThreads.wrap`), and evaluation always runs on one thread, so the
  policy never changes a result: a run with the same seed trains the same model.
- ``MNIST_FLOW_THREADS=N`` overrides all of it (:class:`FixedThreads`).

Memory: PyTorch's bfloat16 matmuls go through oneDNN, which caches a compiled kernel per matrix
shape in two caches of 1,024 entries each (ideep's ``LRU_CACHE_CAPACITY`` and oneDNN's
``ONEDNN_PRIMITIVE_CACHE_CAPACITY``). Every trial has new hidden sizes, hence new shapes: the caches
grew a process by 6-10 MB per trial. :func:`bound_native_caches` caps both at
:data:`KERNEL_CACHE_ENTRIES`, more than the shapes of one fit (docs/benchmarks.md, "Memory per trial"),
or at :data:`ADAPTIVE_CACHE_ENTRIES` where the thread count may change (kernels are per thread count).
"""

from __future__ import annotations

import collections
import copy
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

#: Entries of each of the two oneDNN kernel caches. A fit's steps use 8 shapes (3 forward, 2 input-gradient
#: and 3 weight-gradient matmuls), its last short batch and evaluation about 11 more once per epoch; 16 keeps
#: the steps' kernels and rebuilds the others once an epoch (milliseconds). Measured over 40 trials of the
#: sample: 16 entries +12 MB then flat, 32 +35 MB, 64 +65 MB, 1,024 (PyTorch's) +6.6 MB per trial, unbounded.
KERNEL_CACHE_ENTRIES = 16
#: The entries of a process whose policy may switch thread counts (:class:`AdaptiveThreads`). oneDNN keys a
#: kernel by its thread count too, so one and two threads need 8 step shapes each, plus the last short batch's
#: and evaluation's: with 16 the two-thread probe rebuilt its kernels every epoch (its first step 100-250 ms
#: instead of 1), was judged hopeless, and the fit ran on one thread from the second epoch on.
ADAPTIVE_CACHE_ENTRIES = 48
CACHE_ENV = {
    "LRU_CACHE_CAPACITY": str(KERNEL_CACHE_ENTRIES),
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(KERNEL_CACHE_ENTRIES),
}
#: The cache variables this process set itself, with the value set (any other value is the user's, passed on).
_SET_HERE: dict[str, str] = {}
#: The environment of a single-threaded trial process (read by OpenMP and MKL when they start).
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
#: More threads than this never helped a batch-128 MLP step; the ladder stops here.
MAX_THREADS = 8
#: A multi-threaded probe whose first step is this many times slower than the best is stopped at once.
HOPELESS = 4.0


def bound_native_caches(adaptive: bool = False) -> None:
    """Cap oneDNN's per-shape kernel caches (unless the user set them): call before the first matmul.

    ``adaptive``: this process trains with :class:`AdaptiveThreads` (room for two thread counts' kernels).
    """
    entries = str(ADAPTIVE_CACHE_ENTRIES if adaptive else KERNEL_CACHE_ENTRIES)
    for key in CACHE_ENV:
        if key not in os.environ:
            os.environ[key] = _SET_HERE[key] = entries


def single_threaded_process(threads: int | None = None) -> None:
    """Set up a trial process: ``threads`` (default 1) intra-op threads, passive OpenMP, bounded caches.

    Used as the ``initializer`` of Prefect's ``ProcessPoolTaskRunner``, so it runs in each process
    before any task; the variables also reach what that process starts.
    """
    bound_native_caches()
    env = dict(SINGLE_THREAD_ENV)
    if threads and threads > 1:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    os.environ.update(env)
    if "torch" in sys.modules:  # already imported (a spawned process imports its parent's main module)
        import torch

        torch.set_num_threads(threads or 1)


@contextmanager
def child_environment(threads: int | None = None) -> Iterator[None]:
    """While open, processes started from this one begin single-threaded (``threads``): OpenMP reads
    ``OMP_NUM_THREADS`` and ``OMP_WAIT_POLICY`` once, when it starts, before any initializer could set
    them. This process's own OpenMP has started already and is unaffected; the variables are restored."""
    env = {**CACHE_ENV, **SINGLE_THREAD_ENV}
    if threads and threads > 1:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    saved = {key: os.environ.get(key) for key in env}
    user = {key: os.environ[key] for key in CACHE_ENV if key in os.environ and os.environ[key] != _SET_HERE.get(key)}
    os.environ.update({**env, **user})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class FixedThreads:
    """Always ``threads`` intra-op threads (``MNIST_FLOW_THREADS``)."""

    def __init__(self, threads: int, reason: str = "MNIST_FLOW_THREADS") -> None:
        self.threads, self.reason = threads, reason

    def wrap(self, step: Any, steps_per_epoch: int) -> Any:
        import torch

        torch.set_num_threads(self.threads)
        return step


@dataclass
class Decision:
    """One probe: seconds per step with each thread count tried, and the count chosen. An epoch starts with
    one; a fallback is followed by another at ``at_step`` of the same epoch."""

    epoch: int
    seconds_per_step: dict[int, float]
    threads: int
    fell_back_at_step: int | None = None
    at_step: int = 0
    #: This probe measured again at once: the one before it lost more threads to a single slow step.
    second_look: bool = False


@dataclass
class AdaptiveThreads:
    """More than one intra-op thread only while measured faster (see the module docstring).

    ``candidates`` are tried in order (1, 2, 4, ... up to the CPUs available); a count is kept only
    if its steps are at least ``margin`` faster than the best count before it, timed on alternate steps
    with that count (a VM's speed moves by tens of percent within seconds: measured one after the other,
    the count timed second often lost to the VM, not to the other count). While more than one
    thread runs, the mean of the last ``fallback_window`` steps above ``fallback`` times the one-thread
    step drops to one thread; ``retry_after`` steps later (twice as long after each further fallback in
    the epoch) the counts are probed again, so a passing stall on a quiet machine costs about
    ``retry_after`` one-thread steps, not the rest of the epoch, and a lasting neighbour a few short probes.

    Every comparison is of mean step times, not medians: next to a CPU-bound process most two-thread
    steps are as fast as when quiet, and a few wait for a descheduled thread for up to 160 ms (measured:
    median 1.55-1.73 ms, mean 5.0-6.1 ms, against 1.0-1.6 ms for one thread). Medians chose two threads
    there and kept them for hundreds of steps; the mean is what the epoch costs.

    A quiet VM stalls too, once in a while, for a few to tens of milliseconds, and one such step in a
    probe of 8 made two threads lose the probe and the whole epoch run on one thread. So a probe whose
    more threads lost only because of their single slowest step (without it they win by ``margin``)
    is measured again at once, one time (``second_look``); a neighbour's stalls come every few steps, so
    its probe loses without its slowest step too and costs nothing more.
    """

    candidates: tuple[int, ...] = (1,)
    #: Counted steps of each count in a probe. On a VM the mean of 16 steps of one count moves by up to a
    #: third from one block to the next (measured, 2026-12-03: 1.55 to 2.64 ms with two fixed threads, 2.26 to
    #: 3.70 ms with one); 8 steps often judged two threads, 1.3x faster over the epoch, no faster. A probe step
    #: on one thread that two would have run costs well under a millisecond, so probes are long.
    probe_steps: int = 24
    margin: float = 0.05
    #: More threads fall back to one once their recent steps average this times the one-thread step.
    fallback: float = 1.0
    #: The recent steps that average: long enough that a quiet machine's rare slow step (a few ms) does not
    #: drop a count that pays, short enough that a neighbour's stalls end it within a few dozen steps.
    fallback_window: int = 64
    #: Steps between two checks of that mean.
    fallback_check: int = 8
    #: A probe of more threads stops once its steps cost this share of a one-thread epoch over one thread.
    probe_share: float = 0.02
    #: Steps on one thread after a fallback before the next probe of the epoch (doubling with each fallback).
    retry_after: int = 128
    decisions: list[Decision] = field(default_factory=list)

    @classmethod
    def for_cpus(cls, cpus: int | None = None, **options: Any) -> AdaptiveThreads:
        from mnist_flow.search.scale import available_cpus

        top = min(MAX_THREADS, cpus if cpus is not None else available_cpus())
        ladder = [1]
        while ladder[-1] * 2 <= top:
            ladder.append(ladder[-1] * 2)
        if ladder[-1] < top:
            ladder.append(top)
        return cls(candidates=tuple(ladder), **options)

    def wrap(self, step: Any, steps_per_epoch: int) -> AdaptiveStep | Any:
        """``step`` (an ``MLPStep``) timed and run with the thread count of the policy; one thread where half
        an epoch is too short to time two counts (3 steps of each, warm-up included, per duel of the ladder)."""
        import torch

        torch.set_num_threads(1)
        if len(self.candidates) < 2 or not duel_steps(self, steps_per_epoch):
            return step
        return AdaptiveStep(step, self, max(1, steps_per_epoch))


class AdaptiveStep:
    """A training step that chooses its thread count as :class:`AdaptiveThreads` says.

    Attribute reads go to the wrapped step (``dtype``), so ``train_epoch`` sees no difference.
    """

    def __init__(self, step: Any, policy: AdaptiveThreads, steps_per_epoch: int) -> None:
        import torch

        self._torch = torch
        self._step, self._policy, self._per_epoch = step, policy, steps_per_epoch
        self._probe_steps = max(2, duel_steps(policy, steps_per_epoch))
        self._measured: dict[int, float] = {}  # seconds per step of each count the current probe decided
        self._calls = 0
        self._threads = 1
        self._probe: list[tuple[int, list[float]]] = []  # (threads, step seconds) of this epoch's probe
        self._single = float("inf")  # seconds per step with one thread, from the last probe
        self._window: collections.deque[float] = collections.deque(maxlen=policy.fallback_window)
        self._retry_at: int | None = None  # the call (counted over the fit) of the next probe after a fallback
        self._retry_after = policy.retry_after
        self._probe_epoch, self._probe_at = 1, 0  # the epoch and its step where the current probe began
        self._second_look = False  # the current probe measures again after one spoiled by a single slow step
        self._verified: dict[tuple[int, ...], bool] = {}  # input shape -> many threads give equal bits

    def __getattr__(self, name: str) -> Any:
        return getattr(self._step, name)

    # -- the step -------------------------------------------------------------------------------------------------

    def __call__(self, inputs: Any, targets: Any) -> Any:
        if inputs.device.type != "cpu":
            return self._step(inputs, targets)
        if self._calls % self._per_epoch == 0:
            self._retry_at, self._retry_after = None, self._policy.retry_after
            self._start_probe()
        elif self._calls == self._retry_at:
            self._retry_at = None
            self._start_probe()
        threads, counted = self._threads, True
        if threads > 1 and not self._same_bits(inputs, targets, threads):
            if self._probe:  # a full batch: this thread count would change the results
                self._finish_probe(self._probe[0][0], look_again=False)
            threads, counted = 1, False
        self._set(threads)
        start = time.perf_counter()
        loss = self._step(inputs, targets)
        seconds = time.perf_counter() - start
        self._calls += 1
        if counted:
            self._observe(threads, seconds)
        if self._calls % self._per_epoch == 0:
            self._set(1)  # evaluation and whatever follows the epoch run on one thread
        return loss

    def restart_epoch(self, epoch: int) -> None:
        """The fit trains ``epoch`` (1-based) again from its first step (a divergence recovery): realign
        the epoch count, so probes start and evaluation runs single-threaded where the epochs really do."""
        self._calls = (epoch - 1) * self._per_epoch
        self._probe, self._retry_at = [], None
        self._set(1)

    def _set(self, threads: int) -> None:
        if self._torch.get_num_threads() != threads:
            self._torch.set_num_threads(threads)

    # -- measuring ------------------------------------------------------------------------------------------------

    def _start_probe(self, second_look: bool = False, duel: tuple[int, int] | None = None) -> None:
        self._second_look = second_look
        self._measured = {}
        self._start_duel(*(duel or self._policy.candidates[:2]))
        self._probe_epoch, self._probe_at = self._calls // self._per_epoch + 1, self._calls % self._per_epoch
        self._window.clear()

    def _start_duel(self, incumbent: int, challenger: int) -> None:
        """Time ``incumbent`` and ``challenger`` threads on alternate steps, so that the VM's own speed,
        which moves by tens of percent within seconds, weighs on both alike."""
        self._probe = [(incumbent, []), (challenger, [])]
        self._threads = incumbent

    def _hopeless(self, times: list[float]) -> bool:
        """Stop probing the challenger's ``times`` early once it cannot win: a contended core makes every
        multi-threaded step many times slower, and a full probe would cost seconds."""
        # The warm-up step is not judged: it may build kernels for the new thread count (tens of ms, once).
        counted = times[1:]
        if not counted:
            return False
        target = (1 - self._policy.margin) * _mean(self._probe[0][1])
        if counted[0] > HOPELESS * target:  # even the first counted step is far off
            return True
        if sum(counted) - len(counted) * self._single > self._policy.probe_share * self._per_epoch * self._single:
            return True  # a contended core: the probe already cost more than its share of the epoch
        return sum(counted) > self._probe_steps * target  # its mean can no longer beat the target

    def _spoiled(self, threads: int) -> bool:
        """Whether the challenger lost this probe to ``threads`` only by its single slowest step: without
        it, the rest of its counted steps beat ``threads`` by ``margin`` (one stall also stops a probe as
        hopeless, so it may have been cut short; a neighbour's first step alone usually stops it)."""
        (incumbent, kept), (challenger, times) = self._probe
        counted = times[1:]
        if incumbent != threads or challenger <= threads or len(counted) < 2:
            return False
        return statistics.fmean(sorted(counted)[:-1]) < (1 - self._policy.margin) * _mean(kept)

    def _finish_probe(self, threads: int, look_again: bool = True) -> None:
        duel = (self._probe[0][0], self._probe[1][0])
        again = look_again and not self._second_look and self._spoiled(threads)
        self._measured.update({c: _mean(t) for c, t in self._probe if len(t) > 1})
        self._policy.decisions.append(
            Decision(
                self._probe_epoch,
                dict(sorted(self._measured.items())),
                threads,
                at_step=self._probe_at,
                second_look=self._second_look,
            )
        )
        self._threads, self._probe = threads, []  # (the window is empty: it fills only outside a probe)
        if again:  # the spoiled duel only: the counts below it were decided
            self._start_probe(second_look=True, duel=duel)

    def _observe(self, threads: int, seconds: float) -> None:
        policy = self._policy
        if self._probe:
            (incumbent, kept), (challenger, times) = self._probe
            mine = kept if threads == incumbent else times
            mine.append(seconds)
            if threads == 1 and len(mine) > 1:
                self._single = _mean(mine)
            if self._hopeless(times):
                self._finish_probe(incumbent)
            elif len(times) > self._probe_steps:  # both ran their steps (the first of each a warm-up)
                winner = challenger if _mean(times) < (1 - policy.margin) * _mean(kept) else incumbent
                index = policy.candidates.index(challenger)
                if winner == challenger and index + 1 < len(policy.candidates):  # it paid: try the next count
                    self._measured.update({c: _mean(t) for c, t in self._probe})
                    self._start_duel(challenger, policy.candidates[index + 1])
                else:
                    self._finish_probe(winner)
            else:
                self._threads = challenger if threads == incumbent else incumbent  # alternate
            return
        if threads > 1:
            self._window.append(seconds)  # (emptied when the next epoch's probe starts)
            checked = len(self._window) >= policy.fallback_check and self._calls % policy.fallback_check == 0
            if checked and statistics.fmean(self._window) > policy.fallback * self._single:
                self._threads = 1  # until the next probe
                self._retry_at, self._retry_after = self._calls + self._retry_after, 2 * self._retry_after
                if policy.decisions:
                    policy.decisions[-1].fell_back_at_step = (self._calls - 1) % self._per_epoch + 1  # steps done

    # -- equal results --------------------------------------------------------------------------------------------

    def _same_bits(self, inputs: Any, targets: Any, threads: int) -> bool:
        """Whether ``threads`` threads give this batch shape's step the bits one thread gives (checked once).

        Matmul kernels may split a product's inner dimension differently with more threads, which
        changes the rounding; two copies of the step take the same batch, one per thread count.
        """
        key = (threads, *inputs.shape)
        if key not in self._verified:
            single, multi = copy.deepcopy(self._step), copy.deepcopy(self._step)
            self._set(1)
            single(inputs, targets)
            self._set(threads)
            multi(inputs, targets)
            self._verified[key] = all(self._torch.equal(a, b) for a, b in zip(_state(single), _state(multi)))
        return self._verified[key]


def duel_steps(policy: AdaptiveThreads, steps_per_epoch: int) -> int:
    """Counted steps of each count in a duel: up to ``probe_steps``, so that the whole ladder's duels (each
    count's steps plus a warm-up, alternating) take at most half an epoch; 0 where fewer than 2 would fit
    (an epoch that short stays on one thread)."""
    duels = max(1, len(policy.candidates) - 1)
    steps = min(policy.probe_steps, steps_per_epoch // (4 * duels) - 1)
    return steps if steps >= 2 else 0


def _mean(times: list[float]) -> float:
    """Mean step time without the first (warm-up) step after a switch."""
    return statistics.fmean(times[1:]) if len(times) > 1 else float("inf")


def _state(step: Any) -> list[Any]:
    return [*step.weights, *step.biases, *step.weight_momenta, *step.bias_momenta]


Policy = FixedThreads | AdaptiveThreads


def policy_for(threads: int | None, cpus: int | None = None) -> Policy:
    """``MNIST_FLOW_THREADS`` (``threads``) if set, else the adaptive policy over the available CPUs."""
    return FixedThreads(threads) if threads else AdaptiveThreads.for_cpus(cpus)


def describe(policy: Policy) -> str:
    """One line for the log: what the policy chose, epoch by epoch."""
    if isinstance(policy, FixedThreads):
        return f"{policy.threads} thread(s) ({policy.reason})"
    if len(policy.candidates) < 2:
        return "1 thread (one CPU available)"
    parts = []
    for d in policy.decisions:
        timings = ", ".join(f"{c}: {1000 * s:.2f}" for c, s in d.seconds_per_step.items())
        parts.append(
            f"epoch {d.epoch}{f' step {d.at_step}' if d.at_step else ''}{' again' if d.second_look else ''}:"
            f" {d.threads} ({timings} ms/step"
            + (f"; back to 1 at step {d.fell_back_at_step}" if d.fell_back_at_step is not None else "")
            + ")"
        )
    return "adaptive threads: " + ("; ".join(parts) if parts else "no CPU step measured")
