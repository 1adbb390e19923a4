"""SIGTERM handling: a TPU VM's maintenance or preemption notice becomes a clean save and exit."""

from __future__ import annotations

import logging
import signal
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class Preemption:
    """SIGTERM (TPU VM maintenance/preemption) sets a flag; the loop saves and exits cleanly.

    On several hosts the flag is only acted on at steps where all processes compare theirs
    (every `sync_every` steps): a host leaving the loop alone would hang the others' collectives.
    """

    def __init__(self, sync_every: int = 10) -> None:
        self.requested = False
        self.sync_every = sync_every
        self._previous: Any = None

    def __enter__(self) -> Preemption:
        def handler(signum: int, frame: Any) -> None:
            del frame
            log.warning("Signal %d received: saving at the next step boundary.", signum)
            self.requested = True

        self._previous = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after `step`; every process gets the same answer."""
        if jax.process_count() == 1:
            return self.requested
        if step % self.sync_every:
            return False
        # One small host allgather every sync_every steps: any host's signal stops them all.
        flags = multihost_utils.process_allgather(np.asarray(self.requested))
        self.requested = bool(np.any(flags))
        return self.requested
