"""The thread policy (mnist_flow.training.threads): more threads only while measured faster, never another result.

The policy's decisions are driven by real step times: the steps below take a known time per thread
count (they sleep), so each test knows what the policy must choose. The real training step is then
held to one thread bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from mnist_flow.params import TrainConfig
from mnist_flow.training import threads as th
from mnist_flow.training.loop import train_model


class TimedStep:
    """A step whose duration depends on the thread count in use: ``seconds[threads]`` (or a callable)."""

    def __init__(self, seconds, *, unequal: bool = False) -> None:
        self.seconds, self.unequal = seconds, unequal
        self.dtype = torch.float32
        self.weights, self.biases = [torch.zeros(4, 4)], [torch.zeros(4)]
        self.weight_momenta, self.bias_momenta = [torch.zeros(4, 4)], [torch.zeros(4)]
        self.used: list[int] = []

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        threads = torch.get_num_threads()
        self.used.append(threads)
        if self.unequal:  # a result that depends on the thread count
            self.weights[0].add_(threads)
        wait = self.seconds(len(self.used)) if callable(self.seconds) else self.seconds[threads]
        time.sleep(wait)
        return torch.zeros(())


def _run(policy: th.AdaptiveThreads, step: TimedStep, epochs: int, per_epoch: int) -> TimedStep:
    wrapped = policy.wrap(step, steps_per_epoch=per_epoch)
    batch = torch.zeros(8, 4)
    for _ in range(epochs * per_epoch):
        wrapped(batch, torch.zeros(8, dtype=torch.long))
    return step


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_more_threads_are_kept_when_they_are_measured_faster() -> None:
    policy = th.AdaptiveThreads(candidates=(1, 2), probe_steps=4)
    step = _run(policy, TimedStep({1: 0.012, 2: 0.002}), epochs=2, per_epoch=30)
    assert [d.threads for d in policy.decisions] == [2, 2]
    assert step.used[-10:] == [2] * 10
    assert torch.get_num_threads() == 1  # the epoch's end (evaluation) is single-threaded


def test_one_thread_is_kept_when_more_threads_are_slower() -> None:
    policy = th.AdaptiveThreads(candidates=(1, 2), probe_steps=4)
    step = _run(policy, TimedStep({1: 0.002, 2: 0.012}), epochs=2, per_epoch=30)
    assert [d.threads for d in policy.decisions] == [1, 1]
    assert step.used.count(2) <= 2 * 6  # only the probes (cut short once they cannot win)
    assert step.used[-20:] == [1] * 20


def test_the_probe_alternates_thread_counts_so_a_vm_slowing_down_does_not_decide() -> None:
    # the VM slows down by 15 % a step while the probe runs; at any moment two threads are 20 % faster
    def seconds(call: int) -> float:
        drift = 1 + 0.15 * min(call, 12)
        return 0.002 * drift * (0.8 if torch.get_num_threads() == 2 else 1.0)

    policy = th.AdaptiveThreads(candidates=(1, 2), probe_steps=4)
    step = _run(policy, TimedStep(seconds), epochs=1, per_epoch=40)
    assert step.used[:10] == [1, 2] * 5  # one probe step each way in turn (timing 1 then 2 chose 1 here)
    assert [d.threads for d in policy.decisions] == [2]


def test_a_probe_of_more_threads_on_a_contended_core_stops_after_its_first_counted_step() -> None:
    # three times slower is not hopeless at first sight, but one such step already costs the probe's share
    policy = th.AdaptiveThreads(candidates=(1, 2), probe_steps=8)
    step = _run(policy, TimedStep({1: 0.004, 2: 0.012}), epochs=3, per_epoch=40)
    assert [d.threads for d in policy.decisions] == [1, 1, 1]
    # per epoch: the warm-up step and one counted step (three on a hiccup); without the share: 9 each
    assert step.used.count(2) <= 3 * 3


def test_a_slow_warm_up_step_after_a_switch_does_not_stop_the_probe() -> None:
    # each epoch's first step with two threads builds their kernels (here 50x a step), then two threads are 4x
    # faster (the probe alternates the counts: only the first step of each is a warm-up)
    def seconds(call: int) -> float:
        threads = torch.get_num_threads()
        if threads == 1:
            return 0.008
        return 0.1 if 2 not in step.used[(call - 1) // 30 * 30 : call - 1] else 0.002

    policy = th.AdaptiveThreads(candidates=(1, 2), probe_steps=4)
    step = TimedStep(seconds)
    _run(policy, step, epochs=3, per_epoch=30)
    assert [d.threads for d in policy.decisions] == [2, 2, 2]


def test_an_epoch_falls_back_to_one_thread_as_soon_as_the_steps_slow_down() -> None:
    # two threads are fast until step 40 (a neighbour starts), then six times slower than one
    def seconds(call: int) -> float:
        threads = torch.get_num_threads()
        return 0.008 if threads == 1 else (0.001 if call < 40 else 0.05)

    policy = th.AdaptiveThreads(candidates=(1, 2), probe_steps=4)
    step = _run(policy, TimedStep(seconds), epochs=1, per_epoch=90)
    assert policy.decisions[0].threads == 2 and policy.decisions[0].fell_back_at_step is not None
    assert policy.decisions[0].fell_back_at_step < 60
    assert step.used[-30:] == [1] * 30


def test_two_threads_whose_typical_step_is_fast_but_that_stall_now_and_then_are_not_kept() -> None:
    # next to a CPU-bound process (measured): most two-thread steps are as fast as when quiet, every few steps
    # one waits for a descheduled thread; the median step is faster than one thread's, the mean is 3x slower
    def seconds(call: int) -> float:
        if torch.get_num_threads() == 1:
            return 0.004
        return 0.015 if step.used.count(2) % 3 == 0 else 0.003

    policy = th.AdaptiveThreads(candidates=(1, 2), probe_steps=6)
    step = TimedStep(seconds)
    _run(policy, step, epochs=2, per_epoch=400)  # (long enough that the probe runs out)
    assert {d.threads for d in policy.decisions} == {1}
    # a probe cut short by a stall may look once more (in a few steps a quiet VM's stall looks the same),
    # never twice: each epoch's two-thread steps are at most two probes' warm-up and counted steps
    assert [d.second_look for d in policy.decisions].count(False) == 2
    assert step.used.count(2) <= 2 * 2 * 7


def test_a_probe_lost_to_one_slow_step_is_measured_again_at_once_and_keeps_more_threads() -> None:
    # two threads pay, but the epoch's probe catches one stall of the quiet VM (30 ms) in its two-thread steps
    def seconds(call: int) -> float:
        if torch.get_num_threads() == 1:
            return 0.004
        return 0.03 if call == 8 else 0.001  # (the probe alternates: calls 2, 4, 6, 8 are two-thread steps)

    policy = th.AdaptiveThreads(candidates=(1, 2), probe_steps=4)
    step = _run(policy, TimedStep(seconds), epochs=1, per_epoch=80)
    first, again = policy.decisions
    assert (first.threads, first.second_look) == (1, False)  # the stall made the probe hopeless at step 8
    assert (again.threads, again.second_look, again.at_step) == (2, True, 8)
    assert step.used[-60:] == [2] * 60  # without the second look: one thread to the end of the epoch
    assert "epoch 1 step 8 again: 2" in th.describe(policy)


def test_a_probe_is_measured_again_once_at_most_and_a_second_spoiled_look_keeps_one_thread() -> None:
    # every duel catches one stall on its second counted two-thread step (the 3rd, 6th, ... two-thread step)
    def seconds(call: int) -> float:
        if torch.get_num_threads() == 1:
            return 0.004
        return 0.03 if step.used.count(2) % 3 == 0 else 0.001

    policy = th.AdaptiveThreads(candidates=(1, 2), probe_steps=4)
    step = TimedStep(seconds)
    _run(policy, step, epochs=1, per_epoch=80)
    assert [(d.threads, d.second_look) for d in policy.decisions] == [(1, False), (1, True)]
    assert step.used.count(2) == 6 and step.used[-60:] == [1] * 60


def test_a_second_look_measures_again_only_the_duel_a_stall_spoiled() -> None:
    # a ladder of 1, 2, 4: two threads beat one, then one stall spoils the duel of four against two
    def seconds(call: int) -> float:
        threads = torch.get_num_threads()
        if threads == 4:
            return 0.05 if step.used.count(4) == 3 else 0.001
        return {1: 0.008, 2: 0.004}[threads]

    policy = th.AdaptiveThreads(candidates=(1, 2, 4), probe_steps=4)
    step = TimedStep(seconds)
    _run(policy, step, epochs=1, per_epoch=120)
    first, again = policy.decisions
    assert (first.threads, first.second_look) == (2, False)
    assert (again.threads, again.second_look, again.at_step, set(again.seconds_per_step)) == (4, True, 16, {2, 4})
    assert 1 not in step.used[16:]  # one thread's duel, already decided, is not timed again


def test_an_epoch_of_a_few_large_batches_still_decides_and_one_too_short_to_time_stays_on_one_thread() -> None:
    policy = th.AdaptiveThreads(candidates=(1, 2))  # 24 counted steps a count would need 50 steps
    step = _run(policy, TimedStep({1: 0.004, 2: 0.001}), epochs=2, per_epoch=20)
    assert [d.threads for d in policy.decisions] == [2, 2]  # (4 counted steps a count in an epoch of 20)
    assert step.used[-10:] == [2] * 10
    short = th.AdaptiveThreads(candidates=(1, 2, 4))  # two duels of 3 steps a count need 12 steps, half of 24
    assert short.wrap(step, steps_per_epoch=23) is step and torch.get_num_threads() == 1
    assert isinstance(short.wrap(step, steps_per_epoch=24), th.AdaptiveStep)


def test_a_chosen_thread_count_falls_back_when_stalls_start_though_most_steps_stay_fast() -> None:
    # two threads pay until step 40; from then on one step in four stalls (the median stays fast)
    def seconds(call: int) -> float:
        if torch.get_num_threads() == 1:
            return 0.006
        return 0.04 if call >= 40 and call % 4 == 0 else 0.002

    policy = th.AdaptiveThreads(candidates=(1, 2), probe_steps=4)
    step = _run(policy, TimedStep(seconds), epochs=1, per_epoch=120)
    assert policy.decisions[0].threads == 2
    assert policy.decisions[0].fell_back_at_step is not None and policy.decisions[0].fell_back_at_step < 80
    assert step.used[-40:] == [1] * 40


def test_a_fallback_on_a_passing_stall_probes_again_within_the_epoch_and_returns_to_more_threads() -> None:
    # two threads pay, except for a stall of steps 40-49 (the VM's host or a short job); after it they pay again
    def seconds(call: int) -> float:
        if torch.get_num_threads() == 1:
            return 0.006
        return 0.03 if 40 <= call < 50 else 0.002

    policy = th.AdaptiveThreads(candidates=(1, 2), probe_steps=4, retry_after=32)
    step = _run(policy, TimedStep(seconds), epochs=1, per_epoch=200)
    first, again = policy.decisions[0], policy.decisions[1]
    assert first.threads == 2 and first.fell_back_at_step is not None and first.fell_back_at_step < 60
    assert again.epoch == 1 and again.at_step == first.fell_back_at_step + 32 and again.threads == 2
    assert step.used[-60:] == [2] * 60  # without the second probe: one thread to the end of the epoch
    assert "epoch 1 step" in th.describe(policy)


def test_fallbacks_in_one_epoch_probe_again_ever_later() -> None:
    # two threads pay for their first dozen steps after each switch, then stall: every probe ends in a fallback
    def seconds(call: int) -> float:
        used = step.used
        if used[-1] == 1:
            return 0.004
        run = next((i for i in range(len(used) - 1, -1, -1) if used[i] == 1), -1)
        return 0.001 if len(used) - 1 - run <= 12 else 0.02

    step = TimedStep(seconds)
    policy = th.AdaptiveThreads(candidates=(1, 2), probe_steps=4, retry_after=16)
    _run(policy, step, epochs=1, per_epoch=300)
    starts = [d.at_step for d in policy.decisions]
    gaps = [later - earlier for earlier, later in zip(starts, starts[1:], strict=False)]
    assert len(starts) >= 3 and all(d.threads == 2 and d.fell_back_at_step for d in policy.decisions[:-1])
    assert all(later > earlier for earlier, later in zip(gaps, gaps[1:], strict=False))  # the retries back off


def test_an_epoch_trained_again_after_a_recovery_is_probed_and_ends_single_threaded_where_it_really_ends() -> None:
    policy = th.AdaptiveThreads(candidates=(1, 2), probe_steps=4)
    step = TimedStep({1: 0.004, 2: 0.001})
    wrapped = policy.wrap(step, steps_per_epoch=30)
    batch, targets = torch.zeros(8, 4), torch.zeros(8, dtype=torch.long)
    for _ in range(45):  # epoch 2 diverges half-way: the fit restores and trains epoch 2 again from its start
        wrapped(batch, targets)
    wrapped.restart_epoch(2)
    for _ in range(30):
        wrapped(batch, targets)
    last = policy.decisions[-1]
    assert (last.epoch, last.at_step, last.threads) == (2, 0, 2)
    assert step.used[-1] == 2 and torch.get_num_threads() == 1  # the epoch's end: evaluation on one thread
    assert [d.epoch for d in policy.decisions] == [1, 2, 2]


def test_a_probe_that_ends_on_an_epochs_last_step_is_recorded_in_that_epoch() -> None:
    # the epoch's probe takes steps 0-9 (5 per count, the first of each uncounted) and keeps two threads;
    # they stall from step 10, fall back at step 16, and the retry 14 steps later ends on step 39, the last
    def seconds(call: int) -> float:
        if torch.get_num_threads() == 1:
            return 0.004
        return 0.001 if call - 1 < 10 or call - 1 >= 30 else 0.03

    policy = th.AdaptiveThreads(candidates=(1, 2), probe_steps=4, retry_after=14, fallback_check=4)
    _run(policy, TimedStep(seconds), epochs=1, per_epoch=40)
    first, retry = policy.decisions
    assert (first.epoch, first.threads, first.fell_back_at_step) == (1, 2, 16)
    assert (retry.epoch, retry.at_step) == (1, 30)  # (was recorded as epoch 2: the count had moved on)


def test_more_threads_are_never_used_when_they_would_change_the_result() -> None:
    policy = th.AdaptiveThreads(candidates=(1, 2), probe_steps=4)
    step = _run(policy, TimedStep({1: 0.012, 2: 0.002}, unequal=True), epochs=2, per_epoch=30)
    assert all(d.threads == 1 for d in policy.decisions)
    assert set(step.used) == {1}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_adaptive_policy_trains_the_same_model_as_one_thread(precision: str) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1000, 784, generator=g), torch.randint(0, 10, (1000,), generator=g)
    config = TrainConfig(hidden=(1024, 512), batch_size=64, epochs=2, precision=precision, lr=0.05)
    one, _ = train_model(config, x[:900], y[:900], x[900:], y[900:], threads=th.FixedThreads(1))
    policy = th.AdaptiveThreads(candidates=(1, 2), probe_steps=2)
    adaptive, history = train_model(config, x[:900], y[:900], x[900:], y[900:], threads=policy)
    assert len(policy.decisions) == 2
    for a, b in zip(one.parameters(), adaptive.parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_ladder_goes_up_to_the_available_cpus_and_mnist_flow_threads_overrides() -> None:
    assert th.AdaptiveThreads.for_cpus(1).candidates == (1,)
    assert th.AdaptiveThreads.for_cpus(2).candidates == (1, 2)
    assert th.AdaptiveThreads.for_cpus(6).candidates == (1, 2, 4, 6)
    assert th.AdaptiveThreads.for_cpus(64).candidates == (1, 2, 4, 8)
    fixed = th.policy_for(3)
    assert isinstance(fixed, th.FixedThreads) and fixed.threads == 3
    fixed.wrap(object(), steps_per_epoch=10)
    assert torch.get_num_threads() == 3
    assert isinstance(th.policy_for(None, cpus=2), th.AdaptiveThreads)


def test_a_trial_process_is_single_threaded_with_passive_openmp_and_bounded_kernel_caches() -> None:
    code = ("import os, torch; from mnist_flow.training.threads import single_threaded_process; single_threaded_process(); "
            "print(torch.get_num_threads(), os.environ['OMP_NUM_THREADS'], os.environ['OMP_WAIT_POLICY'], "
            "os.environ['LRU_CACHE_CAPACITY'], os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])")
    env = {k: v for k, v in os.environ.items() if k not in th.CACHE_ENV and not k.startswith(("OMP_", "MKL_"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         timeout=120).stdout.split()
    assert out == ["1", "1", "PASSIVE", str(th.KERNEL_CACHE_ENTRIES), str(th.KERNEL_CACHE_ENTRIES)]
    # a value the user set is kept
    env["LRU_CACHE_CAPACITY"] = "7"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         timeout=120).stdout.split()
    assert out[3] == "7"


def test_processes_started_in_the_child_environment_begin_single_threaded_and_the_variables_are_restored(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "5")  # the user's value is kept
    code = "import os, torch; print(torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'], os.environ['LRU_CACHE_CAPACITY'])"
    with th.child_environment():
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             timeout=120).stdout.split()
    assert out == ["1", "PASSIVE", "5"]
    assert "OMP_NUM_THREADS" not in os.environ and "OMP_WAIT_POLICY" not in os.environ
    assert os.environ["LRU_CACHE_CAPACITY"] == "5"


def test_an_adaptive_process_has_room_for_two_thread_counts_and_its_trial_processes_do_not() -> None:
    code = ("import os; from mnist_flow.training import threads as th; th.bound_native_caches(adaptive=True); "
            "own = [os.environ[k] for k in th.CACHE_ENV]\n"
            "with th.child_environment(): child = [os.environ[k] for k in th.CACHE_ENV]\n"
            "print(*own, *child, *[os.environ[k] for k in th.CACHE_ENV])")
    env = {k: v for k, v in os.environ.items() if k not in th.CACHE_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         timeout=120).stdout.split()
    adaptive, single = str(th.ADAPTIVE_CACHE_ENTRIES), str(th.KERNEL_CACHE_ENTRIES)
    assert out == [adaptive, adaptive, single, single, adaptive, adaptive]  # restored after the block
    env["LRU_CACHE_CAPACITY"] = "7"  # the user's value is kept, and passed on
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         timeout=120).stdout.split()
    assert out == ["7", adaptive, "7", single, "7", adaptive]
