"""Preemption and time-limit signals, turned into one checkpoint that every rank saves together.

Slurm signals every task of a job step: ``USR2`` some seconds before the time limit
(``sbatch --signal=USR2@N``, what ``mmtrain launch`` and ``slurm/train.sbatch`` ask for),
and ``TERM`` when a job is preempted with a grace period or cancelled. submitit's local
executor sends ``USR2`` to every task before its time limit as well.

A handler only records the signal. The training loop calls :meth:`PreemptionWatch.agreed`
after each optimizer step; it all-reduces the record, so all ranks stop at the same step
and save it together (a ZeRO-3 save is collective), also when the signal reached only
some of them. What happens next is the caller's:

- ``requeue`` (USR2 seen on any rank): save, then put the job back in the queue, so it
  resumes from this checkpoint (``mmtrain.launch.job``).
- ``stop`` (only TERM seen): save and end. Slurm requeues a preempted job itself when the
  partition's PreemptMode is REQUEUE; a cancelled job stays cancelled.
"""
from __future__ import annotations

import signal
import threading

from mmtrain import distributed

ACTIONS = {0: None, 1: "stop", 2: "requeue"}


class PreemptionWatch:
    """Record USR2 (-> ``requeue``) and, when ``stop_on_term``, TERM (-> ``stop``).

    Args:
        stop_on_term: also treat TERM as "save and stop". Right under a scheduler, where
            TERM announces a kill some seconds later; under plain torchrun TERM comes from
            torchrun itself after another rank failed, and waiting for a collective with a
            dead peer would only delay the end. Default true.
    """

    def __init__(self, stop_on_term: bool = True) -> None:
        self.code = 0
        self.signal_name = ""
        self.previous: dict[int, object] = {}
        watched = {signal.SIGUSR2: 2, **({signal.SIGTERM: 1} if stop_on_term else {})}
        self._codes = watched
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionWatch must be created in the main thread (Python delivers signals there)")
        for sig in watched:
            self.previous[sig] = signal.signal(sig, self._record)

    def _record(self, signum: int, frame) -> None:
        # a handler runs between two bytecodes of the main thread: set a flag, nothing else
        if self._codes[signum] > self.code:
            self.code = self._codes[signum]
            self.signal_name = signal.Signals(signum).name

    def agreed(self) -> str | None:
        """Collective: ``requeue``, ``stop`` or None, the same answer on every rank."""
        return ACTIONS[distributed.agreed_code(self.code)]

    def previous_handler(self, sig: int):
        """The handler this watch replaced (submitit's own, inside a submitit job)."""
        return self.previous.get(sig)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
