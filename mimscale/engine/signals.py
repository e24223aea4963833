"""Signals that end a run cleanly: SIGUSR1 (SLURM's warning), SIGTERM (preemption, schedulers and container
runtimes, often to the whole process group) and SIGINT (Ctrl-C) -> finish the step, save, exit EXIT_REQUEUE (42).

A second Ctrl-C (SIGINT after any of them) aborts at once: KeyboardInterrupt, no save (the last checkpoint stays).
Loader workers ignore these signals (:func:`mimscale.data.loader.worker_ignores_signals`): a signal sent to the
process group reaches them too, and the decision belongs to the main process.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("mimscale.train")

HANDLED = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class Signals:
    """Installs the handlers on construction; :meth:`restore` puts the previous ones back."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.pid = os.getpid()  # a forked child runs the inherited handler until it installs its own: ignored there
        self._old = {}
        for sig in HANDLED:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. an embedding app): no handler
                pass

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self.pid:
            return
        if signum == signal.SIGINT and self.received is not None:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt  # the second Ctrl-C: abort now, without saving
        self.received = signum
        extra = " (Ctrl-C again aborts without saving)" if signum == signal.SIGINT else ""
        log.warning("received %s: saving after this step, then exit 42%s", signal.Signals(signum).name, extra)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
