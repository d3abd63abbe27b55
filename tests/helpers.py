"""Callbacks used by tests through the CLI (``--trainer.callbacks+=tests.helpers.KillAtStep``)."""

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILLs its own process once ``trainer.global_step`` reaches ``step`` (a hard crash)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class WarnAtStart(L.Callback):
    """Emits a UserWarning when fit starts: the user's own warnings must still show (quiet by default
    filters only specific third-party messages)."""

    def on_fit_start(self, trainer, pl_module):
        import warnings

        warnings.warn("a warning from the user's own callback", UserWarning, stacklevel=1)
