"""Test-only fault injection for tests/e2e/test_recovery.py, loaded through PYTHONPATH by the flow-run processes.

With ``E2E_HANG_ONCE=<marker file>`` in the environment, the second training of a process (its second
trial) gets stuck in its first epoch: the thread loops forever in Python and never reports the epoch
(Optuna's heartbeat thread keeps beating). The marker file makes it happen once across processes.
Nothing is imported unless the variable is set and ``mnist_flow.training.loop`` is being imported anyway.
"""

from __future__ import annotations

import os
import sys

_MARKER = os.environ.get("E2E_HANG_ONCE")


def _patch(train) -> None:
    import time

    real_fit = train.fit
    calls = [0]

    def fit(*args, on_epoch=None, **kwargs):
        calls[0] += 1
        if calls[0] == 2 and not os.path.exists(_MARKER):
            open(_MARKER, "w").close()

            def stuck(stats) -> None:
                while True:
                    time.sleep(0.05)

            return real_fit(*args, on_epoch=stuck, **kwargs)
        return real_fit(*args, on_epoch=on_epoch, **kwargs)

    train.fit = fit


if _MARKER:
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
