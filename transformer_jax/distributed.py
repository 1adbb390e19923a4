"""Several processes (the hosts of a pod slice): start-up, and a bounded exit when one is lost.

A process that dies, hangs or loses its network leaves the others waiting in the next
collective, possibly for good. After `initialize`, a watchdog thread in every process writes a
heartbeat to jax's coordination service and reads everyone else's; when one has not changed for
`peer_timeout_s` seconds (or the service itself, on process 0, cannot be reached for that long)
the watchdog prints one line naming the lost process and ends this process, so the job can be
restarted on all hosts and resume from its last checkpoint. jax's own heartbeat check, set a
little later, stays as the backstop.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax

log = logging.getLogger(__name__)

HEARTBEAT_PREFIX = "transformer_jax/heartbeat"
# The heartbeat a process leaves when it stops watching: done, not lost.
DONE = "done"
# Exit status of a process that gave up on a lost peer (distinct from a crash's 1).
LOST_PEER_EXIT = 3
# jax's coordination service aborts a process this much later than our watchdog would.
_BACKSTOP_S = 30


def initialize(peer_timeout_s: float = 120.0, **kwargs: Any) -> PeerWatchdog | None:
    """jax.distributed.initialize(**kwargs), then the watchdog (when there are several processes).

    kwargs go to jax.distributed.initialize (coordinator address, process id, ... are detected
    on Cloud TPU VMs).
    """
    if peer_timeout_s <= 0:
        raise ValueError(f"peer_timeout_s={peer_timeout_s}: must be positive (seconds)")
    jax.distributed.initialize(
        heartbeat_timeout_seconds=int(peer_timeout_s) + _BACKSTOP_S, **kwargs
    )
    if jax.process_count() == 1:
        return None
    watchdog = PeerWatchdog(peer_timeout_s)
    watchdog.start()
    # Registered after jax's own exit hook, so it runs first: no false alarm while the others
    # wait at jax's shutdown barrier.
    atexit.register(watchdog.stop)
    return watchdog


class PeerWatchdog:
    """Heartbeats through the coordination service's key-value store; exits on a lost peer."""

    def __init__(
        self,
        timeout_s: float,
        interval_s: float | None = None,
        exit_fn: Callable[[int], Any] = os._exit,
    ) -> None:
        from jax._src import distributed  # the client jax.distributed.initialize connected

        client = distributed.global_state.client
        if client is None:
            raise RuntimeError("PeerWatchdog: call jax.distributed.initialize first")
        self.client: Any = client
        self.timeout_s = timeout_s
        self.interval_s = interval_s or min(5.0, timeout_s / 4)
        self.process = jax.process_index()
        self.count = jax.process_count()
        self._exit = exit_fn
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peer-watchdog", daemon=True)

    def start(self) -> None:
        """Start beating and watching in a daemon thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop watching and tell the others this process is done, not lost (at exit)."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=self.interval_s + 5)  # its last beat lands before DONE
        # The service may be gone already; the others then exit anyway.
        with contextlib.suppress(Exception):
            self.client.key_value_set(self._key(self.process), DONE, allow_overwrite=True)

    def verdict(self) -> None:
        """After a failed collective: give the watchdog time to see whether a peer is lost.

        If one is, the watchdog ends this process naming it; otherwise this returns after
        about peer_timeout_s and the caller reports its own error.
        """
        deadline = time.monotonic() + self.timeout_s + 2 * self.interval_s
        while self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)

    def _key(self, process: int) -> str:
        return f"{HEARTBEAT_PREFIX}/{process}"

    def _run(self) -> None:
        beat = 0
        started = time.monotonic()
        contact = started
        # When each peer's heartbeat last changed, by this process's clock (hosts' clocks
        # differ; only changes are compared).
        seen: dict[int, tuple[str | None, float]] = {
            p: (None, started) for p in range(self.count) if p != self.process
        }
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            try:
                self.client.key_value_set(self._key(self.process), str(beat), allow_overwrite=True)
                beat += 1
                values = dict(self.client.key_value_dir_get(HEARTBEAT_PREFIX + "/"))
                contact = now
            except Exception as e:  # the service (process 0) is gone or unreachable
                if now - contact > self.timeout_s:
                    self._lost(
                        f"lost the coordination service on process 0 for {now - contact:.0f} s "
                        f"({str(e).strip().splitlines()[0][:200] if str(e).strip() else e!r})"
                    )
                    return
                continue
            for peer, (value, since) in seen.items():
                current = values.get(self._key(peer))
                if current == DONE:
                    continue  # it finished its part (its exit is jax's shutdown barrier)
                if current != value:
                    seen[peer] = (current, now)
                elif now - since > self.timeout_s:
                    self._lost(
                        f"process {peer} of {self.count} has sent no heartbeat for "
                        f"{now - since:.0f} s (it died, hangs, or lost its network)"
                    )
                    return

    def _lost(self, what: str) -> None:
        message = (
            f"error: process {self.process}: {what}. Exiting instead of waiting in a "
            "collective; restart the job on every host to resume from the last checkpoint."
        )
        print(message, file=sys.stderr, flush=True)
        self._exit(LOST_PEER_EXIT)
