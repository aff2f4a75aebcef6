"""Stop a run cleanly on SIGUSR1 / SIGTERM: save at the next step boundary on every rank, then exit 75.

SLURM sends USR1 ahead of the time limit (`#SBATCH --signal`) and TERM on scancel or preemption. The handler
only records the signal; at each step boundary `StopSignal.agreed()` takes the maximum over all ranks, so a
signal that reached one rank stops every rank after the same step (none waits in a collective the others
skipped). The trainer then saves a checkpoint and the process exits with `EXIT_SAVED_ON_SIGNAL`, the code
launch_scripts/train_slurm.sbatch requeues on (75: EX_TEMPFAIL, "try again later").
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
EXIT_SAVED_ON_SIGNAL = 75


class StopSignal:
    """Context manager: while active, SIGUSR1/SIGTERM set a flag instead of killing this process (processes
    forked meanwhile, such as data workers, keep the default action)."""

    def __init__(self) -> None:
        self.received = 0  # signal number, 0 = none
        self._previous: dict[int, object] = {}
        self._owner = os.getpid()

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # Python installs handlers there only
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._owner:  # a forked child (e.g. a data worker): the default action, as without us
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = self.received or signum

    def agreed(self) -> str | None:
        """Collective over all ranks: the name of a stop signal any rank received so far, else None."""
        flag = torch.tensor([self.received], dtype=torch.int32)
        if torch.cuda.is_available():
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        number = int(flag.item())
        return signal.Signals(number).name if number else None
