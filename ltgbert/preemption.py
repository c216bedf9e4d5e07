"""Turns SLURM's "time is nearly up" signals into a flag the training loop polls.

SLURM sends a signal some time before the job's limit (``#SBATCH --signal=B:USR1@120``), and SIGTERM before
SIGKILL when a job is preempted or cancelled. Doing real work inside a signal handler (saving a checkpoint
while a collective is half done) deadlocks distributed runs, so the handler only records that a signal came.
The training loop checks ``handler.requested`` at each optimizer-step boundary, agrees across ranks with
``ltgbert.distributed.all_ranks_any`` (a signal may reach only some ranks, or reach them at different steps),
saves a checkpoint on every rank, and exits with ``EXIT_PREEMPTED``.

Typical use::

    preemption = PreemptionHandler().install()
    for step in ...:
        ...
        if all_ranks_any(accelerator, preemption.requested):
            save_checkpoint(accelerator, output_dir, step, state)
            sys.exit(EXIT_PREEMPTED)
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable

__all__ = ["PreemptionHandler", "EXIT_OK", "EXIT_USER_ERROR", "EXIT_PREEMPTED"]

EXIT_OK = 0
"""The run finished."""
EXIT_USER_ERROR = 2
"""Bad input: the entry point printed ``error: <message>`` (see ``ltgbert.errors.UserError``)."""
EXIT_PREEMPTED = 75
"""The run saved a checkpoint and stopped early because of a signal (SIGUSR1/SIGTERM); it is not finished.
The SLURM templates requeue the job on this code and the next run resumes with
``--resume_from_checkpoint latest``. 75 is ``EX_TEMPFAIL`` from sysexits.h: "try again later"."""


class PreemptionHandler:
    """Records that one of ``signals`` arrived; nothing else happens inside the handler.

    ``install()`` replaces the handlers of those signals in this process (the previous handlers are remembered
    for ``uninstall()`` but not called: the default action of SIGTERM/SIGUSR1 is to terminate, which is
    exactly what we want to avoid). It must be called from the main thread, as Python requires for
    ``signal.signal``; calling it twice is harmless.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGUSR1, signal.SIGTERM)):
        self.signals = tuple(signal.Signals(s) for s in signals)
        self._event = threading.Event()
        self._signal_name: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    def install(self) -> PreemptionHandler:
        """Installs the flag-setting handler for every signal (idempotent); returns self."""
        for sig in self.signals:
            if sig in self._previous:
                continue
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restores the handlers that were in place before ``install()``."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        # Only async-signal-safe work here: set a flag and remember the first signal's name.
        if self._signal_name is None:
            self._signal_name = signal.Signals(signum).name
        self._event.set()

    @property
    def requested(self) -> bool:
        """True once any of the signals has arrived."""
        return self._event.is_set()

    @property
    def signal_name(self) -> str | None:
        """Name of the first signal received (e.g. "SIGUSR1"), or None."""
        return self._signal_name

    def request(self, signal_name: str = "manual") -> None:
        """Sets the flag without a signal (tests, or a loop that wants to stop the same way)."""
        if self._signal_name is None:
            self._signal_name = signal_name
        self._event.set()
