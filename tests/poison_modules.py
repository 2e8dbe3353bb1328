"""Stage modules for tests/test_poison_step.py, importable by the workers the test starts."""

import os
import signal

import dspy


class SelfKiller(dspy.Module):
    """Kills the process running it (a prefork pool child), as an out-of-memory kill or a crash in native
    code would: Celery hands the message back (`reject_on_worker_lost`), and it comes back again."""

    def forward(self, text: str) -> dspy.Prediction:
        os.kill(os.getpid(), signal.SIGKILL)
        return dspy.Prediction(finding="unreachable", score=0.0)
