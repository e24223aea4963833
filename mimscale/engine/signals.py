"""SIGUSR1/SIGTERM (SLURM's warning signal, preemption) -> finish the step, save, exit EXIT_REQUEUE."""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("mimscale.train")


class Signals:
    """Installs the handlers on construction; :meth:`restore` puts the previous ones back."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.pid = os.getpid()  # loader workers inherit the handler: only this process logs
        self._old = {}
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. an embedding app): no handler
                pass

    def _handle(self, signum, frame) -> None:
        self.received = signum
        if os.getpid() == self.pid:
            log.warning("received %s: saving after this step", signal.Signals(signum).name)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
