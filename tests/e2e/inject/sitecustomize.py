"""Test-only fault injection for the end-to-end tests, loaded through PYTHONPATH by the flow-run processes.

- ``E2E_HANG_ONCE=<marker file>``: the second training of a process (its second trial) gets stuck in its
  first epoch: the thread loops forever in Python and never reports the epoch (Optuna's heartbeat thread
  keeps beating). The marker file makes it happen once across processes (tests/e2e/test_recovery.py).
- ``E2E_EPOCH_SECONDS=<s>``: every epoch takes that much longer (a sleep before it is reported), so a
  trial on the 5,000-digit sample lasts as long as one on real data and a test can act mid-trial on a
  slow machine, where the sample's 0.1 s epochs would let a whole study end between two polls.

Nothing is imported unless a variable is set and ``mnist_flow.training.loop`` is being imported anyway.
"""

from __future__ import annotations

import os
import sys

_MARKER = os.environ.get("E2E_HANG_ONCE")
_EPOCH_SECONDS = float(os.environ.get("E2E_EPOCH_SECONDS") or 0)


def _patch(train) -> None:
    import time

    real_fit = train.fit
    calls = [0]

    def slowed(on_epoch):
        if not _EPOCH_SECONDS:
            return on_epoch

        def report(stats) -> None:
            time.sleep(_EPOCH_SECONDS)
            if on_epoch is not None:
                on_epoch(stats)

        return report

    def fit(*args, on_epoch=None, **kwargs):
        calls[0] += 1
        if _MARKER and calls[0] == 2 and not os.path.exists(_MARKER):
            open(_MARKER, "w").close()

            def stuck(stats) -> None:
                while True:
                    time.sleep(0.05)

            return real_fit(*args, on_epoch=stuck, **kwargs)
        return real_fit(*args, on_epoch=slowed(on_epoch), **kwargs)

    train.fit = fit


if _MARKER or _EPOCH_SECONDS:
    import importlib.abc
    import importlib.util

    class _PatchTrain(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "mnist_flow.training.loop":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            exec_module = spec.loader.exec_module

            def patched(module) -> None:
                exec_module(module)
                _patch(module)

            spec.loader.exec_module = patched
            return spec

    sys.meta_path.insert(0, _PatchTrain())
