"""Fault injection for the failure tests, kept out of lmlab itself. Python imports this module at start-up in every
process that has this folder on its PYTHONPATH (the tests and scripts/crash_test.py put it there for the processes
they start); without the variables below it does nothing.

- LMLAB_TEST_CHECKPOINT_PAUSE=SECONDS holds every checkpoint half-written (after the weights, before the optimizer
  state), so the crash test can kill a run in the middle of a write.
- LMLAB_TEST_KILL=RANK:STEP makes that rank kill itself with SIGKILL just before step STEP + 1 (first launch only,
  not after an elastic restart), so the distributed tests can lose a rank.
"""

import os


def _pause_checkpoints(seconds: float) -> None:
    import time

    import lmlab.checkpoint as checkpoint

    real = checkpoint.optimizer_to_flat

    def paused(optimizer):
        time.sleep(seconds)
        return real(optimizer)

    checkpoint.optimizer_to_flat = paused


def _kill_at(rank: int, step: int) -> None:
    import signal

    import lmlab.train as train

    real, calls = train.train_step, [0]

    def counted(*args, **kwargs):
        if calls[0] == step and int(os.environ.get("RANK", "0")) == rank:
            os.kill(os.getpid(), signal.SIGKILL)
        calls[0] += 1
        return real(*args, **kwargs)

    train.train_step = counted


if os.environ.get("LMLAB_TEST_CHECKPOINT_PAUSE"):
    _pause_checkpoints(float(os.environ["LMLAB_TEST_CHECKPOINT_PAUSE"]))
if os.environ.get("LMLAB_TEST_KILL") and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
    _rank, _step = (int(v) for v in os.environ["LMLAB_TEST_KILL"].split(":"))
    _kill_at(_rank, _step)
